"""Loads the compiled CUDA module, if this install has one, and registers its FFI targets with XLA."""

from __future__ import annotations

import functools
import logging
import os

import jax

try:
    from jaxq import _jaxq_cuda
except ImportError:  # CPU-only install: nvcc was not found at build time.
    _jaxq_cuda = None

_log = logging.getLogger("jaxq")

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
