"""jaxq's models against Hugging Face transformers on the same checkpoint (needs torch and transformers; shared
by tests/test_transformers.py and tools/transformers_check.py).

A small random transformers model is saved with ``save_pretrained`` and loaded by ``jaxq.nn.from_pretrained``;
both run in bfloat16 on the same tokens. Prefill: logits of the prompt. Decode: jaxq's KV-cache steps fed the
tokens transformers' greedy ``generate`` chose, against transformers' logits of the whole sequence at those
positions (teacher forcing, so that one near-tie cannot send the two down different paths).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

# architecture -> transformers config overrides beyond the shared small shape
CASES = {
    "llama-gqa": ("LlamaForCausalLM", {}),
    "llama3-rope-scaling": ("LlamaForCausalLM", {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 4}}),
    "qwen2-bias-tied": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "mistral-window": ("MistralForCausalLM", {"sliding_window": 6}),
}
SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)


@dataclasses.dataclass
class Errors:
    prefill: float  # relative L2 of the prompt's logits
    decode: float  # relative L2 of the decode steps' logits
    greedy_agreement: float  # share of jaxq's greedy tokens equal to transformers'


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def save_random_model(case: str, directory: str, seed: int = 0):
    """A random transformers model of ``case`` in bfloat16, saved to ``directory``; returns it."""
    import torch
    import transformers

    architecture, extra = CASES[case]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**{**SHAPE, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises biases to zero: give them values
                parameter.normal_(0.0, 0.5)
            elif "q_proj" in name or "k_proj" in name:
                parameter.mul_(5.0)  # peaked attention, so that positions (rope, window, cache) matter
    model.save_pretrained(directory)
    return model


def compare(hf_model, directory: str, batch: int = 2, prompt: int = 7, steps: int = 8, seed: int = 1) -> Errors:
    """Loads ``directory`` with jaxq and compares it with ``hf_model`` (module docstring)."""
    import torch

    import jaxq.nn as qnn

    ours = qnn.from_pretrained(directory)
    ids = np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], (batch, prompt))
    with torch.no_grad():
        generated = hf_model.generate(torch.tensor(ids), max_new_tokens=steps, do_sample=False,
                                      pad_token_id=0).numpy()
        reference = hf_model(torch.tensor(generated)).logits.float().numpy()
    cache = ours.empty_cache(batch, prompt + steps)
    logits, cache = ours(jnp.asarray(ids, jnp.int32), cache, 0)
    prefill = _rel(logits, reference[:, :prompt])
    step_logits = []
    for i in range(steps - 1):
        position = prompt + i
        step, cache = ours(jnp.asarray(generated[:, position:position + 1], jnp.int32), cache, position)
        step_logits.append(np.asarray(step[:, 0]))
    decode = _rel(np.stack(step_logits, 1), reference[:, prompt:prompt + steps - 1])
    tokens = np.asarray(qnn.generate(ours, jnp.asarray(ids, jnp.int32), steps))
    agreement = float(np.mean(tokens[:, prompt:] == generated[:, prompt:]))
    return Errors(prefill, decode, agreement)
