"""The op mechanism on a toy op that needs what the GEMM families will: a reduction factor (K-sharded
partial products summed with psum), a vjp, leading-dim batching; and the kernel switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxq import _ffi
from jaxq._op import Op, ShardingRule


def _matmul_rule(params, operand_shapes, result_shapes):
    return ShardingRule(
        operands=((("m",), ("k",)), (("k",), ("n",))),
        results=((("m",), ("n",)),),
        reduction_factors=("k",),
    )


toy_matmul = Op(
    "toy_matmul",
    shapes=lambda a, b, *, scale: (jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[-1]), a.dtype),),
    reference=lambda a, b, *, scale: (scale * (a @ b),),
    sharding_rule=_matmul_rule,
    vjp=lambda args, cts, *, scale: (scale * cts[0] @ jnp.swapaxes(args[1], -1, -2), None),
)


def _inputs():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((16, 64)), jnp.float32), jnp.asarray(rng.standard_normal((64, 32)), jnp.float32))


@pytest.mark.parametrize(
    "a_spec,b_spec,reduces",
    [(P("a", None), P(None, "b"), False), (P(None, "a"), P("a", None), True), (P("b", "a"), P("a", None), True)],
)
def test_partitioning_including_reduction(a_spec, b_spec, reduces):
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    a, b = _inputs()
    f = jax.jit(lambda a, b: toy_matmul(a, b, scale=2.0)[0])
    args = (jax.device_put(a, NamedSharding(mesh, a_spec)), jax.device_put(b, NamedSharding(mesh, b_spec)))
    np.testing.assert_allclose(f(*args), 2.0 * np.asarray(a) @ np.asarray(b), rtol=1e-5, atol=1e-5)
    assert ("all-reduce" in f.lower(*args).compile().as_text()) == reduces


def test_vjp_and_batching():
    a, b = _inputs()
    grad = jax.grad(lambda a: toy_matmul(a, b, scale=3.0)[0].sum())(a)
    np.testing.assert_allclose(grad, 3.0 * np.ones((16, 32)) @ np.asarray(b).T, rtol=1e-5)
    batched = jax.vmap(lambda a: toy_matmul(a, b, scale=1.0)[0])(jnp.stack([a, 2 * a]))
    np.testing.assert_allclose(batched[1], 2 * np.asarray(a) @ np.asarray(b), rtol=1e-5, atol=1e-5)


def test_kernel_switch(monkeypatch):
    monkeypatch.setattr(_ffi, "REGISTERED_TARGETS", frozenset({"target"}))
    monkeypatch.delenv(_ffi.DISABLE_ENV, raising=False)
    assert _ffi.kernel_enabled("op", "target")
    assert not _ffi.kernel_enabled("op", "missing")
    assert not _ffi.kernel_enabled("op", None)
    monkeypatch.setenv(_ffi.DISABLE_ENV, "other, op")
    assert not _ffi.kernel_enabled("op", "target")
    monkeypatch.setenv(_ffi.DISABLE_ENV, "all")
    assert not _ffi.kernel_enabled("op", "target")
    monkeypatch.setenv(_ffi.DISABLE_ENV, "other")
    assert _ffi.kernel_enabled("op", "target")
