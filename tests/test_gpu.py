"""CUDA kernels vs their jnp reference (run on the CPU), bit for bit, outputs poisoned first.

Needs a GPU and a CUDA build: ``pytest -m gpu``; skipped otherwise (conftest)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from helpers import assert_bits_equal, random_activations

pytestmark = pytest.mark.gpu

M_VALUES = [1, 7, 128, 4097]
K_VALUES = [128, 7168]


def _on(device_kind, f, *args):
    device = jax.devices(device_kind)[0]
    return jax.jit(f)(*[jax.device_put(a, device) for a in args])


def _compare(f, *args):
    got = _on("cuda", f, *args)
    want = _on("cpu", f, *args)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert_bits_equal(np.asarray(g), np.asarray(w), f"output {i}")


def test_poisoning_is_on_and_kernels_are_used():
    assert os.environ.get("JAXQ_POISON_OUTPUTS") == "1"
    x = jnp.ones((4, 128), jnp.bfloat16)
    text = jax.jit(lambda x: jaxq.per_token_group_fp8_quant(x, 128)).lower(jax.device_put(x, jax.devices("cuda")[0])).as_text()
    assert "jaxq_per_token_group_quant" in text


GROUP_VARIANTS = {
    "fp8_row": dict(),
    "fp8_row_ue8m0": dict(scale_ue8m0=True),
    "fp8_col": dict(column_major_scales=True),
    "fp8_col_tma_ue8m0": dict(column_major_scales=True, tma_aligned_scales=True, scale_ue8m0=True),
    "int8_row": dict(out_dtype=jnp.int8),
}


@pytest.mark.parametrize("variant", list(GROUP_VARIANTS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_group_quant_kernel(m, k, dtype, variant):
    x = random_activations(np.random.default_rng(m * k), (m, k), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, 128, **GROUP_VARIANTS[variant]), x)


@pytest.mark.parametrize("group_size", [16, 32, 96, 1024, 3072])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_group_quant_kernel_group_sizes(group_size, dtype):
    if group_size * jnp.dtype(dtype).itemsize % 16:
        pytest.skip("group size too small for this dtype")
    x = random_activations(np.random.default_rng(group_size), (2, 3, 33, 3072), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, group_size, column_major_scales=True, tma_aligned_scales=True), x)
    _compare(lambda x: jaxq.per_token_group_fp8_quant(x, group_size, out_dtype=jnp.int8), x)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("m", M_VALUES)
def test_packed_kernel(m, k, dtype, group_size):
    x = random_activations(np.random.default_rng(m + k), (m, k), dtype)
    _compare(lambda x: jaxq.per_token_group_fp8_quant_packed(x, group_size), x)


def test_packed_kernel_batched():
    x = random_activations(np.random.default_rng(11), (3, 5, 640), jnp.bfloat16)  # 5 groups: padding bytes
    _compare(jax.vmap(lambda x: jaxq.per_token_group_fp8_quant_packed(x, 128)), x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", K_VALUES + [80])
@pytest.mark.parametrize("m", M_VALUES)
def test_nvfp4_kernel(m, k, dtype):
    x = random_activations(np.random.default_rng(m * 3 + k), (m, k), dtype)
    gs = jnp.float32(448.0 * 6.0 / float(jnp.max(jnp.abs(x.astype(jnp.float32)))))
    _compare(jaxq.scaled_fp4_quant, x, gs)


def test_nvfp4_kernel_batched_global_scales():
    x = random_activations(np.random.default_rng(12), (3, 130, 256), jnp.bfloat16)
    _compare(jax.vmap(jaxq.scaled_fp4_quant), x, jnp.asarray([0.5, 3.0, 2000.0], jnp.float32))


def test_disable_switch_lowers_to_reference(monkeypatch):
    monkeypatch.setenv("JAXQ_DISABLE_KERNELS", "scaled_fp4_quant")
    x = jax.device_put(jnp.ones((4, 32), jnp.bfloat16), jax.devices("cuda")[0])
    text = jax.jit(lambda x: jaxq.scaled_fp4_quant(x, jnp.float32(1.0))).lower(x).as_text()
    assert "jaxq_scaled_fp4_quant" not in text
