"""jaxq's main job: quantize a small Llama-style Flax NNX model with each scheme and run it.

    python -m jaxq.demo [--qlora] [--new-tokens N]

Initialises the embedded model (random weights, no download), quantizes every linear layer with each of
``jaxq.nn.SCHEMES``, runs a jit-compiled forward and a greedy ``jaxq.nn.generate`` (KV cache: one prefill
over the prompt, then one decode step per token), and prints per scheme which jaxq kernels each phase ran
(CUDA, or the jnp reference lowering), the relative error of the logits against the bf16 model, top-1
agreement and the tokens/s of each phase. With several devices it also runs the tensor-parallel layout
(q/k/v/gate/up column-parallel, o/down row-parallel over a ``model`` mesh axis) and compares it with the
single-device result; on a CPU-only machine it makes 8 virtual CPU devices for that. ``--qlora`` trains
LoRA adapters on the AWQ-quantized model for a few steps.
"""

from __future__ import annotations

import argparse
import os
import re
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Virtual CPU devices for the tensor-parallel run; read when JAX first starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jaxq  # noqa: E402
import jaxq.nn as qnn  # noqa: E402
from jaxq.nn.llama import MODEL_AXIS, LlamaConfig, LlamaForCausalLM, generate, generation_hlo  # noqa: E402

PROMPT, BATCH = 16, 4


def _kernels(lowered_text: str) -> str:
    names = sorted(set(re.findall(r"custom_call @(jaxq_\w+)", lowered_text)))
    if names:
        # A dequantize kernel hands W to XLA's dot (marlin_gemm's path above its kernel's rows).
        dot = " + XLA dot" if any("dequantize" in n for n in names) else ""
        return "CUDA: " + ", ".join(n.removeprefix("jaxq_") for n in names) + dot
    return "XLA only (no jaxq kernel)" if jaxq.cuda_available() else "jnp reference"


def _rel_err(approx, exact) -> float:
    approx, exact = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def _forward(model):
    """The jitted forward of ``model`` (functional: graph and state split, so calls carry no NNX
    bookkeeping) and its state."""
    graphdef, state = nnx.split(model)
    return state, jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))


def _run(model, tokens, new_tokens):
    """(prompt logits, generated tokens, prefill and decode tokens/s, kernels each phase ran) of a greedy
    generate, timed after a first call that compiles."""
    state, forward = _forward(model)
    logits = forward(state, tokens)
    generate(model, tokens, new_tokens)  # compile
    timings = {}
    generated = generate(model, tokens, new_tokens, timings=timings)
    hlo = generation_hlo(model, tokens, new_tokens)
    rates = (tokens.size / timings["prefill_s"], BATCH * max(new_tokens - 1, 1) / max(timings["decode_s"], 1e-9))
    return logits, generated, rates, (_kernels(hlo["prefill"]), _kernels(hlo["decode"]))


def tensor_parallel(config, tokens, scheme, mesh):
    """Logits of the model quantized with ``scheme``, sharded over ``mesh`` (the same weights as the
    single-device model: the same initialisers and seeds, with sharding metadata), and the placement of
    the first ``down_proj``'s tensors."""
    model = LlamaForCausalLM(config, tensor_parallel=True, rngs=nnx.Rngs(0))
    qnn.quantize(model, scheme)
    qnn.shard_model(model, mesh)
    state, forward = _forward(model)
    sharded_tokens = jax.device_put(tokens, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    return forward(state, sharded_tokens), state["model"]["layers"][0]["mlp"]["down_proj"]


def qlora(config, tokens, steps=20):
    import optax

    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    qnn.quantize(model, "awq")
    wrapped = qnn.add_lora(model, 8, rngs=nnx.Rngs(1), filter=r"(q_proj|v_proj)$")
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def loss_fn(model):
        logits = model(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    print(f"\nQLoRA: rank-8 adapters on {len(wrapped)} AWQ layers ({', '.join(wrapped[:2])}, ...), adam 1e-2, "
          f"{steps} steps on one batch: loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to generate (default 16)")
    parser.add_argument("--qlora", action="store_true", help="also train LoRA adapters on the AWQ model")
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")

    config = LlamaConfig()
    devices = jax.devices()
    print(f"jaxq demo on {devices[0].device_kind} ({len(devices)} device(s)); CUDA kernels "
          f"{'available' if jaxq.cuda_available() else 'not available: jnp reference lowerings'}")
    print(f"model: Llama-style, {config.num_layers} layers, hidden {config.hidden_size}, MLP "
          f"{config.intermediate_size}, {config.num_heads} heads ({config.num_kv_heads} KV), vocab "
          f"{config.vocab_size}, bf16, random weights; batch {BATCH}, prompt {PROMPT}, {args.new_tokens} new tokens\n")
    tokens = jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, config.vocab_size, jnp.int32)

    start = time.perf_counter()
    reference, ref_tokens, ref_rates, _ = _run(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), tokens, args.new_tokens)
    ref_top1 = np.asarray(jnp.argmax(reference, -1))
    print(f"| scheme | layers | prefill kernels (M = {BATCH * PROMPT}) | decode kernels (M = {BATCH}) | logits rel. "
          "error vs bf16 | top-1 agreement | prefill tokens/s | decode tokens/s |\n|---|---|---|---|---|---|---|---|")
    print(f"| bf16 (nnx.Linear) | 15 | XLA dot | XLA dot | 0 | 1.000 | {ref_rates[0]:.0f} | {ref_rates[1]:.0f} |")
    single = {}
    for scheme in qnn.SCHEMES:
        model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
        replaced = qnn.quantize(model, scheme)
        qnn.fuse_projections(model)  # q/k/v and gate/up as one GEMM each, as from_pretrained loads them
        logits, generated, rates, kernels = _run(model, tokens, args.new_tokens)
        single[scheme] = logits
        agree = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == ref_top1))
        print(f"| {scheme} | {len(replaced)} | {kernels[0]} | {kernels[1]} | {_rel_err(logits, reference):.4f} | "
              f"{agree:.3f} | {rates[0]:.0f} | {rates[1]:.0f} |")

    if len(devices) >= 2 and len(devices) % 2 == 0:
        # Two-way tensor parallelism: k/v_proj's 256 outputs hold two 128-row fp8 blocks.
        mesh = jax.make_mesh((len(devices) // 2, 2), ("data", MODEL_AXIS),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
        print(f"\ntensor-parallel: mesh {dict(mesh.shape)}, batch over 'data', q/k/v/gate/up/lm_head column-parallel "
              "and o/down row-parallel over 'model' (partial sums added in bf16, as row-parallel layers do). "
              "Dynamic activation quantization turns those last-bit differences into different rounding "
              "decisions in later layers, so the two runs differ by about what quantization itself costs; "
              "the error against bf16 is the same.\n")
        print("| scheme | logits rel. error vs bf16: sharded (single device) | sharded vs single device | "
              "down_proj tensors sharded as |\n|---|---|---|---|")
        for scheme in qnn.SCHEMES:
            logits, down = tensor_parallel(config, tokens, scheme, mesh)
            placed = ", ".join(f"{name} {tuple(v.sharding.spec)}" for name, v in sorted(down.items())
                               if hasattr(v, "sharding") and name != "g_idx")
            print(f"| {scheme} | {_rel_err(logits, reference):.4f} ({_rel_err(single[scheme], reference):.4f}) | "
                  f"{_rel_err(logits, single[scheme]):.2e} | {placed} |")
    if args.qlora:
        qlora(config, jnp.concatenate([tokens, ref_tokens[:, PROMPT:]], axis=1))
    print(f"\ndone in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
