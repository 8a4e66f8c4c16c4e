import os

# Kernels fill outputs with 0xFF first, so GPU tests see any element a kernel forgot to write.
os.environ.setdefault("JAXQ_POISON_OUTPUTS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

# Eight virtual CPU devices for the sharding tests (must precede backend initialisation).
jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
    import jaxq

    if jaxq.cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and jaxq built with nvcc")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
