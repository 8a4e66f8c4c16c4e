"""Quantized drop-in replacements for ``flax.nnx.Linear``.

Each layer is called like ``nnx.Linear`` (``layer(x)`` with ``x [..., in_features]``, optional
``out_sharding``) and returns ``[..., out_features]`` in the dtype ``nnx.Linear`` would: ``out_dtype`` when
given (``from_linear`` passes the linear's ``dtype``), else x's (promoted with the linear's ``param_dtype``
when it was made ``from_linear`` of a linear without a ``dtype``). The arithmetic runs in the layer's
``dtype`` (float16 or bfloat16, the dtype of its scales and of its bias): other input dtypes are cast to it
on the way in and the result is cast to the output's.

Quantized tensors are :class:`QuantizedWeight` variables, not ``nnx.Param``: ``nnx.grad`` and optimizers
that follow ``nnx.Param`` leave them alone, while gradients reach the input and the float parameters next
to them (bias, LoRA adapters). Asking for the gradient of a quantized tensor raises
``jaxq.NotDifferentiableError`` (float tensors: scales, fp8 weights) or JAX's error for integer inputs.

Every variable carries sharding metadata (``out_sharding``, as ``nnx.with_partitioning`` writes it) built
from ``kernel_axes = (in_axis, out_axis)``, the axes of the float kernel ``[in, out]`` it replaces: a packed
dimension gets the axis of the dimension it packs (``qweight [K, N/8]`` of a column-parallel AWQ layer is
sharded along its second dimension). ``nnx.get_partition_spec`` then gives the specs for ``jax.jit``;
a mesh axis must divide the packed sizes (N/8 words, K/G groups), which the ops' sharding rules also need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq import formats
from jaxq._op import NotDifferentiableError
from jaxq.ops.awq import awq_gemm
from jaxq.ops.gptq import gptq_gemm, gptq_shuffle
from jaxq.ops import marlin
from jaxq.ops.group_quant import per_token_fp8_quant_xla, per_token_group_fp8_quant
from jaxq.ops.nvfp4 import BLOCK as NVFP4_BLOCK, E2M1_VALUES, scaled_fp4_quant, unswizzle_block_scales
from jaxq.ops.scaled_mm import cutlass_azp_adj, cutlass_scaled_mm, cutlass_scaled_mm_azp

COMPUTE_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SCALE_DTYPES = COMPUTE_DTYPES + (jnp.dtype(jnp.float32),)  # float tensors a checkpoint may store in any of these
FP8_MAX = 448.0
BLOCK = 128  # fp8 block-wise weights: 128 x 128 blocks; activations: 1 x 128 groups
_EPS = 1e-10  # floor of an amax, so all-zero rows and columns quantize to zeros instead of NaN


# Compiled once per shape: quantizing a model op by op would spend seconds compiling each small op.
_quantize_awq = jax.jit(formats.quantize_awq, static_argnums=1)
_quantize_gptq = jax.jit(formats.quantize_gptq, static_argnums=(1, 2), static_argnames=("symmetric", "v2_format"))
_gptq_shuffle = jax.jit(gptq_shuffle, static_argnums=2)
_azp_adj = jax.jit(lambda weight: cutlass_azp_adj(weight.T))
_argsort = jax.jit(functools.partial(jnp.argsort, stable=True))
_gptq_marlin_repack = jax.jit(marlin.gptq_marlin_repack, static_argnames=("size_k", "size_n", "num_bits"))
_awq_marlin_repack = jax.jit(marlin.awq_marlin_repack, static_argnames=("size_k", "size_n", "num_bits"))
_marlin_permute_scales = jax.jit(marlin.marlin_permute_scales, static_argnames=("size_k", "size_n", "group_size"))
_awq_to_marlin_zero_points = jax.jit(marlin.awq_to_marlin_zero_points, static_argnames=("size_k", "size_n", "num_bits"))


@functools.partial(jax.jit, static_argnums=2)
def _nvfp4_marlin_tensors(packed, scale, dtype) -> dict:
    """compressed-tensors' NVFP4 ``weight_packed [out, in/2]`` and ``weight_scale [out, in/16]`` as vLLM prepares
    them for marlin_gemm (:func:`jaxq.marlin_fp4_weight`'s steps)."""
    k, n = 2 * packed.shape[1], packed.shape[0]
    permuted = marlin.marlin_permute_scales(scale.T.astype(dtype), size_k=k, size_n=n, group_size=NVFP4_BLOCK)
    return {"weight_packed": marlin.marlin_fp4_repack(packed),
            "weight_scale": marlin.nvfp4_marlin_process_scales(permuted)}


class QuantizedWeight(nnx.Variable):
    """A frozen tensor of a quantized layer: packed weights, zeros, scales, group indices."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    """What a layer's quantized tensor must be: shape, dtype, and per dimension ``"in"``, ``"out"`` or None
    for the kernel axis its sharding follows."""

    shape: tuple[int, ...]
    dtype: jnp.dtype
    layout: tuple[str | None, ...]


def sharding_axes(variable) -> tuple | None:
    """The mesh axes a variable was annotated with (``nnx.with_partitioning``), or None."""
    metadata = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):  # flax 0.12, 0.11, 0.10 spellings
        if metadata.get(key) is not None:
            return tuple(metadata[key])
    return None


def annotated(cls, value, axes: tuple | None):
    """``cls(value)`` with sharding metadata ``axes`` (none when ``axes`` is None). Eager sharding only when
    a mesh is set (``jax.set_mesh``), so that layers can be built and quantized without one."""
    if axes is None or all(a is None for a in axes):
        return cls(value)
    eager = getattr(nnx, "use_eager_sharding", None)
    scope = eager(not jax.sharding.get_abstract_mesh().empty) if eager else contextlib.nullcontext()
    with scope:
        return cls(nnx.with_partitioning(lambda *_: value, axes)(None, value.shape, value.dtype))


def _check_features(cls_name: str, name: str, value, multiple: int = 1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % multiple:
        raise ValueError(f"{cls_name}: {name} must be a positive int{f' multiple of {multiple}' if multiple > 1 else ''}; "
                         f"got {value!r}")


def _group_size(cls_name: str, group_size, in_features: int) -> int:
    g = in_features if group_size == -1 else group_size
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0 or in_features % g or g % 32:
        raise ValueError(f"{cls_name}: group_size {group_size!r} must divide in_features={in_features} and be a "
                         "multiple of 32 (or -1: one group)")
    return int(g)


def _compute_dtype(cls_name: str, dtype) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in COMPUTE_DTYPES:
        raise TypeError(f"{cls_name}: dtype must be bfloat16 or float16; got {dtype.name}")
    return dtype


class QuantizedLinear(nnx.Module):
    """What the quantized layers share: shapes, bias, the call, tensor assignment with checks.

    A layer class defines ``tensor_specs() -> {name: Tensor}`` (its quantized tensors) and
    ``_matmul(rows [M, in] in dtype, bias [out] or None) -> [M, out]``."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, kernel_axes, out_dtype=None):
        name = type(self).__name__
        _check_features(name, "in_features", in_features)
        _check_features(name, "out_features", out_features)
        if kernel_axes is not None and len(tuple(kernel_axes)) != 2:
            raise ValueError(f"{name}: kernel_axes must be (in_axis, out_axis); got {kernel_axes!r}")
        self.in_features, self.out_features, self.use_bias = int(in_features), int(out_features), bool(use_bias)
        self.dtype = _compute_dtype(name, dtype)
        self.kernel_axes = None if kernel_axes is None else tuple(kernel_axes)
        # The output's dtype: out_dtype, or the input's promoted with promote_dtype (None: the input's). from_linear
        # copies nnx.Linear's rule: its dtype when set, else the input's promoted with its param_dtype.
        self.out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
        self.promote_dtype = None
        for tensor_name, spec in self.tensor_specs().items():
            setattr(self, tensor_name, annotated(QuantizedWeight, jnp.zeros(spec.shape, spec.dtype),
                                                 self._axes(spec.layout)))
        self.bias = (annotated(nnx.Param, jnp.zeros((self.out_features,), self.dtype), self._axes(("out",)))
                     if self.use_bias else None)

    def _axes(self, layout) -> tuple | None:
        if self.kernel_axes is None:
            return None
        by_role = {"in": self.kernel_axes[0], "out": self.kernel_axes[1], None: None}
        return tuple(by_role[role] for role in layout)

    def assign(self, name: str, value, *, what: str | None = None):
        """Replaces quantized tensor (or ``bias``) ``name`` by ``value`` after checking its shape and dtype;
        errors name ``what`` (e.g. the checkpoint tensor) when given."""
        value, spec = self._checked(name, value, what)
        setattr(self, name, annotated(nnx.Param if name == "bias" else QuantizedWeight, value, self._axes(spec.layout)))

    def _checked(self, name: str, value, what: str | None, spec: Tensor | None = None) -> tuple[jax.Array, Tensor]:
        """``value`` as tensor ``name`` of this layer (the bias cast to ``dtype``), and its spec (``spec`` when
        given: a checkpoint tensor the layer converts); raises if its shape or dtype is not the spec's."""
        label = what or f"{type(self).__name__}.{name}"
        if spec is None and name == "bias":
            if not self.use_bias:
                raise ValueError(f"{label}: the layer has no bias (use_bias=False)")
            spec = Tensor((self.out_features,), self.dtype, ("out",))
        elif spec is None:
            specs = self.tensor_specs()
            if name not in specs:
                raise KeyError(f"{label}: {type(self).__name__} has no tensor {name!r} (it has {sorted(specs)})")
            spec = specs[name]
        value = jnp.asarray(value)
        if tuple(value.shape) != spec.shape:
            raise ValueError(f"{label}: expected shape {spec.shape}; got {tuple(value.shape)}")
        if name == "bias":
            value = value.astype(self.dtype)
        elif jnp.dtype(value.dtype) in SCALE_DTYPES and jnp.dtype(spec.dtype) in SCALE_DTYPES:
            # Writers store scales in their own float type (AutoGPTQ/AutoAWQ float16, compressed-tensors the
            # weight's dtype): cast, as vLLM does when it loads them.
            value = value.astype(spec.dtype)
        elif jnp.dtype(value.dtype) != jnp.dtype(spec.dtype):
            raise TypeError(f"{label}: expected dtype {jnp.dtype(spec.dtype).name}; got {jnp.dtype(value.dtype).name}")
        return value, spec

    def __call__(self, inputs, out_sharding=None):
        name = type(self).__name__
        if not hasattr(inputs, "shape") or not jnp.issubdtype(inputs.dtype, jnp.floating):
            raise TypeError(f"{name}: inputs must be a float array; got {getattr(inputs, 'dtype', type(inputs).__name__)}")
        if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"{name}: inputs {tuple(inputs.shape)} must end in in_features={self.in_features}")
        rows = inputs.reshape(-1, self.in_features).astype(self.dtype)
        bias = self.bias[...] if self.bias is not None else None
        out_dtype = self.out_dtype or (inputs.dtype if self.promote_dtype is None
                                       else jnp.promote_types(inputs.dtype, self.promote_dtype))
        out = self._matmul(rows, bias).reshape(*inputs.shape[:-1], self.out_features).astype(out_dtype)
        if out_sharding is not None:
            out = jax.lax.with_sharding_constraint(out, out_sharding)
        return out

    @classmethod
    def _source(cls, linear) -> tuple[jax.Array, jax.Array | None, dict]:
        """(kernel ``[in, out]``, bias or None, constructor arguments) of an ``nnx.Linear``; the quantized
        layer computes in the linear's ``dtype`` when that is float16 or bfloat16, else in bfloat16."""
        if not isinstance(linear, nnx.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nnx.Linear; got {type(linear).__name__}")
        kernel = linear.kernel[...]
        bias = linear.bias[...] if linear.bias is not None else None
        dtype = linear.dtype if linear.dtype is not None and jnp.dtype(linear.dtype) in COMPUTE_DTYPES else jnp.bfloat16
        return kernel, bias, dict(in_features=linear.in_features, out_features=linear.out_features,
                                  use_bias=bias is not None, dtype=dtype, kernel_axes=sharding_axes(linear.kernel),
                                  out_dtype=linear.dtype)

    def _follow_promotion(self, linear):
        """After from_linear: an nnx.Linear without a dtype returns its input promoted with its param_dtype."""
        if linear.dtype is None:
            self.promote_dtype = jnp.dtype(linear.param_dtype)
        return self

    def checkpoint_specs(self) -> dict[str, Tensor]:
        """The tensors a checkpoint of this layer holds (by default the ones it stores)."""
        return self.tensor_specs()

    def set_checkpoint_tensors(self, *, names: dict | None = None, **tensors):
        """Fills the layer from its checkpoint tensors (``checkpoint_specs``); ``names`` maps a tensor to the
        name errors give (the checkpoint's)."""
        names = names or {}
        for name in self.checkpoint_specs():
            self.assign(name, tensors[name], what=names.get(name))

    def checkpoint_tensors(self) -> dict[str, jax.Array]:
        """The checkpoint tensors: the inverse of :meth:`set_checkpoint_tensors`, bit for bit."""
        return {name: getattr(self, name)[...] for name in self.checkpoint_specs()}

    def _fill(self, tensors: dict, bias):
        for name, value in tensors.items():
            self.assign(name, value)
        if bias is not None:
            self.assign("bias", bias)
        return self


# --------------------------------------------------------------------------------- weight-only (W4A16)


BACKENDS = ("kernel", "marlin")


def _check_backend(cls_name: str, backend: str):
    if backend not in BACKENDS:
        raise ValueError(f"{cls_name}: backend must be one of {BACKENDS}; got {backend!r}")


def _check_marlin_shape(cls_name: str, in_features: int, out_features: int, group_size: int):
    """What ``marlin_gemm`` needs of a layer: whole 16 x 64 tiles and one of its group sizes."""
    if in_features % marlin.TILE_K or out_features % marlin.TILE_N:
        raise ValueError(f"{cls_name}: backend='marlin' needs in_features a multiple of {marlin.TILE_K} and "
                         f"out_features a multiple of {marlin.TILE_N}; got {in_features} x {out_features}")
    if group_size != in_features and group_size not in marlin.GROUP_SIZES:
        raise ValueError(f"{cls_name}: backend='marlin' takes group sizes {[g for g in marlin.GROUP_SIZES if g > 0]} "
                         f"or one group (in_features); got {group_size}")


class AWQLinear(QuantizedLinear):
    """A linear layer with an AutoAWQ 4-bit weight (asymmetric, group-wise).

    ``backend="kernel"``: ``awq_gemm``; tensors in AutoAWQ's names and layouts, ``qweight`` int32
    ``[in, out/8]``, ``qzeros`` int32 ``[in/G, out/8]``, ``scales`` ``[in/G, out]`` in ``dtype``; ``out_features``
    a multiple of 8. ``backend="marlin"``: ``marlin_gemm`` (``uint4`` with zero points), the checkpoint
    repacked when it is set (:func:`jaxq.awq_marlin_repack`): ``qweight`` int32 ``[in/16, 2*out]``, ``qzeros``
    ``[in/G, out/8]`` and ``scales`` in the Marlin orders; ``in_features`` a multiple of 16, ``out_features`` of
    64. Either way :meth:`set_checkpoint_tensors` / :meth:`checkpoint_tensors` speak AutoAWQ's layout.
    """

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 128, use_bias: bool = True,
                 dtype=jnp.bfloat16, kernel_axes=None, backend: str = "kernel", out_dtype=None):
        name = type(self).__name__
        _check_backend(name, backend)
        _check_features(name, "out_features", out_features, 8)
        self.group_size = _group_size(name, group_size, in_features)
        if backend == "marlin":
            _check_marlin_shape(name, in_features, out_features, self.group_size)
        self.backend = backend
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_axes=kernel_axes,
                         out_dtype=out_dtype)

    def checkpoint_specs(self):
        """AutoAWQ's tensors."""
        k, n, groups = self.in_features, self.out_features, self.in_features // self.group_size
        return {"qweight": Tensor((k, n // 8), jnp.int32, ("in", "out")),
                "qzeros": Tensor((groups, n // 8), jnp.int32, ("in", "out")),
                "scales": Tensor((groups, n), self.dtype, ("in", "out"))}

    def tensor_specs(self):
        specs = self.checkpoint_specs()
        if self.backend == "marlin":
            specs["qweight"] = Tensor((self.in_features // 16, self.out_features * 2), jnp.int32, ("in", "out"))
        return specs

    def _matmul(self, rows, bias):
        if self.backend == "marlin":
            out = marlin.marlin_gemm(rows, self.qweight[...], self.scales[...], b_q_type="uint4",
                                     b_zeros=self.qzeros[...])
        else:
            out = awq_gemm(rows, self.qweight[...], self.scales[...], self.qzeros[...])
        return out if bias is None else out + bias

    def set_checkpoint_tensors(self, qweight, qzeros, scales, *, names: dict | None = None):
        """Fills the layer from AutoAWQ tensors (repacked for ``backend="marlin"``)."""
        names = names or {}
        specs = self.checkpoint_specs()
        checked = {name: self._checked(name, value, names.get(name), specs[name])[0]
                   for name, value in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales))}
        if self.backend == "marlin":
            k, n, groups = self.in_features, self.out_features, self.in_features // self.group_size
            checked["qweight"] = _awq_marlin_repack(checked["qweight"], size_k=k, size_n=n, num_bits=4)
            checked["qzeros"] = _awq_to_marlin_zero_points(checked["qzeros"], size_k=groups, size_n=n, num_bits=4)
            checked["scales"] = _marlin_permute_scales(checked["scales"], size_k=k, size_n=n,
                                                       group_size=self.group_size)
        for name, value in checked.items():
            self.assign(name, value)

    def checkpoint_tensors(self) -> dict[str, jax.Array]:
        """AutoAWQ's ``qweight``, ``qzeros``, ``scales``: the inverse of :meth:`set_checkpoint_tensors`, bit for bit."""
        if self.backend != "marlin":
            return super().checkpoint_tensors()
        k = self.in_features
        return {"qweight": formats.pack_awq(marlin.marlin_unpack(self.qweight[...], 4)),
                "qzeros": formats.pack_awq(marlin.marlin_unpack_zero_points(self.qzeros[...], 4)),
                "scales": marlin.marlin_unpermute_scales(self.scales[...], size_k=k, group_size=self.group_size)}

    @classmethod
    def from_linear(cls, linear, *, group_size: int = 128, dtype=None, backend: str = "kernel"):
        """Quantizes an ``nnx.Linear`` by round-to-nearest (asymmetric, as AutoAWQ stores it; no activation-
        aware scaling search)."""
        kernel, bias, args = cls._source(linear)
        args["dtype"] = args["dtype"] if dtype is None else dtype
        layer = cls(**args, group_size=group_size, backend=backend)
        qweight, scales, qzeros = _quantize_awq(kernel.astype(layer.dtype), layer.group_size)
        layer.set_checkpoint_tensors(qweight, qzeros, scales)
        return layer._fill({}, bias)._follow_promotion(linear)


class GPTQLinear(QuantizedLinear):
    """A linear layer with an AutoGPTQ weight of 2, 3, 4 or 8 bits.

    ``backend="kernel"``: ``gptq_gemm`` on the exllama layout. Tensors: ``qweight`` int32 ``[in*bits/32, out]``
    (:func:`jaxq.gptq_shuffle` of the checkpoint's, rows in ``perm`` order under act-order), ``qzeros`` int32
    ``[groups, out*bits/32]``, ``scales`` ``[groups, out]``, ``g_idx`` int32 ``[in]`` (the checkpoint's group
    of each input row) and, with ``act_order``, ``perm = argsort(g_idx)`` int32 ``[in]`` (vLLM's convention;
    empty otherwise). ``backend="marlin"`` (4 or 8 bits, symmetric; ``in_features`` a multiple of 16,
    ``out_features`` of 64): ``marlin_gemm`` (``uint4b8`` / ``uint8b128``), ``qweight`` int32
    ``[in/16, out*bits/2]`` from :func:`jaxq.gptq_marlin_repack` and ``scales`` in the Marlin order; no
    ``qzeros`` (a symmetric checkpoint's are a constant, checked when set and written back when saved).
    :meth:`set_checkpoint_tensors` / :meth:`checkpoint_tensors` speak AutoGPTQ's layout for both.
    ``v2_format``: zeros stored as they are rather than minus one (AutoGPTQ's ``checkpoint_format``).
    ``symmetric`` only records how the weight was quantized (the checkpoint config's ``sym``).
    Act-order: GPTQ numbers each row's group by the row's place in its quantization order, so the rows sorted by
    ``g_idx`` fall into consecutive groups of ``group_size`` rows (``contiguous_groups``, found when the tensors
    are set). Then ``backend="marlin"`` runs ``marlin_gemm`` without act-order on the activations' columns in
    ``perm`` order (the same weight and result; its faster forms: scales folded at few rows, the Hopper kernel),
    as exllama's layout always does; a ``g_idx`` of other group sizes runs ``marlin_gemm``'s act-order form and
    is refused by ``backend="kernel"`` (exllama's layout cannot hold it).
    ``checkpoint_format``: how :mod:`jaxq.nn.checkpoint` names and lays out the tensors, ``"gptq"``
    (AutoGPTQ) or ``"compressed-tensors"`` (``pack-quantized``: the same integers as ``[out, ...]``
    transposes, stored as signed values offset by ``2**(bits-1)``; its zeros are always v2).
    """

    CHECKPOINT_FORMATS = ("gptq", "compressed-tensors")

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, group_size: int = 128,
                 act_order: bool = False, v2_format: bool = False, symmetric: bool = True, use_bias: bool = True,
                 dtype=jnp.bfloat16, kernel_axes=None, checkpoint_format: str = "gptq", backend: str = "kernel",
                 out_dtype=None):
        name = type(self).__name__
        _check_backend(name, backend)
        if bits not in formats.GPTQ_BITS:
            raise ValueError(f"{name}: bits must be one of {formats.GPTQ_BITS}; got {bits!r}")
        if checkpoint_format not in self.CHECKPOINT_FORMATS:
            raise ValueError(f"{name}: checkpoint_format must be one of {self.CHECKPOINT_FORMATS}; "
                             f"got {checkpoint_format!r}")
        if checkpoint_format == "compressed-tensors" and not v2_format:
            raise ValueError(f"{name}: compressed-tensors zeros are stored as they are: pass v2_format=True")
        self.checkpoint_format = checkpoint_format
        _check_features(name, "in_features", in_features, 32)
        _check_features(name, "out_features", out_features, 32 // np.gcd(32, bits))
        self.bits, self.act_order, self.v2_format = int(bits), bool(act_order), bool(v2_format)
        self.symmetric = bool(symmetric)
        self.contiguous_groups = False  # until set_checkpoint_tensors finds them (the act-order form is always right)
        self.group_size = _group_size(name, group_size, in_features)
        self.backend = backend
        if backend == "marlin":
            _check_marlin_shape(name, in_features, out_features, self.group_size)
            self._check_marlin_weights(self.bits, self.symmetric)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_axes=kernel_axes,
                         out_dtype=out_dtype)

    def _check_marlin_weights(self, bits: int, symmetric: bool):
        if bits not in (4, 8) or not symmetric:
            raise ValueError(f"{type(self).__name__}: backend='marlin' runs symmetric 4- and 8-bit GPTQ weights; "
                             f"got bits={bits}, symmetric={symmetric} (use backend='kernel')")

    def checkpoint_specs(self):
        """AutoGPTQ's tensors (``g_idx`` as stored; no ``perm``)."""
        k, n, b, groups = self.in_features, self.out_features, self.bits, self.in_features // self.group_size
        return {"qweight": Tensor((k * b // 32, n), jnp.int32, ("in", "out")),
                "qzeros": Tensor((groups, n * b // 32), jnp.int32, ("in", "out")),
                "scales": Tensor((groups, n), self.dtype, ("in", "out")),
                "g_idx": Tensor((k,), jnp.int32, (None,))}

    def tensor_specs(self):
        specs = self.checkpoint_specs()
        specs["perm"] = Tensor((self.in_features if self.act_order else 0,), jnp.int32, (None,))
        if self.backend == "marlin":
            del specs["qzeros"]
            specs["qweight"] = Tensor((self.in_features // 16, self.out_features * self.bits // 2), jnp.int32,
                                      ("in", "out"))
        return specs

    def _matmul(self, rows, bias):
        if self.backend == "marlin":
            perm = self.perm[...]
            act_order = {}
            if self.act_order and self.contiguous_groups:
                rows = marlin.permute_columns(rows, perm)  # the weight's row i: input row perm[i], group i // G
            elif self.act_order:
                act_order = dict(g_idx=self.g_idx[...][perm], perm=perm)
            out = marlin.marlin_gemm(rows, self.qweight[...], self.scales[...],
                                     b_q_type="uint4b8" if self.bits == 4 else "uint8b128", **act_order)
        else:
            out = gptq_gemm(rows, self.qweight[...], self.qzeros[...], self.scales[...], self.perm[...],
                            use_exllama=True, use_v2_format=self.v2_format, bits=self.bits)
        return out if bias is None else out + bias

    def _symmetric_zeros(self) -> jax.Array:
        """The ``qzeros`` of a symmetric checkpoint: ``2**(bits-1)``, minus one unless ``v2_format``."""
        zero = (1 << (self.bits - 1)) - (0 if self.v2_format else 1)
        groups = self.in_features // self.group_size
        return formats.pack_gptq(jnp.full((groups, self.out_features), zero, jnp.int32), self.bits, axis=1)

    def configure_storage(self, *, act_order: bool, v2_format: bool, symmetric: bool):
        """Adopts a checkpoint's storage settings (before :meth:`set_checkpoint_tensors`)."""
        if self.backend == "marlin":
            self._check_marlin_weights(self.bits, symmetric)
        self.v2_format, self.symmetric = bool(v2_format), bool(symmetric)
        if bool(act_order) != self.act_order:
            self.act_order = bool(act_order)
            spec = self.tensor_specs()["perm"]
            self.perm = annotated(QuantizedWeight, jnp.zeros(spec.shape, spec.dtype), self._axes(spec.layout))

    def set_checkpoint_tensors(self, qweight, qzeros, scales, g_idx, *, names: dict | None = None):
        """Fills the layer from AutoGPTQ tensors in the checkpoint layout (rows in input order, not
        shuffled): shuffles ``qweight`` for the exllama kernel, under act-order into ``argsort(g_idx)`` order."""
        names = names or {}
        specs = self.checkpoint_specs()
        g_idx = jnp.asarray(g_idx)
        self.assign("g_idx", g_idx, what=names.get("g_idx"))
        groups = self.in_features // self.group_size
        rows_group = np.asarray(g_idx)
        bad = np.flatnonzero((rows_group < 0) | (rows_group >= groups))
        if bad.size:
            raise ValueError(f"{names.get('g_idx', type(self).__name__ + '.g_idx')}: entries must be groups in "
                             f"[0, {groups}); row {bad[0]} has {int(rows_group[bad[0]])} ({bad.size} such rows)")
        self.contiguous_groups = bool(np.array_equal(np.sort(rows_group), np.arange(self.in_features) // self.group_size))
        if self.act_order and not self.contiguous_groups and self.backend == "kernel":
            sizes = np.bincount(rows_group, minlength=groups)
            uneven = int(np.flatnonzero(sizes != self.group_size)[0])
            raise ValueError(f"{names.get('g_idx', type(self).__name__ + '.g_idx')}: act-order group {uneven} has "
                             f"{sizes[uneven]} rows, not group_size={self.group_size}: exllama's layout "
                             "(backend='kernel') needs whole groups; backend='marlin' reads any g_idx")
        perm = _argsort(g_idx).astype(jnp.int32) if self.act_order else jnp.zeros((0,), jnp.int32)
        self.assign("perm", perm)
        qweight, _ = self._checked("qweight", qweight, names.get("qweight"), specs["qweight"])  # before the repack
        qzeros, _ = self._checked("qzeros", qzeros, names.get("qzeros"), specs["qzeros"])
        scales, _ = self._checked("scales", scales, names.get("scales"), specs["scales"])
        if self.backend == "marlin":
            if not np.array_equal(np.asarray(qzeros), np.asarray(self._symmetric_zeros())):
                raise ValueError(f"{names.get('qzeros', type(self).__name__ + '.qzeros')}: backend='marlin' runs "
                                 "symmetric weights, and these zero points are not the symmetric constant")
            k, n = self.in_features, self.out_features
            self.assign("qweight", _gptq_marlin_repack(qweight, perm, size_k=k, size_n=n, num_bits=self.bits))
            self.assign("scales", _marlin_permute_scales(scales, size_k=k, size_n=n, group_size=self.group_size))
            return
        self.assign("qweight", _gptq_shuffle(qweight, perm, self.bits))
        self.assign("qzeros", qzeros)
        self.assign("scales", scales)

    def checkpoint_tensors(self) -> dict[str, jax.Array]:
        """``qweight`` (checkpoint layout: unshuffled, rows in input order), ``qzeros``, ``scales``,
        ``g_idx``: the inverse of :meth:`set_checkpoint_tensors`, bit for bit."""
        if self.backend == "marlin":
            values = marlin.marlin_unpack(self.qweight[...], self.bits)
            qzeros = self._symmetric_zeros()
            scales = marlin.marlin_unpermute_scales(self.scales[...], size_k=self.in_features,
                                                    group_size=self.group_size)
        else:
            values = formats.unpack_gptq(formats.exllama_unshuffle(self.qweight[...], self.bits), self.bits, axis=0)
            qzeros, scales = self.qzeros[...], self.scales[...]
        if self.act_order:  # row i of the shuffled weight is input row perm[i]
            values = jnp.zeros_like(values).at[self.perm[...]].set(values)
        return {"qweight": formats.pack_gptq(values, self.bits, axis=0), "qzeros": qzeros, "scales": scales,
                "g_idx": self.g_idx[...]}

    @classmethod
    def from_linear(cls, linear, *, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                    act_order=None, v2_format: bool = False, dtype=None, checkpoint_format: str = "gptq",
                    backend: str = "kernel"):
        """Quantizes an ``nnx.Linear`` by round-to-nearest into AutoGPTQ tensors.

        ``act_order``: None, or a permutation of the input rows (the order GPTQ would visit them, e.g.
        by decreasing Hessian diagonal); rows are then grouped by their position in it (``g_idx``), as in
        ``desc_act`` checkpoints.
        """
        kernel, bias, args = cls._source(linear)
        args["dtype"] = args["dtype"] if dtype is None else dtype
        layer = cls(**args, bits=bits, group_size=group_size, act_order=act_order is not None, v2_format=v2_format,
                    symmetric=symmetric, checkpoint_format=checkpoint_format, backend=backend)
        if act_order is not None:
            perm = np.asarray(act_order)
            if perm.shape != (layer.in_features,) or not np.array_equal(np.sort(perm), np.arange(layer.in_features)):
                raise ValueError(f"{cls.__name__}.from_linear: act_order must be a permutation of "
                                 f"range({layer.in_features})")
        qweight, qzeros, scales, g_idx = _quantize_gptq(
            kernel.astype(layer.dtype), bits, layer.group_size, symmetric=symmetric,
            act_order=None if act_order is None else jnp.asarray(act_order), v2_format=v2_format)
        layer.set_checkpoint_tensors(qweight, qzeros, scales, g_idx)
        return layer._fill({}, bias)._follow_promotion(linear)


# ------------------------------------------------------------------------------------------------ W8A8


def _frozen_weight_matmul(forward: Callable, dequantized: Callable):
    """``forward(rows, bias, *weights)`` whose gradient reaches ``rows`` (``dy @ dequantized(*weights)``, the
    quantization of the activations taken as the identity: a straight-through estimator) and ``bias``
    (None or ``[out]``). A gradient asked of a weight tensor raises ``NotDifferentiableError``."""

    @jax.custom_vjp
    def call(rows, bias, *weights):
        return forward(rows, bias, *weights)

    def fwd(rows, bias, *weights):
        if any(w.perturbed for w in weights):
            raise NotDifferentiableError("jaxq.nn: quantized weights and their scales are frozen; differentiate "
                                         "the inputs and float parameters (nnx.Param) only")
        args = (rows.value, None if bias is None else bias.value) + tuple(w.value for w in weights)
        return forward(*args), args

    def bwd(args, dy):
        rows, bias, *weights = args
        if isinstance(dy, jax.custom_derivatives.SymbolicZero):
            dy = jnp.zeros((rows.shape[0], dy.aval.shape[-1]), rows.dtype)
        w = dequantized(*weights)  # [out, in] float32
        dx = jnp.dot(dy.astype(jnp.float32), w, preferred_element_type=jnp.float32).astype(rows.dtype)
        dbias = None if bias is None else jnp.sum(dy.astype(jnp.float32), axis=0).astype(bias.dtype)
        return (dx, dbias) + tuple(None for _ in weights)

    call.defvjp(fwd, bwd, symbolic_zeros=True)
    return call


def _per_channel_scales(w_out_in, q_max):
    amax = jnp.max(jnp.abs(w_out_in), axis=1, keepdims=True)
    return (jnp.maximum(amax, _EPS) / q_max).astype(jnp.float32)  # [out, 1]


def _block_scales(scale, n):
    """``[ceil(n/128), in/128]`` block scales -> ``[n, in]``, each block's scale on each of its elements."""
    return jnp.repeat(jnp.repeat(scale, BLOCK, axis=0)[:n], BLOCK, axis=1)


def _fp8(values):
    return jnp.clip(values, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


class Fp8Linear(QuantizedLinear):
    """fp8 (e4m3fn) weights: W8A8 through ``cutlass_scaled_mm``, or weight-only through ``marlin_gemm``.

    ``block=False``: tensors ``weight`` float8_e4m3fn ``[out, in]`` and ``weight_scale`` float32 ``[out, 1]``
    (one scale per output channel, compressed-tensors' names); each token is quantized with its own scale
    (``per_token_group_fp8_quant`` with one group of all ``in`` features: ``s = max(|x|, 1e-10) / 448``).
    ``block=True`` (DeepSeek-V3 style): ``weight_scale_inv`` float32 ``[ceil(out/128), in/128]``, one scale
    per 128 x 128 block (``in`` a multiple of 128), activations in 1 x 128 groups.
    ``in_features`` and ``out_features`` must be multiples of 16.

    ``weight_only=True`` (what vLLM runs for fp8 checkpoints on GPUs without fp8 tensor cores; on Hopper it
    keeps activations in 16 bits): the same checkpoint tensors, stored for ``marlin_gemm``: ``weight`` int32
    ``[in/16, 4*out]`` (:func:`jaxq.marlin_fp8_repack`), the float32 scale kept for saving, and
    ``marlin_scales`` ``[groups, out]`` in ``dtype`` (groups 1 per channel, ``in/128`` for blocks, each block's
    scale repeated over its 128 columns) with vLLM's exponent-bias fold (:func:`jaxq.marlin_fp8_scales`).
    The scales are rounded to ``dtype`` there, as vLLM does. ``out_features`` must be a multiple of 64.
    """

    def __init__(self, in_features: int, out_features: int, *, block: bool = False, weight_only: bool = False,
                 use_bias: bool = True, dtype=jnp.bfloat16, kernel_axes=None, out_dtype=None):
        name = type(self).__name__
        _check_features(name, "in_features", in_features, BLOCK if block else 16)
        _check_features(name, "out_features", out_features, 16)
        self.block, self.weight_only = bool(block), bool(weight_only)
        if self.weight_only:
            _check_marlin_shape(name, in_features, out_features, BLOCK if block else in_features)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_axes=kernel_axes,
                         out_dtype=out_dtype)

    @property
    def _scale_name(self) -> str:
        return "weight_scale_inv" if self.block else "weight_scale"

    def checkpoint_specs(self):
        k, n = self.in_features, self.out_features
        specs = {"weight": Tensor((n, k), jnp.float8_e4m3fn, ("out", "in"))}
        if self.block:
            specs["weight_scale_inv"] = Tensor((-(-n // BLOCK), k // BLOCK), jnp.float32, ("out", "in"))
        else:
            specs["weight_scale"] = Tensor((n, 1), jnp.float32, ("out", None))
        return specs

    def tensor_specs(self):
        specs = self.checkpoint_specs()
        if self.weight_only:
            k, n = self.in_features, self.out_features
            specs["weight"] = Tensor((k // 16, 4 * n), jnp.int32, ("in", "out"))
            specs["marlin_scales"] = (Tensor((k // BLOCK, n), self.dtype, ("in", "out")) if self.block
                                      else Tensor((1, n), self.dtype, (None, "out")))
        return specs

    def set_checkpoint_tensors(self, *, names: dict | None = None, **tensors):
        """Fills the layer from the checkpoint's ``weight`` and scale (repacked for ``weight_only``)."""
        names = names or {}
        checked = {name: self._checked(name, tensors[name], names.get(name), spec)[0]
                   for name, spec in self.checkpoint_specs().items()}
        if self.weight_only:
            checked["marlin_scales"] = _marlin_fp8_scales(checked[self._scale_name], self.block, self.out_features,
                                                          self.dtype)
            checked["weight"] = _marlin_fp8_repack(checked["weight"].T)
        for name, value in checked.items():
            self.assign(name, value)

    def checkpoint_tensors(self) -> dict[str, jax.Array]:
        if not self.weight_only:
            return super().checkpoint_tensors()
        codes = marlin.marlin_unpack(self.weight[...], 8).astype(jnp.uint8)
        return {"weight": jax.lax.bitcast_convert_type(codes, jnp.float8_e4m3fn).T,
                self._scale_name: getattr(self, self._scale_name)[...]}

    def _scale(self):
        return getattr(self, self._scale_name)[...]

    def _dequantized(self, weight, scale):
        return weight.astype(jnp.float32) * (_block_scales(scale, weight.shape[0]) if self.block else scale)

    def _matmul(self, rows, bias):
        if self.weight_only:
            out = marlin.marlin_gemm(rows, self.weight[...], self.marlin_scales[...], b_q_type="float8_e4m3fn")
            return out if bias is None else out + bias
        # A row-parallel layer's input is sharded along K: quantized by XLA's ops, its per-token maxima are
        # added across shards; the kernel, whose group is the whole row, would have each row gathered first.
        row_parallel = not self.block and self.kernel_axes is not None and self.kernel_axes[0] is not None

        def forward(rows, bias, weight, scale):
            if row_parallel:
                q, s = per_token_fp8_quant_xla(rows)
            else:
                q, s = per_token_group_fp8_quant(rows, BLOCK if self.block else self.in_features)
            return cutlass_scaled_mm(q, weight.T, s, scale.T, rows.dtype, bias)

        return _frozen_weight_matmul(forward, self._dequantized)(rows, bias, self.weight[...], self._scale())

    @classmethod
    def from_linear(cls, linear, *, block: bool = False, weight_only: bool = False, dtype=None):
        """Quantizes an ``nnx.Linear``: per output channel (or per 128 x 128 block) ``s = amax / 448``,
        ``weight = fp8(w / s)`` with round-to-nearest-even."""
        kernel, bias, args = cls._source(linear)
        args["dtype"] = args["dtype"] if dtype is None else dtype
        layer = cls(**args, block=block, weight_only=weight_only)
        weight, scale = (_fp8_blocks if block else _fp8_channels)(kernel)
        layer.set_checkpoint_tensors(**{"weight": weight, layer._scale_name: scale})
        return layer._fill({}, bias)._follow_promotion(linear)


_marlin_fp8_repack = jax.jit(marlin.marlin_fp8_repack)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _marlin_fp8_scales(scale, block: bool, n: int, dtype):
    """The float32 checkpoint scale as ``marlin_gemm``'s fp8 scales: ``[1, n]`` per channel, or a block's
    scale for each of its columns, ``[k/128, n]``."""
    groups = jnp.repeat(scale, BLOCK, axis=0)[:n].T if block else scale.T
    return marlin.marlin_fp8_scales(groups.astype(dtype), size_k=scale.shape[1] * BLOCK if block else 1,
                                    group_size=BLOCK if block else -1)


@jax.jit
def _fp8_channels(kernel):
    w = kernel.astype(jnp.float32).T  # [out, in]
    scale = _per_channel_scales(w, FP8_MAX)
    return _fp8(w / scale), scale


@jax.jit
def _fp8_blocks(kernel):
    w = kernel.astype(jnp.float32).T
    n, k = w.shape
    padded = jnp.pad(w, ((0, -n % BLOCK), (0, 0)))
    blocks = padded.reshape(padded.shape[0] // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = (jnp.maximum(jnp.max(jnp.abs(blocks), axis=(1, 3)), _EPS) / FP8_MAX).astype(jnp.float32)
    return _fp8(w / _block_scales(scale, n)), scale


@jax.jit
def _int8_channels(kernel):
    w = kernel.astype(jnp.float32).T
    scale = _per_channel_scales(w, 127.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


class NVFP4Linear(QuantizedLinear):
    """NVFP4 weights (NVIDIA's 4-bit e2m1 values, one fp8-e4m3 scale per 16 inputs, a float32 global scale)
    with 16-bit activations: weight-only, as vLLM runs NVFP4 checkpoints on GPUs without FP4 tensor cores.

    Checkpoint tensors, in compressed-tensors' ``nvfp4-pack-quantized`` names: ``weight_packed`` uint8
    ``[out, in/2]`` (input ``2j`` in the low nibble, ``2j + 1`` in the high one), ``weight_scale``
    float8_e4m3fn ``[out, in/16]`` and ``weight_global_scale`` float32 ``[1]``, so that
    ``W[o, i] = e2m1(code[o, i]) * weight_scale[o, i // 16] / weight_global_scale`` (the global scale divides,
    as in vLLM's ``scaled_fp4_quant``). NVIDIA ModelOpt checkpoints (``quant_algo: NVFP4``) name them
    ``weight``, ``weight_scale`` and ``weight_scale_2 = 1 / weight_global_scale``: ``checkpoint_format=
    "modelopt"`` reads and writes those.

    ``backend="marlin"`` (default; ``in_features`` a multiple of 32, ``out_features`` of 64): ``marlin_gemm``
    with ``float4_e2m1f`` weights, the tensors kept as vLLM prepares them (:func:`jaxq.marlin_fp4_weight`:
    ``weight_packed`` int32 ``[in/16, 2*out]``, ``weight_scale`` ``[in/16, out]`` bytes) but the global scale in
    float32, unrounded. ``backend="dequantize"`` (``in_features`` a multiple of 16): the checkpoint's tensors as
    they are, W dequantized to ``dtype`` and multiplied by XLA's dot (float32 sums).
    """

    CHECKPOINT_FORMATS = ("compressed-tensors", "modelopt")
    BACKENDS = ("marlin", "dequantize")

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True, dtype=jnp.bfloat16,
                 kernel_axes=None, checkpoint_format: str = "compressed-tensors", backend: str = "marlin",
                 out_dtype=None):
        name = type(self).__name__
        _check_features(name, "in_features", in_features, NVFP4_BLOCK)
        if checkpoint_format not in self.CHECKPOINT_FORMATS:
            raise ValueError(f"{name}: checkpoint_format must be one of {self.CHECKPOINT_FORMATS}; "
                             f"got {checkpoint_format!r}")
        if backend not in self.BACKENDS:
            raise ValueError(f"{name}: backend must be one of {self.BACKENDS}; got {backend!r}")
        if backend == "marlin" and (in_features % (2 * NVFP4_BLOCK) or out_features % marlin.TILE_N):
            raise ValueError(f"{name}: backend='marlin' needs in_features a multiple of {2 * NVFP4_BLOCK} and "
                             f"out_features a multiple of {marlin.TILE_N}; got {in_features} x {out_features} "
                             f"(backend='dequantize' takes any multiple of {NVFP4_BLOCK} inputs)")
        self.checkpoint_format, self.backend = checkpoint_format, backend
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_axes=kernel_axes,
                         out_dtype=out_dtype)

    def _compressed_tensors_specs(self):
        k, n = self.in_features, self.out_features
        return {"weight_packed": Tensor((n, k // 2), jnp.uint8, ("out", "in")),
                "weight_scale": Tensor((n, k // NVFP4_BLOCK), jnp.float8_e4m3fn, ("out", "in")),
                "weight_global_scale": Tensor((1,), jnp.float32, (None,))}

    def tensor_specs(self):
        specs = self._compressed_tensors_specs()
        if self.backend == "marlin":
            k, n = self.in_features, self.out_features
            specs["weight_packed"] = Tensor((k // marlin.TILE_K, 2 * n), jnp.int32, ("in", "out"))
            specs["weight_scale"] = Tensor((k // NVFP4_BLOCK, n), jnp.float8_e4m3fn, ("in", "out"))
        return specs

    def checkpoint_specs(self):
        specs = self._compressed_tensors_specs()
        if self.checkpoint_format == "modelopt":
            specs = {"weight": specs["weight_packed"], "weight_scale": specs["weight_scale"],
                     "weight_scale_2": Tensor((), jnp.float32, ())}
        return specs

    def set_checkpoint_tensors(self, *, names: dict | None = None, **tensors):
        """Fills the layer from its checkpoint's tensors (ModelOpt's global scale is the reciprocal)."""
        names = names or {}
        if self.checkpoint_format == "modelopt" and jnp.size(tensors["weight_scale_2"]) == 1:
            tensors = dict(tensors, weight_scale_2=jnp.reshape(tensors["weight_scale_2"], ()))  # [] or [1] in files
        checked = {name: self._checked(name, tensors[name], names.get(name), spec)[0]
                   for name, spec in self.checkpoint_specs().items()}
        if self.checkpoint_format == "modelopt":
            checked = {"weight_packed": checked["weight"], "weight_scale": checked["weight_scale"],
                       "weight_global_scale": jnp.reshape(1.0 / checked["weight_scale_2"], (1,))}
        self._store(checked)

    def _store(self, checked: dict):
        """Assigns compressed-tensors' tensors, prepared for Marlin under that backend."""
        if self.backend == "marlin":
            checked = dict(checked, **_nvfp4_marlin_tensors(checked["weight_packed"], checked["weight_scale"],
                                                            self.dtype))
        for name, value in checked.items():
            self.assign(name, value)

    def _compressed_tensors(self) -> dict[str, jax.Array]:
        """The stored tensors in compressed-tensors' layout: the inverse of :meth:`_store`, bit for bit."""
        packed, scale = self.weight_packed[...], self.weight_scale[...]
        if self.backend == "marlin":
            codes = marlin.marlin_unpack(packed, 4).T
            packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(jnp.uint8)
            scale = marlin.marlin_fp4_scale_values(scale).T.astype(jnp.float8_e4m3fn)
        return {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": self.weight_global_scale[...]}

    def checkpoint_tensors(self) -> dict[str, jax.Array]:
        tensors = self._compressed_tensors()
        if self.checkpoint_format != "modelopt":
            return tensors
        return {"weight": tensors["weight_packed"], "weight_scale": tensors["weight_scale"],
                "weight_scale_2": jnp.reshape(1.0 / tensors["weight_global_scale"], ())}

    @staticmethod
    def _dequantized(packed, scale, global_scale):
        """W ``[out, in]`` float32 from compressed-tensors' tensors."""
        codes = jnp.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
        values = jnp.asarray(E2M1_VALUES)[codes.astype(jnp.int32)]
        per_block = scale.astype(jnp.float32) / global_scale.reshape(())
        return values * jnp.repeat(per_block, NVFP4_BLOCK, axis=1)

    def _matmul(self, rows, bias):
        if self.backend == "marlin":
            global_scale = 1.0 / self.weight_global_scale[...]
            out = marlin.marlin_gemm(rows, self.weight_packed[...], self.weight_scale[...], b_q_type="float4_e2m1f",
                                     global_scale=global_scale)
            return out if bias is None else out + bias

        def forward(rows, bias, packed, scale, global_scale):
            w = self._dequantized(packed, scale, global_scale).astype(rows.dtype)
            out = jnp.dot(rows, w.T, preferred_element_type=jnp.float32)
            return (out if bias is None else out + bias.astype(jnp.float32)).astype(rows.dtype)

        weights = (self.weight_packed[...], self.weight_scale[...], self.weight_global_scale[...])
        return _frozen_weight_matmul(forward, self._dequantized)(rows, bias, *weights)

    @classmethod
    def from_linear(cls, linear, *, dtype=None, checkpoint_format: str = "compressed-tensors",
                    backend: str = "marlin"):
        """Quantizes an ``nnx.Linear`` to NVFP4 as vLLM's ``scaled_fp4_quant`` does, row by row of W^T:
        ``global = 448 * 6 / max|W|``, a block's scale ``fp8(max|block| / 6 * global)``, values rounded to
        e2m1."""
        kernel, bias, args = cls._source(linear)
        args["dtype"] = args["dtype"] if dtype is None else dtype
        layer = cls(**args, checkpoint_format=checkpoint_format, backend=backend)
        layer._store(_nvfp4_checkpoint(kernel, layer.dtype))
        return layer._fill({}, bias)._follow_promotion(linear)


@functools.partial(jax.jit, static_argnums=1)
def _nvfp4_checkpoint(kernel, dtype) -> dict:
    """compressed-tensors' NVFP4 tensors of a float kernel ``[in, out]`` (NVFP4Linear.from_linear)."""
    w = kernel.T.astype(dtype)  # [out, in]
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)))
    global_scale = (448.0 * 6.0 / jnp.maximum(amax, 1e-12)).astype(jnp.float32)
    packed, swizzled = scaled_fp4_quant(w, global_scale)
    return {"weight_packed": packed, "weight_scale": unswizzle_block_scales(swizzled, w.shape[0], w.shape[1]),
            "weight_global_scale": jnp.reshape(global_scale, (1,))}


def quantize_int8_per_token(rows, *, asymmetric: bool):
    """Dynamic int8 quantization of each row (vLLM's ``scaled_int8_quant`` math, round half to even).

    Symmetric: ``s = max(|x|) / 127``, ``q = round(x / s)``. Asymmetric: ``s = (max - min) / 255``,
    ``azp = round(-128 - min / s)``, ``q = clamp(round(x / s) + azp, -128, 127)`` so that
    ``x ~= s * (q - azp)``. Extremes are floored at 1e-10 so constant rows stay finite.
    Returns ``(q int8 [M, K], s float32 [M, 1], azp int32 [M] or None)``.
    """
    x = rows.astype(jnp.float32)
    if not asymmetric:
        s = jnp.maximum(jnp.max(jnp.abs(x), axis=1, keepdims=True), _EPS) / 127.0
        return jnp.clip(jnp.round(x / s), -128, 127).astype(jnp.int8), s, None
    lo = jnp.minimum(jnp.min(x, axis=1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=1, keepdims=True), 0.0)
    s = jnp.maximum(hi - lo, _EPS) / 255.0
    azp = jnp.round(-128.0 - lo / s)
    q = jnp.clip(jnp.round(x / s) + azp, -128, 127).astype(jnp.int8)
    return q, s, azp[:, 0].astype(jnp.int32)


class Int8Linear(QuantizedLinear):
    """W8A8 int8: per-output-channel weight scales, activations quantized per token on each call.

    Tensors: ``weight`` int8 ``[out, in]``, ``weight_scale`` float32 ``[out, 1]`` and, with ``azp=True``
    (asymmetric activations, run by ``cutlass_scaled_mm_azp``), ``azp_adj`` int32 ``[out]``: the weight's
    sums over ``in`` (:func:`jaxq.cutlass_azp_adj`). Activation quantization: :func:`quantize_int8_per_token`.
    ``in_features`` and ``out_features`` must be multiples of 16.
    """

    def __init__(self, in_features: int, out_features: int, *, azp: bool = False, use_bias: bool = True,
                 dtype=jnp.bfloat16, kernel_axes=None, out_dtype=None):
        name = type(self).__name__
        _check_features(name, "in_features", in_features, 16)
        _check_features(name, "out_features", out_features, 16)
        self.azp = bool(azp)
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, kernel_axes=kernel_axes,
                         out_dtype=out_dtype)

    def tensor_specs(self):
        k, n = self.in_features, self.out_features
        specs = {"weight": Tensor((n, k), jnp.int8, ("out", "in")),
                 "weight_scale": Tensor((n, 1), jnp.float32, ("out", None))}
        if self.azp:
            specs["azp_adj"] = Tensor((n,), jnp.int32, ("out",))
        return specs

    def _matmul(self, rows, bias):
        def forward(rows, bias, weight, scale, *azp_adj):
            q, s, azp = quantize_int8_per_token(rows, asymmetric=self.azp)
            if self.azp:
                return cutlass_scaled_mm_azp(q, weight.T, s, scale.T, rows.dtype, azp_adj[0], azp, bias)
            return cutlass_scaled_mm(q, weight.T, s, scale.T, rows.dtype, bias)

        weights = (self.weight[...], self.weight_scale[...]) + ((self.azp_adj[...],) if self.azp else ())
        return _frozen_weight_matmul(forward, lambda w, s, *_: w.astype(jnp.float32) * s)(rows, bias, *weights)

    def set_weight(self, weight, weight_scale, *, names: dict | None = None):
        """Fills ``weight`` and ``weight_scale`` (and ``azp_adj``, computed from the weight)."""
        names = names or {}
        self.assign("weight", weight, what=names.get("weight"))
        self.assign("weight_scale", weight_scale, what=names.get("weight_scale"))
        if self.azp:
            self.assign("azp_adj", _azp_adj(self.weight[...]))

    @classmethod
    def from_linear(cls, linear, *, azp: bool = False, dtype=None):
        """Quantizes an ``nnx.Linear`` symmetrically per output channel: ``s = amax / 127``,
        ``weight = round(w / s)``."""
        kernel, bias, args = cls._source(linear)
        args["dtype"] = args["dtype"] if dtype is None else dtype
        layer = cls(**args, azp=azp)
        layer.set_weight(*_int8_channels(kernel))
        return layer._fill({}, bias)._follow_promotion(linear)
