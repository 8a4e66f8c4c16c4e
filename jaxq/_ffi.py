"""Loads the compiled CUDA module, if this install has one, and registers its FFI targets with XLA."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
import os

import jax

_log = logging.getLogger("jaxq")


def _load_extension():
    try:
        from jaxq import _jaxq_cuda

        return _jaxq_cuda
    except ImportError:
        pass
    # A source checkout on sys.path (python -m ... from the repo root) shadows the installed package; its
    # compiled module then sits beside the installed copy.
    try:
        files = importlib.metadata.distribution("jaxq").files or ()
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("_jaxq_cuda.") and file.suffix in (".so", ".pyd"):
            spec = importlib.util.spec_from_file_location("jaxq._jaxq_cuda", file.locate())
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _log.info("jaxq: using the compiled module of the installed package, %s", file.locate())
            return module
    return None  # CPU-only install: nvcc was not found at build time.


_jaxq_cuda = _load_extension()

DISABLE_ENV = "JAXQ_DISABLE_KERNELS"


def _register_targets() -> frozenset[str]:
    if _jaxq_cuda is None:
        _log.info("jaxq: built without CUDA kernels; every op lowers to its jnp reference")
        return frozenset()
    targets = _jaxq_cuda.ffi_targets()
    for name, capsule in targets.items():
        jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    return frozenset(targets)


REGISTERED_TARGETS = _register_targets()


def export_safety_checks() -> list:
    """``disabled_checks`` for ``jax.export.export`` of functions that call jaxq's kernels. JAX refuses to
    serialize custom calls without a compatibility guarantee; jaxq's targets have none across jaxq versions,
    so a program exported with them must be run with the same jaxq installed."""
    from jax import export

    return [export.DisabledSafetyCheck.custom_call(name) for name in sorted(REGISTERED_TARGETS)]


@functools.cache
def cuda_available() -> bool:
    """Whether the CUDA kernels are compiled into this install and JAX sees a CUDA GPU."""
    if not REGISTERED_TARGETS:
        return False
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def kernel_enabled(op_name: str, target: str | None) -> bool:
    """Whether `op_name` lowers to its FFI kernel on CUDA.

    ``JAXQ_DISABLE_KERNELS`` (comma-separated op names, or ``all``) sends chosen ops to their jnp
    reference even on GPU, for debugging numerics and A/B benchmarks. It is read when a function is
    lowered, so set it before the first call of a jitted function.
    """
    if target is None or target not in REGISTERED_TARGETS:
        return False
    disabled = {name.strip() for name in os.environ.get(DISABLE_ENV, "").split(",")}
    return not ({"all", op_name} & disabled)
