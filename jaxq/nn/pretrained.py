"""``from_pretrained``: a ready jaxq model from a Hugging Face checkpoint directory.

The directory holds ``config.json`` (a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``) and
its safetensors files (one, or several listed by ``model.safetensors.index.json``). Each linear layer becomes the
jaxq layer its ``quantization_config`` names, or stays an ``nnx.Linear``:

* AutoAWQ (``quant_method: awq``, GEMM): :class:`~jaxq.nn.AWQLinear`; ``modules_to_not_convert`` stay float.
* AutoGPTQ (``quant_method: gptq``, act-order through ``desc_act``, v1 or v2 zero points):
  :class:`~jaxq.nn.GPTQLinear`.
* FP8 block-wise (``quant_method: fp8``, ``weight_block_size [128, 128]``): :class:`~jaxq.nn.Fp8Linear`
  ``block=True``; ``ignored_layers`` / ``modules_to_not_convert`` stay float.
* NVIDIA ModelOpt NVFP4 (``quant_method: modelopt``, ``quant_algo: NVFP4``; ``exclude_modules`` stay float):
  :class:`~jaxq.nn.NVFP4Linear` (``checkpoint_format="modelopt"``).
* compressed-tensors: each layer takes the config group whose ``targets`` match it (``"Linear"``, its name,
  or ``"re:"`` + a regular expression) unless ``ignore`` lists it: ``pack-quantized`` int weights without
  activation quantization -> :class:`~jaxq.nn.GPTQLinear` (compressed-tensors format), ``float-quantized``
  -> :class:`~jaxq.nn.Fp8Linear` (``weight_only`` when activations are not quantized),
  ``int-quantized`` -> :class:`~jaxq.nn.Int8Linear` (``azp`` for asymmetric activations),
  ``nvfp4-pack-quantized`` -> :class:`~jaxq.nn.NVFP4Linear` (weight-only, as vLLM runs it on Hopper).

As vLLM does, AWQ, GPTQ and FP8 leave ``lm_head`` in its float type unless their config says ``lm_head:
true``. The model is built without initialising any weight (``nnx.eval_shape``); every tensor is then read
from the files one at a time and, with a ``mesh``, each module is sharded as soon as it is filled, so host
memory holds about one tensor beyond what stays on the host. Then, unless ``fuse=False``, each layer's q/k/v
and gate/up projections are fused into one GEMM each (:func:`~jaxq.nn.fuse_projections`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import sys

import jax.numpy as jnp
from flax import nnx

from jaxq.nn.fuse import fusable_group, fuse_module
from jaxq.nn.checkpoint import SafetensorsFiles, fill_model, read_quantization_config, stores_group_index
from jaxq.nn.layers import AWQLinear, Fp8Linear, GPTQLinear, Int8Linear, NVFP4Linear, sharding_axes
from jaxq.nn.llama import LlamaConfig, LlamaForCausalLM
from jaxq.nn.quantize import iter_modules, module_path, replace_module, shard_model


def _listed(prefix: str, names) -> bool:
    """vLLM's test for ``modules_to_not_convert``-style lists: a listed name inside the module's path."""
    return any(name and name in prefix for name in names or ())


def _ct_matches(prefix: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], prefix) is not None
    return target in ("Linear", prefix) or prefix.endswith("." + target)


def _compressed_tensors_layer(config: dict, prefix: str, in_features: int, backend):
    if any(_ct_matches(prefix, target) for target in config.get("ignore") or ()):
        return None
    for group in (config.get("config_groups") or {}).values():
        if any(_ct_matches(prefix, target) for target in group.get("targets") or ()):
            break
    else:
        return None
    fmt = group.get("format") or config.get("format")
    weights, activations = group.get("weights") or {}, group.get("input_activations")
    layer_config = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group}}
    if fmt == "pack-quantized" and activations is None and weights.get("type") == "int":
        group_size = in_features if weights.get("strategy") == "channel" else weights.get("group_size")
        options = dict(bits=weights.get("num_bits"), group_size=group_size, act_order=stores_group_index(weights),
                       symmetric=bool(weights.get("symmetric", True)), checkpoint_format="compressed-tensors",
                       v2_format=True)
        return GPTQLinear, {**options, "backend": backend or "kernel"}, layer_config
    if fmt == "nvfp4-pack-quantized":  # activations stay 16-bit, as vLLM runs NVFP4 without FP4 tensor cores
        return NVFP4Linear, {}, layer_config
    if fmt == "float-quantized":
        return Fp8Linear, {"weight_only": activations is None}, layer_config
    if fmt == "int-quantized" and activations is not None:
        return Int8Linear, {"azp": not activations.get("symmetric", True)}, layer_config
    raise ValueError(f"from_pretrained: {prefix}: compressed-tensors format {fmt!r} with weights {weights} and "
                     f"input_activations {activations} is not supported")


def _layer_for(config: dict, prefix: str, in_features: int, backend):
    """(layer class, its options, the config the loader checks it against) for the linear layer ``prefix``
    under a checkpoint's ``quantization_config``, or None when it stays float."""
    method = config.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_layer(config, prefix, in_features, backend)
    if prefix == "lm_head" and not config.get("lm_head", False) and method != "modelopt":
        return None
    if method == "awq":
        if _listed(prefix, config.get("modules_to_not_convert")):
            return None
        return AWQLinear, {"group_size": config.get("group_size"), "backend": backend or "kernel"}, config
    if method == "gptq":
        group = config.get("group_size", 128)
        options = dict(bits=config.get("bits"), group_size=in_features if group == -1 else group,
                       act_order=bool(config.get("desc_act", False)), symmetric=bool(config.get("sym", True)),
                       v2_format=config.get("checkpoint_format") == "gptq_v2", backend=backend or "kernel")
        return GPTQLinear, options, config
    if method == "modelopt":
        if config.get("quant_algo") != "NVFP4":
            raise ValueError(f"from_pretrained: ModelOpt quant_algo {config.get('quant_algo')!r} is not supported "
                             "(NVFP4)")
        if any(fnmatch.fnmatch(prefix, pattern) for pattern in config.get("exclude_modules") or ()):
            return None
        return NVFP4Linear, {"checkpoint_format": "modelopt"}, config
    if method == "fp8":
        if _listed(prefix, config.get("ignored_layers")) or _listed(prefix, config.get("modules_to_not_convert")):
            return None
        if list(config.get("weight_block_size") or []) != [128, 128]:
            raise ValueError(f"from_pretrained: fp8 checkpoints need weight_block_size [128, 128]; got "
                             f"{config.get('weight_block_size')}")
        return Fp8Linear, {"block": True}, config
    raise ValueError(f"from_pretrained: quant_method {method!r} is not supported")


def _progress_bar(total: int):
    """(update(bytes), close()) of a progress bar over the checkpoint's bytes on a terminal (tqdm, when
    installed), else quiet."""
    if not sys.stderr.isatty():
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None, lambda: None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading", file=sys.stderr)
    return bar.update, bar.close


def from_pretrained(path: str, *, dtype=jnp.bfloat16, mesh=None, backend: str | None = None,
                    strict: bool = True, fuse: bool = True) -> LlamaForCausalLM:
    """A :class:`~jaxq.nn.llama.LlamaForCausalLM` filled from the Hugging Face checkpoint directory ``path``
    (module docstring: architectures, quantization formats, memory use).

    Args:
      path: directory with ``config.json`` and the safetensors files.
      dtype: the activations' and float weights' type (bfloat16 or float16); quantized layers compute in it
        and checkpoint scales in another float type are cast to it, as vLLM does.
      mesh: a ``jax.sharding.Mesh`` with a ``"model"`` axis: the layers are built tensor-parallel (q/k/v/gate/
        up column-parallel, o/down row-parallel) and each is placed on the mesh as soon as it is read.
      backend: ``"marlin"`` runs AWQ and symmetric 4/8-bit GPTQ / compressed-tensors W4A16/W8A16 layers
        through ``marlin_gemm`` (repacked at load); None keeps ``awq_gemm`` / ``gptq_gemm``.
      strict: fail when the files hold tensors no module reads (tied ``lm_head.weight`` and old rotary
        ``inv_freq`` buffers are always allowed).
      fuse: once loaded, fuse each layer's q/k/v and gate/up projections into one GEMM each
        (:func:`jaxq.nn.fuse_projections`: the same weights, fewer kernels; tensor-parallel layers stay
        apart). Each group is fused as soon as its parts are read; the allocator still keeps some of the
        freed parts (measured on a CPU, 2.90 GB model: the loader's peak 1005 MB fused, 750 MB with
        ``fuse=False``).

    Raises ``FileNotFoundError`` without ``config.json`` or safetensors files, ``ValueError`` for an
    architecture, rope scaling or quantization config this model does not implement, and the loader's
    errors (naming the tensor and file) for a checkpoint that does not match its config.
    """
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"from_pretrained: {config_file} not found")
    with open(config_file) as f:
        hf_config = json.load(f)
    config = LlamaConfig.from_hf(hf_config)
    quantization = read_quantization_config(path)
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, tensor_parallel=mesh is not None, dtype=dtype,
                                                    rngs=nnx.Rngs(0)))
    layer_configs = {}
    if quantization is not None:
        linears = [(p, m) for p, m in iter_modules(model) if isinstance(m, nnx.Linear) and p]
        for path_in_model, linear in linears:
            prefix = module_path(path_in_model)
            choice = _layer_for(quantization, prefix, linear.in_features, backend)
            if choice is None:
                continue
            cls, options, layer_configs[prefix] = choice
            layer = nnx.eval_shape(lambda: cls(linear.in_features, linear.out_features,
                                               use_bias=linear.bias is not None, dtype=dtype,
                                               kernel_axes=sharding_axes(linear.kernel), out_dtype=dtype, **options))
            replace_module(model, path_in_model, layer)
    files = SafetensorsFiles(path)
    allowed = {name for name in files if name.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings and "lm_head.weight" in files:
        allowed.add("lm_head.weight")
    # Each attention's q/k/v (each MLP's gate/up) is fused as soon as its last part is filled: the next layer's
    # parts then reuse the memory this layer's parts leave, and the allocator grows by no more than one group.
    groups = {module_path(p): (m, set(fusable_group(m)[1])) for p, m in iter_modules(model)
              if fuse and fusable_group(m) is not None}

    def place(prefix, module):
        if mesh is not None:
            shard_model(module, mesh)
        parent, _, name = prefix.rpartition(".")
        if parent in groups and name in groups[parent][1]:
            groups[parent][1].discard(name)
            if not groups[parent][1]:
                fuse_module(groups.pop(parent)[0])

    update, close = _progress_bar(sum(files.nbytes(name) for name in files))
    try:
        fill_model(model, files, layer_configs.get, strict=strict, allowed_unused=allowed, place=place,
                   progress=update, who="from_pretrained")
    finally:
        close()
    return model
