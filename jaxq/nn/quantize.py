"""``quantize(model, scheme)``: replace a model's ``nnx.Linear`` layers by quantized ones, in place."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import jax
from flax import nnx

from jaxq.nn.layers import AWQLinear, Fp8Linear, GPTQLinear, Int8Linear, NVFP4Linear, QuantizedLinear

# scheme -> (layer class, options fixed by the scheme)
SCHEMES: dict[str, tuple[type, dict]] = {
    "awq": (AWQLinear, {}),
    "gptq": (GPTQLinear, {}),
    "fp8": (Fp8Linear, {"block": False}),
    "fp8-block": (Fp8Linear, {"block": True}),
    "fp8-weight": (Fp8Linear, {"block": False, "weight_only": True}),
    "int8": (Int8Linear, {"azp": False}),
    "int8-azp": (Int8Linear, {"azp": True}),
    "nvfp4": (NVFP4Linear, {}),
}


def module_path(path: tuple) -> str:
    """``('model', 'layers', 0, 'q_proj')`` -> ``'model.layers.0.q_proj'`` (checkpoint naming)."""
    return ".".join(str(p) for p in path)


def iter_modules(model: nnx.Module):
    """(path, module) of ``model`` and every module inside it."""
    return nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules()


def _matcher(filter) -> Callable[[str, nnx.Linear], bool]:
    if filter is None:
        return lambda path, module: True
    if isinstance(filter, str):
        pattern = re.compile(filter)
        return lambda path, module: pattern.search(path) is not None
    if callable(filter):
        return filter
    raise TypeError(f"quantize: filter must be None, a regular expression or a callable (path, module) -> bool; "
                    f"got {type(filter).__name__}")


def quantize(model: nnx.Module, scheme: str, *, filter=None, **options) -> list[str]:
    """Replaces, in place, each ``nnx.Linear`` of ``model`` that ``filter`` selects by the quantized layer of
    ``scheme`` (``Cls.from_linear(linear, **options)``); every other module is left as it is.

    Args:
      model: any NNX module; linear layers may sit in attributes, ``nnx.List``/lists or ``nnx.Dict``/dicts.
      scheme: ``"awq"``, ``"gptq"``, ``"fp8"``, ``"fp8-block"``, ``"fp8-weight"`` (fp8 weights per channel,
        weight-only through ``marlin_gemm``), ``"int8"``, ``"int8-azp"`` or ``"nvfp4"`` (NVFP4 weights,
        16-bit activations, through ``marlin_gemm``; ``backend="dequantize"``: XLA's dot). ``backend="marlin"``
        (an option of ``"awq"`` and ``"gptq"``) runs 4- and 8-bit layers through ``marlin_gemm``.
      filter: None (every linear layer), a regular expression searched in the layer's dotted path
        (``"model.layers.0.mlp.up_proj"``), or ``filter(path, linear) -> bool``.
      **options: passed to ``from_linear`` (e.g. ``group_size``, ``bits``, ``act_order``, ``dtype``).

    Returns the dotted paths of the replaced layers.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: scheme must be one of {sorted(SCHEMES)}; got {scheme!r}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"quantize: model must be an nnx.Module; got {type(model).__name__}")
    cls, fixed = SCHEMES[scheme]
    clash = sorted(set(fixed) & set(options))
    if clash:
        raise ValueError(f"quantize: scheme {scheme!r} sets {clash} itself")
    selected = _matcher(filter)
    targets = [(path, module) for path, module in iter_modules(model)
               if isinstance(module, nnx.Linear) and path and selected(module_path(path), module)]
    for path, linear in targets:
        replace_module(model, path, cls.from_linear(linear, **fixed, **options))
    return [module_path(path) for path, _ in targets]


def add_lora(model: nnx.Module, rank: int, *, rngs: nnx.Rngs, filter=None) -> list[str]:
    """Wraps, in place, each quantized layer of ``model`` that ``filter`` selects (as for :func:`quantize`) in
    ``nnx.LoRA(in, rank, out, base_module=layer)``: ``y = layer(x) + x @ lora_a @ lora_b`` with float32
    ``nnx.LoRAParam`` adapters (``lora_b`` starts at zero, so the model's output is unchanged). Train them with
    ``nnx.grad`` / ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``: the quantized base stays frozen (QLoRA).
    Returns the dotted paths of the wrapped layers."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"add_lora: rank must be a positive int; got {rank!r}")
    selected = _matcher(filter)
    targets = [(path, module) for path, module in iter_modules(model)
               if isinstance(module, QuantizedLinear) and path and path[-1] != "base_module"
               and selected(module_path(path), module)]
    for path, layer in targets:
        replace_module(model, path, nnx.LoRA(layer.in_features, rank, layer.out_features, base_module=layer, rngs=rngs))
    return [module_path(path) for path, _ in targets]


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh) -> nnx.Module:
    """Places every variable of ``model`` on ``mesh`` by its sharding metadata (``nnx.get_partition_spec``;
    variables without metadata are replicated), in place. Returns ``model``. A ``ValueError`` names a variable
    whose sharded dimension the mesh axes do not divide (e.g. a row-parallel layer with fewer groups of scales
    than devices on the model axis)."""
    state = nnx.state(model)
    specs = nnx.get_partition_spec(state)

    def place(path, x, spec):
        for dim, axes in enumerate(spec):
            names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
            ways = math.prod(mesh.shape[name] for name in names)
            if x.shape[dim] % ways:
                where = jax.tree_util.keystr(path, simple=True, separator=".").removesuffix(".value")
                raise ValueError(f"shard_model: {where} {tuple(x.shape)} cannot be split {ways} ways along its "
                                 f"dimension {dim} (mesh axes {names}); use fewer devices on those axes or leave "
                                 "this layer unsharded")
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    nnx.update(model, jax.tree_util.tree_map_with_path(place, state, specs))
    return model


def module_at(model: nnx.Module, path: tuple):
    """What ``path`` (as ``iter_modules`` gives it) points at in ``model`` now (None where a module was removed)."""
    node = model
    for key in path:
        if node is None:
            return None
        node = node[key] if isinstance(key, int) or not hasattr(node, str(key)) else getattr(node, key)
    return node


def replace_module(model: nnx.Module, path: tuple, new: nnx.Module):
    """Puts ``new`` where ``path`` (as ``iter_modules`` gives it) points in ``model``."""
    parent = module_at(model, path[:-1])
    last = path[-1]
    if isinstance(last, int) or not hasattr(parent, str(last)):
        parent[last] = new
    else:
        setattr(parent, last, new)
