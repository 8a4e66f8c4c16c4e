"""Projections of one input fused into one GEMM, as vLLM's merged column-parallel layers do.

A decoder layer's q/k/v projections read the same input, and so do the MLP's gate and up projections.
:func:`fuse_projections` concatenates each such group along its outputs into one layer (one kernel launch
and one pass over the input instead of three or two): at M = 1 and 16 the small projections cost a launch
and a per-call floor more than their weight's bytes. The fused layer's tensors are the parts' tensors
concatenated along their output axis, so its outputs are the parts' outputs side by side.

What fuses: layers of one class with equal settings (bits, group size, backend, dtype, ...) whose tensors
without an output axis are equal (GPTQ's ``g_idx``/``perm``, NVFP4's global scale) and whose packed output
axes hold each part in proportion to its outputs (so block-wise fp8 fuses parts of whole 128-row blocks).
Layers whose outputs are sharded over a mesh axis (tensor parallelism) stay separate: concatenated, each
device's shard would no longer hold whole heads of q, k and v. Anything else (a LoRA wrapper, different
settings) stays separate too.

Fusing changes the weights' values in no way; the outputs may differ in the last bits, because a kernel (or
XLA's dot) may add the float32 products along K in another order for a wider layer (``marlin_gemm`` splits K
by the weight's shape), as any change of N may.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxq.nn.layers import QuantizedLinear, annotated, sharding_axes
from jaxq.nn.llama import MLP, Attention
from jaxq.nn.quantize import iter_modules, module_path, replace_module

# (module class, fused attribute, the projections it replaces in output order)
FUSED_GROUPS = ((Attention, "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                (MLP, "gate_up_proj", ("gate_proj", "up_proj")))


class FusedProjections(nnx.Module):
    """Projections of one input run as one layer: ``layer`` computes ``[..., sum(sizes)]`` and the call
    returns the parts ``[..., sizes[i]]`` in the order of ``names`` (the original projections' names)."""

    def __init__(self, layer, names: tuple[str, ...], sizes: tuple[int, ...]):
        self.layer, self.names, self.sizes = layer, tuple(names), tuple(int(s) for s in sizes)

    def __call__(self, x) -> tuple:
        return tuple(jnp.split(self.layer(x), np.cumsum(self.sizes)[:-1].tolist(), axis=-1))

    def parts(self) -> dict:
        """The original projections, rebuilt from the fused tensors (``{name: layer}``), bit for bit."""
        return dict(zip(self.names, split_outputs(self.layer, self.sizes)))


def _settings(layer) -> dict:
    """What two layers must share to be concatenated: every attribute but the outputs and the tensors."""
    return {k: v for k, v in vars(layer).items()
            if not k.startswith("_") and k != "out_features" and not isinstance(v, nnx.Variable)}


def _tensors(layer) -> dict[str, tuple[int | None, tuple[int, ...]]]:
    """name -> (output axis or None, shape) of each array of ``layer`` for its current ``out_features``."""
    if isinstance(layer, QuantizedLinear):
        found = {name: (spec.layout.index("out") if "out" in spec.layout else None, spec.shape)
                 for name, spec in layer.tensor_specs().items()}
    else:
        found = {"kernel": (1, (layer.in_features, layer.out_features))}
    if getattr(layer, "bias", None) is not None:
        found["bias"] = (0, (layer.out_features,))
    return found


def _outputs_sharded(layer) -> bool:
    if isinstance(layer, QuantizedLinear):
        return layer.kernel_axes is not None and layer.kernel_axes[1] is not None
    axes = sharding_axes(layer.kernel)
    return axes is not None and axes[1] is not None


def _rebuilt(template, out_features: int, arrays: dict):
    """A layer like ``template`` (sharing its other arrays) with ``out_features`` outputs and ``arrays``."""
    layer = nnx.merge(*nnx.split(template))
    layer.out_features = out_features
    for name, value in arrays.items():
        old = getattr(layer, name)
        setattr(layer, name, annotated(type(old), value, sharding_axes(old)))
    return layer


def _with_outputs(template, out_features: int):
    """(output axis, shape) per array of a layer like ``template`` with ``out_features`` outputs."""
    saved = template.out_features
    template.out_features = out_features
    try:
        return _tensors(template)
    finally:
        template.out_features = saved


def concatenate_outputs(layers):
    """One layer whose output is ``concatenate([layer(x) for layer in layers], -1)``, computed by one call; or
    None when ``layers`` cannot be fused (see the module docstring). ``layers``: ``nnx.Linear`` or
    :class:`jaxq.nn.QuantizedLinear` layers of one class and settings."""
    first = layers[0]
    if (not isinstance(first, (QuantizedLinear, nnx.Linear)) or any(type(l) is not type(first) for l in layers)
            or any(_settings(l) != _settings(first) for l in layers[1:]) or any(map(_outputs_sharded, layers))):
        return None
    total = sum(l.out_features for l in layers)
    fused = _with_outputs(first, total)
    arrays = {}
    for name, (axis, shape) in fused.items():
        values = [getattr(l, name)[...] for l in layers]
        if axis is None:
            if any(not np.array_equal(np.asarray(v), np.asarray(values[0])) for v in values[1:]):
                return None
            continue
        # Each part's share of a packed axis must be proportional to its outputs, so that the parts meet at a
        # packing boundary (block-wise fp8's 128-row scale blocks: a part of 64 rows would share a block).
        if any(v.shape[axis] * total != shape[axis] * l.out_features for v, l in zip(values, layers)):
            return None
        arrays[name] = jnp.concatenate(values, axis=axis)
    return _rebuilt(first, total, arrays)


def split_outputs(layer, sizes) -> list:
    """The layers :func:`concatenate_outputs` fused into ``layer``, of ``sizes`` outputs each."""
    if sum(sizes) != layer.out_features:
        raise ValueError(f"split_outputs: sizes {tuple(sizes)} must add up to out_features={layer.out_features}")
    parts, start = [], {}
    for size in sizes:
        arrays = {}
        for name, (axis, shape) in _with_outputs(layer, size).items():
            value = getattr(layer, name)[...]
            if axis is not None:
                at = start.get(name, 0)
                value = value[(slice(None),) * axis + (slice(at, at + shape[axis]),)]
                start[name] = at + shape[axis]
            arrays[name] = value
        parts.append(_rebuilt(layer, size, arrays))
    return parts


def fusable_group(module) -> tuple[str, tuple[str, ...]] | None:
    """(fused attribute, projection names) of an attention or MLP module, else None."""
    return next(((name, parts) for cls, name, parts in FUSED_GROUPS if isinstance(module, cls)), None)


def fuse_module(module) -> bool:
    """Fuses one attention's q/k/v (or one MLP's gate/up) in place, as :func:`fuse_projections` does; returns
    whether it did."""
    fused_name, names = fusable_group(module)
    projections = [getattr(module, name) for name in names]
    if any(p is None for p in projections):
        return False  # already fused
    fused = concatenate_outputs(projections)
    if fused is None:
        return False
    setattr(module, fused_name, FusedProjections(fused, names, tuple(p.out_features for p in projections)))
    for name in names:
        setattr(module, name, None)
    return True


def fuse_projections(model: nnx.Module) -> list[str]:
    """Fuses, in place, each attention's q/k/v projections into ``qkv_proj`` and each MLP's gate/up
    projections into ``gate_up_proj`` (:class:`FusedProjections`) where they can be fused (module
    docstring); the originals become None. The weights stay the same values (outputs may differ in the last
    bits: see the module docstring); a layer runs 4 GEMMs instead of 7. :func:`jaxq.nn.save_quantized` writes
    a fused model under the original names; load checkpoints into an unfused model, then fuse
    (:func:`jaxq.nn.from_pretrained` does). Returns the dotted paths of the fused modules."""
    targets = [(path, module) for path, module in iter_modules(model) if fusable_group(module) is not None]
    return [module_path((*path, fusable_group(module)[0])) for path, module in targets if fuse_module(module)]


def unfuse_projections(model: nnx.Module) -> list[str]:
    """Undoes :func:`fuse_projections` in place (e.g. to load a checkpoint into the model again); returns the
    dotted paths of the modules split."""
    done = []
    for path, module in [(p, m) for p, m in iter_modules(model) if isinstance(m, FusedProjections)]:
        parent_path = path[:-1]
        for name, part in module.parts().items():
            replace_module(model, (*parent_path, name), part)
        replace_module(model, path, None)
        done.append(module_path(path))
    return done
