"""W8A8 GEMMs with scales: ``cutlass_scaled_mm`` and ``cutlass_scaled_mm_azp`` (vLLM's semantics).

``D = s_a * (s_b * acc) + bias``, rounded once to ``out_dtype`` (bfloat16 or float16), where ``acc = A @ B``
accumulated in int32 (int8 inputs) or float32 (float8_e4m3fn inputs), the products and the multiply-add in
float32 in that order, as vLLM's CUTLASS epilogues compute them. Scales are float32:

* ``scale_a``: per-tensor ``()`` / ``[1]``, or per-token ``[M, 1]``;
* ``scale_b``: per-tensor ``()`` / ``[1]``, or per-channel ``[1, N]``;
* block-wise (fp8 only, DeepSeek-V3 style): ``scale_a [M, K/128]`` and ``scale_b [K/128, N/128]``; then
  ``acc`` is a float32 sum over 128-wide K blocks of ``s_a[m, kb] * s_b[kb, n // 128] * (A_kb @ B_kb)``
  and ``D = acc + bias``.

Asymmetric int8 activations (``cutlass_scaled_mm_azp``): ``acc - azp_adj`` (per-tensor zero point, already
folded into ``azp_adj``) or ``acc - azp * azp_adj`` (per-token ``azp [M]``), in int32, before the scales.
``azp_adj[n] = sum_k B[k, n]`` (times the per-tensor zero point): see :func:`cutlass_azp_adj`.

``b`` is the logical ``[K, N]`` operand, as in vLLM. The kernels read it column-major (K fastest) and ask XLA
for that layout, so a weight stored ``[N, K]`` and passed as ``w.T`` reaches the kernel with no transpose; a
row-major ``[K, N]`` array gets one copy per call from XLA.

On CUDA (sm_90a) these run CUTLASS 3.x warp-specialized TMA kernels (``csrc/kernels/scaled_mm_sm90.cuh``;
tile shapes by M bucket: vLLM's up to M = 64, measured ones above). For per-tensor / per-token / per-channel
scales the epilogue applies the scales, zero points and bias; for block-wise scales the mainloop applies each
K block's scales as it accumulates, and XLA hands the kernel ``scale_a`` column-major (M fastest, the layout
DeepGEMM-style quantizers write). The block-wise kernel reads ``scale_a`` with TMA, which needs M % 4 == 0:
other M are padded to the next multiple of 4 (rows of zeros, sliced off the result; about M * K bytes copied).
Gradients with respect to int8/fp8 operands are not meaningful: asking for one raises.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq._op import Op, ShardingRule, map_batching

BLOCK = 128
_BLOCK_M_ALIGNMENT = 4  # block-wise: the kernel's TMA reads scale_a's columns, M floats each, 16-byte aligned
_OPERAND_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
_OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _operand_names(has_bias, azp, **_):
    names = ["a", "b", "scale_a", "scale_b"]
    if azp != "none":
        names.append("azp_adj")
    if azp == "token":
        names.append("azp")
    if has_bias:
        names.append("bias")
    return names


def _unpack(args, params):
    named = dict(zip(_operand_names(**params), args))
    return named["a"], named["b"], named["scale_a"], named["scale_b"], named.get("azp_adj"), named.get("azp"), named.get("bias")


def _reference(*args, out_dtype, has_bias, azp, block, fast_accum):
    a, b, scale_a, scale_b, azp_adj, azp_values, bias = _unpack(args, dict(has_bias=has_bias, azp=azp))
    m, k = a.shape
    n = b.shape[1]
    if block:
        kb = k // BLOCK
        partial = jnp.einsum("mbk,bkn->bmn", a.reshape(m, kb, BLOCK), b.reshape(kb, BLOCK, n),
                             preferred_element_type=jnp.float32)
        sb = jnp.repeat(scale_b, BLOCK, axis=1)[:, :n]  # [kb, N]
        scaled = scale_a.T[:, :, None] * (sb[:, None, :] * partial)  # [kb, M, N]
        d = scaled[0]
        for i in range(1, kb):  # blocks in K order, as the kernels accumulate them
            d = d + scaled[i]
    else:
        if jnp.dtype(a.dtype) == jnp.dtype(jnp.int8):
            acc = jnp.dot(a, b, preferred_element_type=jnp.int32)
            if azp == "tensor":
                acc = acc - azp_adj[None, :]
            elif azp == "token":
                acc = acc - azp_values[:, None] * azp_adj[None, :]
            acc = acc.astype(jnp.float32)
        else:
            acc = jnp.dot(a, b, preferred_element_type=jnp.float32)
        sa = scale_a.reshape(-1, 1) if scale_a.size > 1 else scale_a.reshape(1, 1)
        sb = scale_b.reshape(1, -1) if scale_b.size > 1 else scale_b.reshape(1, 1)
        d = sa * (sb * acc)
    if has_bias:
        d = d + bias.astype(jnp.float32)[None, :]
    return (d.astype(out_dtype),)


def _shapes(a, b, *rest, out_dtype, **params):
    return (jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), out_dtype),)


def _scale_dims(shape, major: str, one: str):
    """Dims of a scale that is per-tensor (``()``, ``[1]``), or per-row/column of ``major``."""
    if len(shape) == 0:
        return ()
    if len(shape) == 1:
        return ((one,),)
    return ((major,), (one,)) if shape[1] == 1 else ((one,), (major,))


def _sharding_rule(params, operand_shapes, result_shapes) -> ShardingRule:
    names = _operand_names(**params)
    shapes = dict(zip(names, operand_shapes))
    if params["block"]:
        k_dims, n_dims = ("kb", "kk"), ("nb", "nn")
        dims = {
            "a": (("m",), k_dims), "b": (k_dims, n_dims),
            "scale_a": (("m",), ("kb",)), "scale_b": (("kb",), ("nb",)),
            "bias": (n_dims,),
        }
        sizes = {"kk": BLOCK, "nn": BLOCK}
    else:
        k_dims, n_dims = ("k",), ("n",)
        dims = {
            "a": (("m",), k_dims), "b": (k_dims, n_dims),
            "scale_a": _scale_dims(shapes["scale_a"], "m", "one_a"),
            "scale_b": _scale_dims(shapes["scale_b"], "n", "one_b"),
            "azp_adj": (n_dims,), "azp": (("m",),), "bias": (n_dims,),
        }
        sizes = {}
    # Every shard keeps the kernels' 16-byte rows, and block-wise the 16-byte column stride of scale_a.
    granularity = {"m": _BLOCK_M_ALIGNMENT} if params["block"] else {"k": 16, "n": 16}
    return ShardingRule(
        operands=tuple(dims[name] for name in names),
        results=((("m",), n_dims),),
        factor_sizes=sizes,
        reduction_factors=(k_dims[0],),
        replicated_factors=("one_a", "one_b"),
        granularity=granularity,
    )


def _once(has_bias, azp, **_):
    """Bias and the zero-point correction enter a K-split sum once."""
    names = _operand_names(has_bias=has_bias, azp=azp)
    return tuple(i for i, name in enumerate(names) if name in ("bias", "azp_adj"))


def _batching(op, args, dims, **params):
    """vmap over the activation side (a, its scales, its zero points) folds into M; anything else maps."""
    names = _operand_names(**params)
    row_side = {"a", "scale_a", "azp"}
    if any(d is not None for name, d in zip(names, dims) if name not in row_side):
        return map_batching(op, args, dims, **params)
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    named = dict(zip(names, args))
    a = jnp.moveaxis(named["a"], dims[0], 0)
    m = a.shape[1]

    def rows(name, x, d):  # -> [size * M, ...]
        if d is None:
            return jnp.broadcast_to(x, (size, *x.shape)).reshape(size * m, *x.shape[1:])
        x = jnp.moveaxis(x, d, 0)
        if name == "scale_a" and x[0].size == 1:  # a scale per batch entry becomes one per row
            x = jnp.broadcast_to(x.reshape(size, 1, 1), (size, m, 1))
        return x.reshape(size * m, *x.shape[2:])

    folded = []
    for name, x, d in zip(names, args, dims):
        if name == "a":
            folded.append(a.reshape(size * m, a.shape[2]))
        elif name == "scale_a" and d is None and x.size == 1:
            folded.append(x)  # per-tensor stays per-tensor
        elif name in row_side:
            folded.append(rows(name, x, d))
        else:
            folded.append(x)
    out = op.bind(*folded, **params)[0]
    return (out.reshape(size, m, out.shape[-1]),), (0,)


def _ffi_attributes(has_bias, azp, block, fast_accum, **_):
    return dict(has_azp_adj=azp != "none", has_azp=azp == "token", has_bias=has_bias, block_scales=block,
                fast_accum=fast_accum)


def _operand_layouts(has_bias, azp, block, **_):
    """``b`` column-major (minor-to-major ``(0, 1)``: K fastest), and block-wise ``scale_a`` (M fastest);
    everything else row-major."""
    column_major = {"b", "scale_a"} if block else {"b"}
    return [(0, 1) if name in column_major else None for name in _operand_names(has_bias=has_bias, azp=azp)]


_scaled_mm = Op(
    "cutlass_scaled_mm",
    shapes=_shapes,
    reference=_reference,
    ffi_target="jaxq_scaled_mm",
    ffi_attributes=_ffi_attributes,
    ffi_operand_layouts=_operand_layouts,
    sharding_rule=_sharding_rule,
    batching_rule=_batching,
    once_operands=_once,
)


def _check_scale(fn, name, scale, per: int, per_shape):
    if not hasattr(scale, "dtype") or jnp.dtype(scale.dtype) != jnp.dtype(jnp.float32):
        raise TypeError(f"{fn}: {name} must be float32; got {getattr(scale, 'dtype', type(scale).__name__)}")
    if tuple(scale.shape) not in ((), (1,), (1, 1), per_shape):
        raise ValueError(f"{fn}: {name} must be per-tensor (shape () or (1,)) or have shape {per_shape}; "
                         f"got {tuple(scale.shape)}")


def _prepare(fn, a, b, scale_a, scale_b, out_dtype, bias):
    for name, x in (("a", a), ("b", b)):
        if not hasattr(x, "dtype") or jnp.dtype(x.dtype) not in _OPERAND_DTYPES:
            raise TypeError(f"{fn}: {name} must be int8 or float8_e4m3fn; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2:
            raise ValueError(f"{fn}: {name} must be 2-d; got shape {tuple(x.shape)}")
    if jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
        raise TypeError(f"{fn}: a ({jnp.dtype(a.dtype).name}) and b ({jnp.dtype(b.dtype).name}) must have one dtype")
    (m, k), (kb, n) = a.shape, b.shape
    if kb != k:
        raise ValueError(f"{fn}: a {tuple(a.shape)} and b {tuple(b.shape)} do not share K")
    if k % 16 or n % 16:
        raise ValueError(f"{fn}: K ({k}) and N ({n}) must be multiples of 16 (the kernels' 16-byte alignment)")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{fn}: out_dtype must be bfloat16 or float16; got {out_dtype.name}")
    # Block-wise when scale_b is [K/128, ceil(N/128)] and not a per-tensor or per-channel shape (for one
    # 128 x 128 block the forms coincide and so does the math).
    block = (hasattr(scale_b, "shape") and len(scale_b.shape) == 2 and k % BLOCK == 0
             and tuple(scale_b.shape) == (k // BLOCK, -(-n // BLOCK)) and tuple(scale_b.shape) not in ((1, 1), (1, n)))
    if block:
        if jnp.dtype(a.dtype) != jnp.dtype(jnp.float8_e4m3fn):
            raise ValueError(f"{fn}: block-wise scales need float8_e4m3fn operands, not int8")
        for name, s, shape in (("scale_a", scale_a, (m, k // BLOCK)), ("scale_b", scale_b, (k // BLOCK, -(-n // BLOCK)))):
            if not hasattr(s, "dtype") or jnp.dtype(s.dtype) != jnp.dtype(jnp.float32) or tuple(s.shape) != shape:
                raise ValueError(f"{fn}: block-wise {name} must be float32 {shape}; got "
                                 f"{getattr(s, 'dtype', None)} {tuple(getattr(s, 'shape', ()))}")
    else:
        _check_scale(fn, "scale_a", scale_a, m, (m, 1))
        _check_scale(fn, "scale_b", scale_b, n, (1, n))
    if bias is not None:
        if not hasattr(bias, "dtype") or jnp.dtype(bias.dtype) != out_dtype or tuple(bias.shape) != (n,):
            raise ValueError(f"{fn}: bias must be {out_dtype.name} of shape ({n},); got "
                             f"{getattr(bias, 'dtype', None)} {tuple(getattr(bias, 'shape', ()))}")
    return out_dtype, block


def cutlass_scaled_mm(a, b, scale_a, scale_b, out_dtype, bias=None, *, use_fast_accum=False):
    """``D[M, N] = s_a * (s_b * (a @ b)) + bias`` in ``out_dtype`` (see the module docstring).

    Args:
      a: int8 or float8_e4m3fn ``[M, K]``.
      b: the same dtype, logical ``[K, N]`` (pass a ``[N, K]`` weight as ``w.T``).
      scale_a: float32 ``()``/``[1]`` or ``[M, 1]``; block-wise (fp8): ``[M, K/128]``.
      scale_b: float32 ``()``/``[1]`` or ``[1, N]``; block-wise: ``[K/128, ceil(N/128)]``.
      out_dtype: bfloat16 or float16.
      bias: optional ``[N]`` in ``out_dtype``.
      use_fast_accum: fp8 with per-tensor/token/channel scales only (as ``torch._scaled_mm``'s flag and the
        schedule vLLM's kernels use). Above M = 64 rows the CUDA kernel then leaves the whole K sum in the
        tensor core's accumulator, whose additions are narrower than float32: faster where the GEMM is
        compute-bound, less accurate for long K (see benchmarks/RESULTS.md for the measured error). Up to 64
        rows, and in the reference lowering, the sums stay float32 either way.
    """
    fn = "cutlass_scaled_mm"
    out_dtype, block = _prepare(fn, a, b, scale_a, scale_b, out_dtype, bias)
    if not isinstance(use_fast_accum, bool):
        raise TypeError(f"{fn}: use_fast_accum must be a bool; got {use_fast_accum!r}")
    if use_fast_accum and (block or jnp.dtype(a.dtype) != jnp.dtype(jnp.float8_e4m3fn)):
        raise ValueError(f"{fn}: use_fast_accum applies to float8_e4m3fn operands without block-wise scales "
                         f"(int8 sums are exact; block-wise scales are applied per K block)")
    m = a.shape[0]
    pad = -m % _BLOCK_M_ALIGNMENT if block else 0
    if pad:
        a, scale_a = (jnp.pad(x, ((0, pad), (0, 0))) for x in (a, scale_a))
    operands = [a, b, scale_a, scale_b] + ([bias] if bias is not None else [])
    out = _scaled_mm(*operands, out_dtype=out_dtype, has_bias=bias is not None, azp="none", block=block,
                     fast_accum=use_fast_accum)[0]
    return out[:m] if pad else out


def cutlass_scaled_mm_azp(a, b, scale_a, scale_b, out_dtype, azp_adj, azp=None, bias=None):
    """Asymmetric int8 activations: ``D = s_a * (s_b * (a @ b - azp ⊗ azp_adj)) + bias``.

    Args:
      a, b: int8 (``b`` logical ``[K, N]``); scales as for :func:`cutlass_scaled_mm` (no block-wise form).
      azp_adj: int32 ``[N]`` from :func:`cutlass_azp_adj`: column sums of ``b``, already multiplied by the
        per-tensor zero point when ``azp`` is None.
      azp: optional int32 ``[M]`` per-token zero points.
      bias: optional ``[N]`` in ``out_dtype``.
    """
    fn = "cutlass_scaled_mm_azp"
    if hasattr(a, "dtype") and jnp.dtype(a.dtype) != jnp.dtype(jnp.int8):
        raise TypeError(f"{fn}: asymmetric activations need int8 a and b; got {jnp.dtype(a.dtype).name}")
    out_dtype, block = _prepare(fn, a, b, scale_a, scale_b, out_dtype, bias)
    m, n = a.shape[0], b.shape[1]
    if not hasattr(azp_adj, "dtype") or jnp.dtype(azp_adj.dtype) != jnp.dtype(jnp.int32) or tuple(azp_adj.shape) != (n,):
        raise ValueError(f"{fn}: azp_adj must be int32 of shape ({n},)")
    if azp is not None and (not hasattr(azp, "dtype") or jnp.dtype(azp.dtype) != jnp.dtype(jnp.int32)
                            or tuple(azp.shape) != (m,)):
        raise ValueError(f"{fn}: azp must be int32 of shape ({m},)")
    operands = [a, b, scale_a, scale_b, azp_adj] + ([azp] if azp is not None else []) + ([bias] if bias is not None else [])
    return _scaled_mm(*operands, out_dtype=out_dtype, has_bias=bias is not None,
                      azp="token" if azp is not None else "tensor", block=False, fast_accum=False)[0]


def cutlass_azp_adj(b, azp=None) -> jax.Array:
    """``azp_adj`` for :func:`cutlass_scaled_mm_azp`: int32 column sums of the int8 ``b [K, N]``, times the
    per-tensor zero point ``azp`` (a Python or 0-d int) when given (leave it out for per-token zero points)."""
    if not hasattr(b, "dtype") or jnp.dtype(b.dtype) != jnp.dtype(jnp.int8) or b.ndim != 2:
        raise TypeError("cutlass_azp_adj: b must be a 2-d int8 array")
    sums = jnp.sum(b.astype(jnp.int32), axis=0)
    return sums if azp is None else sums * jnp.asarray(azp, jnp.int32)
