"""One mechanism that turns an op description into JAX primitives.

Every op is declared once as an :class:`Op`: its output shapes, its pure-jnp reference, its FFI target
and attributes, its Shardy sharding rule, and optionally a vjp and a batching rule. From that this
module builds, as TransformerEngine-JAX does:

* an *inner* primitive, device-local, lowered to the FFI custom call on CUDA (unless the kernel is
  missing or disabled with ``JAXQ_DISABLE_KERNELS``) and to the reference on every other platform;
* an *outer* primitive, the one users bind, lowered through ``custom_partitioning`` whose per-shard
  function binds the inner one (with a ``psum`` over mesh axes that shard a reduction factor).
  Batching sits on the outer primitive; so does the error for ops that are not differentiable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import dispatch, sharding_impls
from jax._src.core import ShapedArray
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from jaxq import _ffi

Dims = tuple[tuple[str, ...], ...]  # per array dimension, its factors, major first


@dataclasses.dataclass(frozen=True)
class ShardingRule:
    """The Shardy sharding rule of one call, with the constraints jaxq's partitioner enforces.

    ``operands`` and ``results`` give, per array and per dimension, the factor names of that dimension
    (several for a compound dimension such as a packed or grouped one, major first). Only the major
    factor of a dimension is ever sharded, so a mesh split never cuts a packed word or a group.
    """

    operands: tuple[Dims, ...]
    results: tuple[Dims, ...]
    factor_sizes: Mapping[str, int] = dataclasses.field(default_factory=dict)  # sizes of minor factors
    reduction_factors: tuple[str, ...] = ()  # sharded => per-shard results are summed with psum
    replicated_factors: tuple[str, ...] = ()  # never sharded in this call
    granularity: Mapping[str, int] = dataclasses.field(default_factory=dict)  # local size multiple of

    def einsum(self) -> str:
        def array(dims: Dims) -> str:
            return " ".join(f[0] if len(f) == 1 else "(" + " ".join(f) + ")" for f in dims)

        return ", ".join(map(array, self.operands)) + " -> " + ", ".join(map(array, self.results))

    def sdy_options(self, operand_shapes: Sequence[Sequence[int]], mesh_axis_sizes: Sequence[int]) -> dict[str, Any]:
        arrays = self.operands + self.results
        whole = {f[0] for dims in arrays for f in dims if len(f) == 1}
        compound_only = {f for dims in arrays for fs in dims if len(fs) > 1 for f in fs} - whole
        sizes = {**self.major_factor_sizes(operand_shapes), **self.factor_sizes}
        # Shardy wants the size of exactly those factors that never span a whole dimension.
        options: dict[str, Any] = {f: sizes[f] for f in sorted(compound_only)}
        # Only major factors are ever sharded (a split must not cut a packed word or a group), and only
        # evenly: Shardy would otherwise pad, which neither the kernels' layouts nor JAX's decoding of the
        # shardings allow.
        minor = {f for dims in arrays for fs in dims for f in fs[1:]}
        uneven = {
            f for f, n in self.major_factor_sizes(operand_shapes).items()
            if any(n % (a * self.granularity.get(f, 1)) for a in mesh_axis_sizes if a > 1)
        }
        # Shardy wants special factors in the order the rule first names them.
        order = list(dict.fromkeys(f for dims in arrays for fs in dims for f in fs))
        replicated = tuple(f for f in order if f in set(self.replicated_factors) | minor | uneven)
        # A factor that may not be split is not reduced over either (Shardy takes each in one set only).
        reduction = tuple(f for f in order if f in self.reduction_factors and f not in replicated)
        if reduction:
            options["reduction_factors"] = reduction
        if replicated:
            options["need_replication_factors"] = replicated
        return options

    def without_unit_factors(self, operand_shapes: Sequence[Sequence[int]]) -> "ShardingRule":
        """This rule with factors of size 1 taken out of compound dimensions, which Shardy rejects (one
        group spanning a whole row, say). A minor factor left first in its dimension stays unsplit."""
        sizes = {**self.major_factor_sizes(operand_shapes), **self.factor_sizes}
        promoted: set[str] = set()

        def strip(dims: Dims) -> Dims:
            out = []
            for factors in dims:
                if len(factors) > 1:
                    kept = tuple(f for f in factors if sizes.get(f) != 1) or factors[-1:]
                    if kept[0] != factors[0]:
                        promoted.add(kept[0])
                    factors = kept
                out.append(factors)
            return tuple(out)

        operands, results = tuple(map(strip, self.operands)), tuple(map(strip, self.results))
        if (operands, results) == (self.operands, self.results):
            return self
        return dataclasses.replace(self, operands=operands, results=results,
                                   replicated_factors=self.replicated_factors + tuple(sorted(promoted)))

    def major_factor_sizes(self, operand_shapes: Sequence[Sequence[int]]) -> dict[str, int]:
        sizes = {}
        for dims, shape in zip(self.operands, operand_shapes):
            for factors, extent in zip(dims, shape):
                minor = math.prod(self.factor_sizes[f] for f in factors[1:])
                sizes[factors[0]] = extent // minor
        return sizes


def _mesh_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _partition_spec(sharding, mesh) -> PartitionSpec:
    """The mesh-axis spec of an operand sharding handed to the partitioner.

    Shardings are decoded here rather than by custom_partitioning because Shardy may propose splits of
    a mesh axis into sub-axes that JAX cannot name; such operands are taken as replicated (the partition
    then asks for them replicated, and XLA reshards).
    """
    try:
        return sharding_impls.parse_flatten_op_sharding(sharding._hlo_sharding, mesh)[0]
    except (KeyError, ValueError, AssertionError):
        return PartitionSpec()


def _assign_mesh_axes(rule: ShardingRule, operand_shapes, operand_shardings, mesh) -> dict[str, tuple]:
    """Mesh axes for each factor: taken from the first operand dimension that is sharded along that
    factor, and kept only where every shard gets whole factors at the rule's granularity."""
    sizes = rule.major_factor_sizes(operand_shapes)
    assigned: dict[str, tuple[str, ...]] = {}
    used: set[str] = set()
    for dims, sharding in zip(rule.operands, operand_shardings):
        spec = tuple(_partition_spec(sharding, mesh))
        spec += (None,) * (len(dims) - len(spec))
        for factors, entry in zip(dims, spec):
            axes = _mesh_axes(entry)
            factor = factors[0]
            if not axes or factor in assigned or factor in rule.replicated_factors or used & set(axes):
                continue
            shards = math.prod(mesh.shape[a] for a in axes)
            if sizes[factor] % (shards * rule.granularity.get(factor, 1)) == 0:
                assigned[factor] = axes
                used.update(axes)
    return assigned


def _spec(dims: Dims, assigned: Mapping[str, tuple]) -> PartitionSpec:
    entries = []
    for factors in dims:
        axes = assigned.get(factors[0], ())
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _freeze(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


class NotDifferentiableError(TypeError):
    pass


class Op:
    """A jaxq operation: call it like a function of arrays with keyword parameters (static)."""

    def __init__(
        self,
        name: str,
        *,
        shapes: Callable[..., Sequence[jax.ShapeDtypeStruct]],
        reference: Callable[..., Sequence[jax.Array]],
        sharding_rule: Callable[..., ShardingRule],
        ffi_target: str | None = None,
        ffi_attributes: Callable[..., dict[str, Any]] | None = None,
        ffi_operand_layouts: Callable[..., Sequence[Sequence[int] | None]] | None = None,
        batching_rule: Callable | None = None,
        vjp: Callable | None = None,
        workspace: Callable[..., jax.ShapeDtypeStruct | None] | None = None,
        operand_names: Sequence[str] = (),
        grad_operands: Sequence[int] = (0,),
        once_operands: Sequence[int] | Callable[..., Sequence[int]] = (),
    ):
        """
        Args:
          name: the public op name (vLLM's); also what ``JAXQ_DISABLE_KERNELS`` matches.
          shapes: ``(*avals, **params) -> output ShapeDtypeStructs``; any leading batch dims included.
          reference: ``(*arrays, **params) -> outputs`` in pure jnp: the spec in code.
          sharding_rule: ``(params, operand_shapes, result_shapes) -> ShardingRule``.
          ffi_target: the CUDA FFI target registered by :mod:`jaxq._ffi` (None: the reference runs).
          ffi_attributes: ``(**params) -> FFI attributes`` (numpy scalars of the handler's types).
          ffi_operand_layouts: ``(**params) -> per operand, its minor-to-major dimension order (None:
            row-major)``: the layout XLA must hand the kernel, so that a transposed view costs no copy.
          batching_rule: ``(op, args, dims, **params) -> (outs, out_dims)``; the default treats all
            leading dimensions of every operand as batch dimensions (moved to the front, unbatched
            operands broadcast).
          vjp: ``(args, cotangents, **params) -> input cotangents`` (None for integer inputs). Without
            it the op is not differentiable and asking for a derivative raises.
          workspace: ``(*avals, **params) -> ShapeDtypeStruct or None``: scratch memory the kernel needs,
            declared as one more result of the FFI call (so XLA allocates it and command buffers can
            capture the call) and dropped before anything else sees it.
          operand_names: names of the operands, for error messages.
          grad_operands: the operands ``vjp`` differentiates; asking for the derivative of any other
            (a quantized weight, its scales) raises :class:`NotDifferentiableError` naming it.
          once_operands: operands whose contribution must enter a reduced (``psum``) result once, such as a
            bias: when a reduction factor is sharded, every shard but the first sees them as zeros. A
            callable gets the op's parameters (for ops whose optional operands move the indices).
        """
        self.name = name
        self._shapes = shapes
        self._reference = reference
        self._sharding_rule = sharding_rule
        self._ffi_target = ffi_target
        self._ffi_attributes = ffi_attributes or (lambda **params: params)
        self._ffi_operand_layouts = ffi_operand_layouts or (lambda **params: None)
        self._vjp = vjp
        self._workspace = workspace or (lambda *avals, **params: None)
        self._operand_names = tuple(operand_names)
        self._grad_operands = frozenset(grad_operands)
        self._once_operands = once_operands if callable(once_operands) else (lambda **params: once_operands)

        self.inner = Primitive(f"jaxq_{name}")
        self.outer = Primitive(f"jaxq_{name}_sharded")
        for prim in (self.inner, self.outer):
            prim.multiple_results = True
        self.inner.def_abstract_eval(self._inner_abstract_eval)
        self.outer.def_abstract_eval(self._abstract_eval)
        self.inner.def_impl(functools.partial(dispatch.apply_primitive, self.inner))
        # Eager calls run on one device: nothing to partition.
        self.outer.def_impl(self._bind_inner)
        # The outer lowering emits custom_partitioning, which needs the device assignment.
        dispatch.prim_requires_devices_during_lowering.add(self.outer)

        reference_lowering = mlir.lower_fun(self._reference_with_workspace, multiple_results=True)
        mlir.register_lowering(self.inner, reference_lowering)
        mlir.register_lowering(self.inner, self._cuda_lowering(reference_lowering), platform="cuda")

        self._partitioned = self._build_partitioned()
        mlir.register_lowering(
            self.outer,
            mlir.lower_fun(lambda *args, **params: self._partitioned(_freeze(params), *args), multiple_results=True),
        )
        rule = batching_rule or _batch_leading_dims
        batching.primitive_batchers[self.outer] = functools.partial(rule, self)
        ad.primitive_jvps[self.outer] = self._not_differentiable

    def __call__(self, *args, **params) -> tuple[jax.Array, ...]:
        if self._vjp is None:
            return tuple(self.outer.bind(*args, **params))
        return self._differentiable(_freeze(params))(*args)

    def bind(self, *args, **params) -> tuple[jax.Array, ...]:
        """Binds the outer primitive directly (batching rules use this to stay below any vjp)."""
        return tuple(self.outer.bind(*args, **params))

    def _abstract_eval(self, *avals, **params):
        return [ShapedArray(s.shape, s.dtype) for s in self._shapes(*avals, **params)]

    def _inner_abstract_eval(self, *avals, **params):
        workspace = self._workspace(*avals, **params)
        extra = [] if workspace is None else [ShapedArray(workspace.shape, workspace.dtype)]
        return self._abstract_eval(*avals, **params) + extra

    def _reference_with_workspace(self, *args, **params):
        outs = tuple(self._reference(*args, **params))
        workspace = self._workspace(*args, **params)
        return outs if workspace is None else outs + (jnp.zeros(workspace.shape, workspace.dtype),)

    def _bind_inner(self, *args, **params):
        """The inner primitive's results without its workspace."""
        outs = self.inner.bind(*args, **params)
        return outs if self._workspace(*args, **params) is None else outs[:-1]

    def _cuda_lowering(self, reference_lowering):
        def lowering(ctx, *args, **params):
            if _ffi.kernel_enabled(self.name, self._ffi_target):
                call = jax.ffi.ffi_lowering(self._ffi_target, operand_layouts=self._ffi_operand_layouts(**params))
                return call(ctx, *args, **self._ffi_attributes(**params))
            return reference_lowering(ctx, *args, **params)

        return lowering

    def _not_differentiable(self, primals, tangents, **params):
        raise NotDifferentiableError(
            f"jaxq.{self.name} is not differentiable: its outputs are quantized values and scales. "
            "Stop the gradient before it (jax.lax.stop_gradient) if only other paths need one."
        )

    @functools.cache
    def _differentiable(self, frozen_params: tuple):
        params = dict(frozen_params)

        @jax.custom_vjp
        def call(*args):
            return tuple(self.outer.bind(*args, **params))

        def forward(*primals):
            for i, p in enumerate(primals):
                if p.perturbed and i not in self._grad_operands:
                    name = self._operand_names[i] if i < len(self._operand_names) else f"operand {i}"
                    raise NotDifferentiableError(
                        f"jaxq.{self.name} has no gradient with respect to {name} (quantized weights and "
                        "their scales are frozen); differentiate only the activations, or stop the gradient "
                        f"of {name} (jax.lax.stop_gradient)."
                    )
            args = tuple(p.value for p in primals)
            return tuple(self.outer.bind(*args, **params)), args

        def backward(args, cotangents):
            outs = self._abstract_eval(*args, **params)
            cotangents = tuple(
                jnp.zeros(o.shape, o.dtype) if isinstance(c, jax.custom_derivatives.SymbolicZero) else c
                for c, o in zip(cotangents, outs)
            )
            return tuple(self._vjp(args, cotangents, **params))

        call.defvjp(forward, backward, symbolic_zeros=True)
        return call

    def _build_partitioned(self):
        @functools.partial(custom_partitioning, static_argnums=(0,))
        def partitioned(frozen_params, *args):
            return tuple(self._bind_inner(*args, **dict(frozen_params)))

        def rule_for(frozen_params, operand_shapes, result_shapes) -> ShardingRule:
            return self._sharding_rule(dict(frozen_params), operand_shapes, result_shapes).without_unit_factors(
                operand_shapes)

        def sharding_rule(frozen_params, mesh, operand_types, result_types):
            operand_shapes = [t.shape for t in operand_types]
            rule = rule_for(frozen_params, operand_shapes, [t.shape for t in result_types])
            return rule.einsum(), rule.sdy_options(operand_shapes, tuple(mesh.shape.values()))

        def partition(frozen_params, mesh, operands, results):
            operand_shapes = [o.shape for o in operands]
            rule = rule_for(frozen_params, operand_shapes, [r.shape for r in results])
            assigned = _assign_mesh_axes(rule, operand_shapes, [o.sharding for o in operands], mesh)
            reduce_axes = tuple(a for f in rule.reduction_factors for a in assigned.get(f, ()))
            params = dict(frozen_params)

            def per_shard(*args):
                once = set(self._once_operands(**params))
                if reduce_axes and once:
                    first = jax.lax.axis_index(reduce_axes) == 0
                    args = [jnp.where(first, a, jnp.zeros_like(a)) if i in once else a for i, a in enumerate(args)]
                outs = self._bind_inner(*args, **params)
                return tuple(jax.lax.psum(o, reduce_axes) if reduce_axes else o for o in outs)

            operand_shardings = tuple(NamedSharding(mesh, _spec(d, assigned)) for d in rule.operands)
            result_shardings = tuple(NamedSharding(mesh, _spec(d, assigned)) for d in rule.results)
            return mesh, per_shard, result_shardings, operand_shardings

        partitioned.def_partition(partition=partition, sharding_rule=sharding_rule, decode_shardings=False)
        return partitioned


def map_batching(op: Op, args, dims, **params):
    """A batching rule for ops whose operands have no batch dimensions of their own (e.g. one weight):
    maps over the batch, one call per entry, unbatched operands shared."""
    batched = [i for i, d in enumerate(dims) if d is not None]

    def one(entries):
        operands = list(args)
        for i, entry in zip(batched, entries):
            operands[i] = entry
        return tuple(op.bind(*operands, **params))

    outs = jax.lax.map(one, tuple(jnp.moveaxis(args[i], dims[i], 0) for i in batched))
    return outs, (0,) * len(outs)


def _batch_leading_dims(op: Op, args, dims, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    moved = [
        jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        for a, d in zip(args, dims)
    ]
    outs = op.bind(*moved, **params)
    return outs, (0,) * len(outs)
