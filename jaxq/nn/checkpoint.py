"""Quantized checkpoints in the safetensors formats vLLM loads: ``load_quantized`` and ``save_quantized``.

The model decides what is read: build (or ``quantize``) it with the scheme of the checkpoint, then
``load_quantized`` fills each layer from the tensors named after its dotted module path (Hugging Face
naming: ``model.layers.0.self_attn.q_proj.qweight``). Per layer class:

* :class:`AWQLinear` - AutoAWQ (``quant_method: awq``, GEMM version): ``qweight`` int32 ``[in, out/8]``,
  ``qzeros`` int32 ``[in/G, out/8]``, ``scales`` ``[in/G, out]``.
* :class:`GPTQLinear` - AutoGPTQ (``quant_method: gptq``): ``qweight`` int32 ``[in*bits/32, out]`` (rows in
  input order, not shuffled), ``qzeros`` int32 ``[groups, out*bits/32]``, ``scales``, ``g_idx`` int32 ``[in]``;
  the config's ``bits``/``group_size`` must match the layer, ``desc_act`` and ``checkpoint_format``
  (``gptq`` = v1 zeros minus one, ``gptq_v2``) set it.
* :class:`GPTQLinear` with ``checkpoint_format="compressed-tensors"`` - compressed-tensors ``pack-quantized``
  (W4A16/W8A16 and other widths, ``group`` or ``channel`` strategy, symmetric or with zero points):
  ``weight_packed`` int32 ``[out, in*bits/32]`` (values plus ``2**(bits-1)``, little-endian bit stream along
  ``in``), ``weight_scale`` ``[out, in/G]``, ``weight_shape`` ``[2]``, and when used ``weight_zero_point`` int32
  ``[out*bits/32, in/G]`` and ``weight_g_idx`` int32 ``[in]``. ``actorder`` ``"weight"`` / ``"static"`` (an order
  used in calibration only) and ``null`` store no ``weight_g_idx`` and read as no act-order; ``"group"`` /
  ``"dynamic"`` store it. An act-order layer's groups follow ``weight_g_idx`` and have no other form, so
  :func:`save_quantized` writes ``actorder: "group"``: vLLM reads such files, as do compressed-tensors releases
  before 0.20; compressed-tensors 0.20 refuses that config (it removed ``"group"``), which is no loss for
  vLLM users, whose loader does not go through it.
* :class:`Fp8Linear` ``block=True`` - FP8 block-wise (``quant_method: fp8``, ``weight_block_size
  [128, 128]``, dynamic activations): ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale_inv`` float32
  ``[ceil(out/128), in/128]``.
* :class:`Fp8Linear` - compressed-tensors ``float-quantized`` (fp8 weights per channel, dynamic per-token
  activations): ``weight`` float8_e4m3fn ``[out, in]``, ``weight_scale`` float32 ``[out, 1]``.
  ``weight_only=True`` layers read the same fp8 files (vLLM runs those weight-only on GPUs without fp8
  tensor cores); their own ``quantization_config`` has no ``input_activations``.
* :class:`NVFP4Linear` - compressed-tensors ``nvfp4-pack-quantized``: ``weight_packed`` uint8 ``[out, in/2]``,
  ``weight_scale`` float8_e4m3fn ``[out, in/16]``, ``weight_global_scale`` float32 ``[1]``; with
  ``checkpoint_format="modelopt"``, NVIDIA ModelOpt's NVFP4 (``quant_method: modelopt``, ``quant_algo: NVFP4``, in
  ``config.json`` or ``hf_quant_config.json``): ``weight``, ``weight_scale``, ``weight_scale_2`` float32 ``[]``
  (the reciprocal of the global scale).
* :class:`Int8Linear` - compressed-tensors ``int-quantized`` (int8 weights per channel, dynamic per-token
  int8 activations, symmetric or with zero points = ``azp``): ``weight`` int8 ``[out, in]``,
  ``weight_scale`` float32 ``[out, 1]``.

Layers built with ``backend="marlin"`` read and write the same files: their tensors are repacked into the
Marlin layout when set and back when saved.

Float modules are filled too: ``nnx.Linear`` from ``weight [out, in]`` (and ``bias``), ``nnx.Embed`` from
``weight``, ``nnx.RMSNorm``/``nnx.LayerNorm`` from ``weight`` (and ``bias``). An ``nnx.LoRA`` around a layer
is transparent (``q_proj.base_module`` reads ``q_proj``); its adapters are not part of the checkpoint.
A model with fused projections (:func:`jaxq.nn.fuse_projections`) saves under the original names.
The ``quantization_config`` comes from ``config.json`` (or AutoGPTQ/AutoAWQ's ``quantize_config.json``)
beside the files; without one the layers' own settings are taken as they are.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from jaxq import formats
from jaxq.nn.fuse import FusedProjections
from jaxq.nn.layers import AWQLinear, Fp8Linear, GPTQLinear, Int8Linear, NVFP4Linear, QuantizedLinear
from jaxq.nn.quantize import iter_modules, module_at, module_path

_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F16": np.float16, "F32": np.float32,
           "F64": np.float64, "I8": np.int8, "U8": np.uint8, "I16": np.int16, "U16": np.uint16, "I32": np.int32,
           "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "BOOL": np.bool_}
_CONFIG_FILES = ("config.json", "hf_quant_config.json", "quantize_config.json", "quant_config.json")
CHECKPOINT_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------------- files


class SafetensorsFiles(Mapping):
    """The tensors of a ``.safetensors`` file, or of a directory's (the files its
    ``model.safetensors.index.json`` lists, else every ``.safetensors`` file in it), read lazily: only the
    files' headers are parsed up front; ``files[name]`` reads that tensor's bytes alone from its file into a NumPy array
    (bfloat16 and float8_e4m3fn as ml_dtypes), so memory holds what is being read, never a whole file (nor a
    mapping of it, whose touched pages would stay resident). ``file_of(name)`` names the file a tensor comes
    from."""

    def __init__(self, path: str):
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            else:
                names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            files = [os.path.join(path, name) for name in names]
        else:
            files = [path]
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        self._entries: dict[str, tuple] = {}
        for file in files:
            with open(file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            header.pop("__metadata__", None)
            for name, entry in header.items():
                if entry["dtype"] not in _DTYPES:
                    raise TypeError(f"tensor {name!r} in {file} has unsupported dtype {entry['dtype']}")
                if name in self._entries:
                    raise ValueError(f"tensor {name!r} appears in {self._entries[name][0]} and {file}")
                begin, end = entry["data_offsets"]
                self._entries[name] = (file, _DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + size + begin,
                                       8 + size + end)

    def __getitem__(self, name: str) -> np.ndarray:
        file, dtype, shape, begin, end = self._entries[name]
        data = np.fromfile(file, np.uint8, count=end - begin, offset=begin)
        if data.size != end - begin:
            raise ValueError(f"tensor {name!r}: {file} ends before its data does (truncated file?)")
        return data.view(dtype).reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def file_of(self, name: str) -> str:
        return self._entries[name][0]

    def nbytes(self, name: str) -> int:
        _, _, _, begin, end = self._entries[name]
        return end - begin


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file, or of a directory's (as :class:`SafetensorsFiles` finds
    them), as NumPy arrays in memory (bfloat16 and float8_e4m3fn as ml_dtypes)."""
    files = SafetensorsFiles(path)
    return {name: np.array(files[name]) for name in files}


def read_quantization_config(path: str) -> dict | None:
    """The ``quantization_config`` beside a checkpoint, or None: from a directory's ``config.json``, else
    AutoGPTQ's ``quantize_config.json`` (which names no ``quant_method``) or AutoAWQ's ``quant_config.json``
    (``w_bit``, ``q_group_size``)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    for name in _CONFIG_FILES:
        file = os.path.join(directory, name)
        if not os.path.exists(file):
            continue
        with open(file) as f:
            config = json.load(f)
        if name == "config.json":
            config = config.get("quantization_config")
            if config is None:
                continue
        elif name == "hf_quant_config.json":  # NVIDIA ModelOpt's own file
            config = {"quant_method": "modelopt", **config.get("quantization", {})}
        elif name == "quantize_config.json":
            config = {"quant_method": "gptq", **config}
        else:
            config = {"quant_method": "awq", "bits": config.get("w_bit", config.get("bits")),
                      "group_size": config.get("q_group_size", config.get("group_size")),
                      **{k: v for k, v in config.items() if k not in ("w_bit", "q_group_size")}}
        return config
    return None


# ------------------------------------------------------------------------------------ quantized layers


def _ct_config(weights: dict, activations: dict, fmt: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}}}


def quantization_config(layer: QuantizedLinear) -> dict:
    """The ``quantization_config`` a checkpoint of ``layer`` carries (what vLLM reads)."""
    if isinstance(layer, AWQLinear):
        return {"quant_method": "awq", "bits": 4, "group_size": layer.group_size, "zero_point": True,
                "version": "gemm"}
    if isinstance(layer, GPTQLinear) and layer.checkpoint_format == "compressed-tensors":
        weights = {"num_bits": layer.bits, "type": "int", "symmetric": layer.symmetric, "dynamic": False,
                   "strategy": "channel" if layer.group_size == layer.in_features else "group",
                   "group_size": None if layer.group_size == layer.in_features else layer.group_size,
                   "actorder": "group" if layer.act_order else None}
        return _ct_config(weights, None, "pack-quantized")
    if isinstance(layer, GPTQLinear):
        return {"quant_method": "gptq", "bits": layer.bits, "group_size": layer.group_size,
                "desc_act": layer.act_order, "sym": layer.symmetric,
                "checkpoint_format": "gptq_v2" if layer.v2_format else "gptq"}
    if isinstance(layer, NVFP4Linear) and layer.checkpoint_format == "modelopt":
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16}
    if isinstance(layer, NVFP4Linear):
        weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
                   "dynamic": False}
        return _ct_config(weights, None, "nvfp4-pack-quantized")
    if isinstance(layer, Fp8Linear) and layer.block:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    kind = "float" if isinstance(layer, Fp8Linear) else "int"
    weights = {"num_bits": 8, "type": kind, "strategy": "channel", "symmetric": True, "dynamic": False}
    activations = {"num_bits": 8, "type": kind, "strategy": "token", "dynamic": True,
                   "symmetric": not getattr(layer, "azp", False)}
    if getattr(layer, "weight_only", False):  # compressed-tensors' FP8 W8A16
        activations = None
    return _ct_config(weights, activations, f"{kind}-quantized")


def _mismatch(prefix, key, want, got):
    return ValueError(f"load_quantized: {prefix}: the checkpoint's quantization_config has {key}={got!r}, the layer "
                      f"needs {want!r}")


def _configure(layer: QuantizedLinear, config: dict, prefix: str):
    """Checks ``config`` against ``layer`` and adopts its storage settings (GPTQ's desc_act, sym, format)."""
    expected = quantization_config(layer)
    method = config.get("quant_method")
    if method != expected["quant_method"]:
        raise _mismatch(prefix, "quant_method", expected["quant_method"], method)
    if isinstance(layer, GPTQLinear) and method == "compressed-tensors":
        weights = _ct_group(config, prefix, expected["format"])["weights"] or {}
        for key in ("num_bits", "type"):
            if weights.get(key) != expected["config_groups"]["group_0"]["weights"][key]:
                raise _mismatch(prefix, f"weights.{key}", expected["config_groups"]["group_0"]["weights"][key],
                                weights.get(key))
        group = layer.in_features if weights.get("strategy") == "channel" else weights.get("group_size")
        if group != layer.group_size:
            raise _mismatch(prefix, "weights.group_size", layer.group_size, group)
        layer.configure_storage(act_order=stores_group_index(weights), v2_format=True,
                                symmetric=bool(weights.get("symmetric", True)))
        return
    if isinstance(layer, GPTQLinear):
        group = config.get("group_size", layer.group_size)
        if config.get("bits") != layer.bits:
            raise _mismatch(prefix, "bits", layer.bits, config.get("bits"))
        if (layer.in_features if group == -1 else group) != layer.group_size:
            raise _mismatch(prefix, "group_size", layer.group_size, group)
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise _mismatch(prefix, "checkpoint_format", "gptq or gptq_v2", fmt)
        layer.configure_storage(act_order=bool(config.get("desc_act", False)), v2_format=fmt == "gptq_v2",
                                symmetric=bool(config.get("sym", True)))
        return
    if method == "compressed-tensors":
        group = _ct_group(config, prefix, expected["format"])
        want = expected["config_groups"]["group_0"]
        for part in ("weights", "input_activations"):
            got = group.get(part) or {}
            for key, value in (want[part] or {}).items():
                if key in got and got[key] != value:
                    raise _mismatch(prefix, f"{part}.{key}", value, got[key])
        return
    for key, value in expected.items():
        got = config.get(key, value)
        if key == "group_size" and got == -1:
            got = layer.in_features
        if key == "version":  # AutoAWQ's own file writes "GEMM", Hugging Face's config "gemm"
            got = str(got).lower()
        if got != value and not (key == "weight_block_size" and list(got) == value):
            raise _mismatch(prefix, key, value, got)


def stores_group_index(weights: dict) -> bool:
    """Whether a compressed-tensors weights config stores ``weight_g_idx`` (``actorder`` ``group`` or its alias
    ``dynamic``; ``weight`` / ``static`` only changed the calibration order)."""
    return str(weights.get("actorder")).lower() in ("group", "dynamic")


def _ct_group(config: dict, prefix: str, fmt: str) -> dict:
    """The one config group of a compressed-tensors config, after checking its format."""
    if config.get("format") != fmt:
        raise _mismatch(prefix, "format", fmt, config.get("format"))
    groups = list(config.get("config_groups", {}).values())
    if len(groups) != 1:
        raise ValueError(f"load_quantized: {prefix}: compressed-tensors configs with {len(groups)} config_groups "
                         "are not supported (one scheme per checkpoint)")
    return groups[0]


def _ct_packed(layer: GPTQLinear) -> dict[str, object]:
    """compressed-tensors ``pack-quantized`` tensors of a GPTQ layer: its bit streams run along K in both
    formats, so ``weight_packed [out, in*bits/32]`` is AutoGPTQ's ``qweight`` transposed and the unsigned
    zero points (signed zero plus ``2**(bits-1)``, packed along ``out``) are its v2 ``qzeros`` transposed."""
    gptq = layer.checkpoint_tensors()
    tensors = {"weight_packed": gptq["qweight"].T, "weight_scale": gptq["scales"].T,
               "weight_shape": np.array([layer.out_features, layer.in_features], np.int64)}
    if not layer.symmetric:
        tensors["weight_zero_point"] = gptq["qzeros"].T
    if layer.act_order:
        tensors["weight_g_idx"] = gptq["g_idx"]
    return tensors


def _load_ct_packed(layer: GPTQLinear, prefix: str, take: Callable):
    name = functools.partial(_join, prefix)
    shape = tuple(np.asarray(take(name("weight_shape"))).tolist())
    if shape != (layer.out_features, layer.in_features):
        raise ValueError(f"load_quantized: {name('weight_shape')}: {shape}, the layer is "
                         f"{(layer.out_features, layer.in_features)}")
    groups, offset = layer.in_features // layer.group_size, 1 << (layer.bits - 1)
    if layer.symmetric:
        zeros = formats.pack_gptq(jnp.full((groups, layer.out_features), offset, jnp.int32), layer.bits, axis=1)
    else:
        zeros = take(name("weight_zero_point")).T
    g_idx = (take(name("weight_g_idx")) if layer.act_order else
             jnp.arange(layer.in_features, dtype=jnp.int32) // layer.group_size)
    names = {"qweight": name("weight_packed"), "scales": name("weight_scale"), "qzeros": name("weight_zero_point"),
             "g_idx": name("weight_g_idx")}
    layer.set_checkpoint_tensors(take(name("weight_packed")).T, zeros, take(name("weight_scale")).T, g_idx,
                                 names=names)


def _quantized_tensors(layer: QuantizedLinear) -> dict[str, object]:
    if isinstance(layer, GPTQLinear) and layer.checkpoint_format == "compressed-tensors":
        return _ct_packed(layer)
    if isinstance(layer, Int8Linear):
        return {name: getattr(layer, name)[...] for name in layer.tensor_specs() if name != "azp_adj"}
    return layer.checkpoint_tensors()


def _load_quantized_layer(layer: QuantizedLinear, prefix: str, take: Callable):
    if isinstance(layer, GPTQLinear) and layer.checkpoint_format == "compressed-tensors":
        _load_ct_packed(layer, prefix, take)
    elif isinstance(layer, Int8Linear):
        layer.set_weight(take(f"{prefix}.weight"), take(f"{prefix}.weight_scale"),
                         names={n: f"{prefix}.{n}" for n in ("weight", "weight_scale")})
    else:
        names = {n: f"{prefix}.{n}" for n in layer.checkpoint_specs()}
        layer.set_checkpoint_tensors(**{n: take(names[n]) for n in names}, names=names)


# ------------------------------------------------------------------------------------------ float modules


def _float_entries(module) -> dict[str, tuple[str, bool]]:
    """checkpoint name -> (attribute, transposed) of a float module's parameters."""
    if isinstance(module, nnx.Linear):
        return {"weight": ("kernel", True), "bias": ("bias", False)}
    if isinstance(module, nnx.Embed):
        return {"weight": ("embedding", False)}
    if isinstance(module, (nnx.RMSNorm, nnx.LayerNorm)):
        return {"weight": ("scale", False), "bias": ("bias", False)}
    return {}


def _modules(model: nnx.Module):
    """(checkpoint prefix, module) of every module that owns checkpoint tensors. ``base_module`` path
    components (``nnx.LoRA``) are dropped so a wrapped layer keeps its name; fused projections
    (:func:`jaxq.nn.fuse_projections`) give their parts, rebuilt, under the original names. Modules are looked up
    as they are reached (by path), so a caller may replace modules already given (as from_pretrained fuses
    them) without this holding on to the old ones."""
    paths, fused = [], []
    for path, module in iter_modules(model):
        if isinstance(module, FusedProjections):
            fused.append(path)
        if isinstance(module, (FusedProjections, QuantizedLinear)) or _float_entries(module):
            paths.append(path)
    for path in paths:
        if any(path[:len(f)] == f and path != f for f in fused):
            continue
        module = module_at(model, path)
        if isinstance(module, FusedProjections):
            for name, part in module.parts().items():
                yield module_path((*path[:-1], name)), part
        elif module is not None:
            yield module_path(tuple(p for p in path if p != "base_module")), module


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


# ------------------------------------------------------------------------------------------------ API


def fill_model(model: nnx.Module, files: SafetensorsFiles, layer_config: Callable[[str], dict | None], *,
               strict: bool = True, allowed_unused=(), place: Callable[[str, nnx.Module], None] | None = None,
               progress=None, who: str = "load_quantized") -> nnx.Module:
    """Fills every quantized layer and float module of ``model`` from ``files``, one tensor at a time (only
    it in host memory). ``layer_config(path)`` is the quantization config a quantized layer is checked
    against (None: none); ``place(prefix, module)`` runs on each module once it is filled (e.g. to shard it);
    ``progress(bytes)`` is told how many checkpoint bytes each module read. Errors name the tensor and the
    file; with ``strict``, tensors no module reads (other than ``allowed_unused``) are an error too."""
    if any(isinstance(module, FusedProjections) for _, module in iter_modules(model)):
        raise ValueError(f"{who}: the model has fused projections; load into the model before "
                         "jaxq.nn.fuse_projections (or after jaxq.nn.unfuse_projections)")
    used = set()
    for prefix, module in _modules(model):
        read = []

        def take(name):
            if name not in files:
                raise KeyError(f"{who}: the checkpoint has no tensor {name!r}")
            used.add(name)
            read.append(name)
            return jnp.asarray(files[name])

        try:
            if isinstance(module, QuantizedLinear):
                config = layer_config(prefix)
                if config is not None:
                    _configure(module, config, prefix)
                _load_quantized_layer(module, prefix, take)
                if module.use_bias:
                    module.assign("bias", take(_join(prefix, "bias")), what=_join(prefix, "bias"))
            for name, (attribute, transposed) in _float_entries(module).items():
                variable = getattr(module, attribute, None)
                if variable is None:
                    continue
                full = _join(prefix, name)
                value = take(full)
                current = variable.get_value()
                if tuple(reversed(value.shape) if transposed else value.shape) != tuple(current.shape):
                    want = tuple(reversed(current.shape)) if transposed else tuple(current.shape)
                    raise ValueError(f"{who}: {full}: expected shape {want}; got {tuple(value.shape)}")
                variable.set_value((value.T if transposed else value).astype(current.dtype))
        except (KeyError, ValueError, TypeError) as error:
            sources = sorted({os.path.basename(files.file_of(name)) for name in read})
            if not sources:
                raise
            message = error.args[0] if error.args else str(error)
            raise type(error)(f"{message} (reading {', '.join(sources)})") from error
        if read:
            if place is not None:
                place(prefix, module)
            if progress is not None:
                progress(sum(files.nbytes(name) for name in read))
    unused = sorted(set(files) - used - set(allowed_unused))
    if strict and unused:
        raise ValueError(f"{who}: {len(unused)} tensor(s) in the checkpoint match no module of the model, "
                         f"e.g. {unused[:5]} (strict=False ignores them)")
    return model


def load_quantized(model: nnx.Module, path_or_dir: str, *, strict: bool = True) -> nnx.Module:
    """Fills ``model`` (already built or quantized with the checkpoint's scheme) from safetensors files.

    Args:
      model: an NNX model whose quantized layers (:mod:`jaxq.nn.layers`) and float ``Linear``/``Embed``/
        norm modules name the tensors to read (see the module docstring for names, shapes and dtypes).
      path_or_dir: a ``.safetensors`` file or a directory of them (with ``config.json``; a sharded
        checkpoint's ``model.safetensors.index.json`` names its files). Files are memory-mapped and read one
        tensor at a time.
      strict: also fail when the files hold tensors that no module of ``model`` reads.

    Raises ``KeyError`` for a missing tensor, ``ValueError``/``TypeError`` for a wrong shape or dtype or a
    config the layer cannot take, each naming the tensor (and the file) or config key. Returns ``model``.
    """
    config = read_quantization_config(path_or_dir)
    return fill_model(model, SafetensorsFiles(path_or_dir), lambda prefix: config, strict=strict)


def save_quantized(model: nnx.Module, path: str) -> str:
    """Writes ``model`` to the directory ``path`` as ``model.safetensors`` plus ``config.json`` with its
    ``quantization_config``, in the formats :func:`load_quantized` reads (and vLLM loads); loading it back
    into a model of the same structure restores every tensor bit for bit. Every quantized layer must share
    one config. Returns the file's path."""
    tensors, configs, float_linears = {}, {}, []
    for prefix, module in _modules(model):
        if isinstance(module, QuantizedLinear):
            entries = dict(_quantized_tensors(module))
            if module.use_bias:
                entries["bias"] = module.bias[...]
            configs[json.dumps(quantization_config(module), sort_keys=True)] = prefix
        else:
            if isinstance(module, nnx.Linear):
                float_linears.append(prefix)
            entries = {}
            for name, (attribute, transposed) in _float_entries(module).items():
                variable = getattr(module, attribute, None)
                if variable is not None:
                    entries[name] = variable[...].T if transposed else variable[...]
        for name, value in entries.items():
            value = np.asarray(value)
            tensors[_join(prefix, name)] = np.ascontiguousarray(value) if value.ndim else value  # keep scalars 0-d
    if len(configs) > 1:
        raise ValueError(f"save_quantized: the quantized layers use {len(configs)} different configs (e.g. layers "
                         f"{sorted(configs.values())[:2]}); a checkpoint holds one")
    if not configs:
        raise ValueError("save_quantized: the model has no quantized layer (jaxq.nn.quantize it first)")
    config = json.loads(next(iter(configs)))
    if config["quant_method"] == "compressed-tensors":
        config["ignore"] = float_linears
    elif config["quant_method"] == "awq":
        config["modules_to_not_convert"] = float_linears
    elif config["quant_method"] == "modelopt":
        config["exclude_modules"] = float_linears
    os.makedirs(path, exist_ok=True)
    file = os.path.join(path, CHECKPOINT_FILE)
    save_file(tensors, file, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"quantization_config": config}, f, indent=2)
    return file
