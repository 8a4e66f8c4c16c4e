"""Peak host memory of jaxq.nn.from_pretrained on a generated multi-GB checkpoint.

    python tools/load_memory.py [DIR] [--layers N] [--no-fuse]

Writes (once) a bf16 Llama-shaped checkpoint of random weights in transformers' names to DIR (default
/tmp/jaxq_load_memory), sharded in 4 files with an index, then loads it with from_pretrained in a fresh
process and prints that process's peak resident memory (ru_maxrss) beside the checkpoint's size and the
memory the loaded parameters occupy where JAX put them. On a GPU the parameters live on the device, so the
host's peak is the loader's own overhead; on a CPU-only machine they are host memory too, and the overhead is
the peak minus them.
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np


def write_checkpoint(directory: str, layers: int) -> int:
    import ml_dtypes
    from safetensors.numpy import save_file

    hidden, intermediate, vocab, heads, kv_heads = 2048, 5632, 32000, 16, 8
    head_dim = hidden // heads
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    rng = np.random.default_rng(0)

    def weight(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden), "model.norm.weight": weight(hidden),
               "lm_head.weight": weight(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors.update({f"{p}.input_layernorm.weight": weight(hidden), f"{p}.post_attention_layernorm.weight": weight(hidden),
                        f"{p}.self_attn.q_proj.weight": weight(hidden, hidden),
                        f"{p}.self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
                        f"{p}.self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
                        f"{p}.self_attn.o_proj.weight": weight(hidden, hidden),
                        f"{p}.mlp.gate_proj.weight": weight(intermediate, hidden),
                        f"{p}.mlp.up_proj.weight": weight(intermediate, hidden),
                        f"{p}.mlp.down_proj.weight": weight(hidden, intermediate)})
    os.makedirs(directory, exist_ok=True)
    names, weight_map = sorted(tensors), {}
    for s in range(4):
        file = f"model-{s + 1:05d}-of-00004.safetensors"
        part = {name: tensors[name] for name in names[s::4]}
        save_file(part, os.path.join(directory, file))
        weight_map.update({name: file for name in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return sum(t.nbytes for t in tensors.values())


def load(directory: str, fuse: bool) -> None:
    import jax

    import jaxq.nn as qnn
    from flax import nnx

    model = qnn.from_pretrained(directory, fuse=fuse)
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    on_device = sum(x.nbytes for x in leaves)
    largest = max(x.nbytes for x in leaves)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"platform": jax.default_backend(), "parameters_bytes": on_device, "largest_tensor_bytes": largest,
                      "peak_rss_bytes": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", nargs="?", default="/tmp/jaxq_load_memory")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--no-fuse", action="store_true", help="keep q/k/v and gate/up apart (from_pretrained's fuse)")
    parser.add_argument("--child", choices=("load", "write"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "load":
        load(args.directory, fuse=not args.no_fuse)
        return
    if args.child == "write":
        size = write_checkpoint(args.directory, args.layers)
        print(f"wrote {size / 1e9:.2f} GB to {args.directory}")
        return
    # Each step in its own process: a child's ru_maxrss starts at its parent's resident size when forked, so this
    # process stays small (writing the checkpoint here would count its tensors in both measurements).
    if not os.path.exists(os.path.join(args.directory, "config.json")):
        subprocess.run([sys.executable, __file__, args.directory, "--child", "write", "--layers", str(args.layers)],
                       check=True)
    baseline = subprocess.run([sys.executable, "-c", "import jax, jaxq.nn, resource; jax.devices(); "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"],
                              capture_output=True, text=True, check=True)
    child = [sys.executable, __file__, args.directory, "--child", "load"] + (["--no-fuse"] if args.no_fuse else [])
    result = json.loads(subprocess.run(child, capture_output=True,
                                       text=True, check=True).stdout.strip().splitlines()[-1])
    files = sum(os.path.getsize(os.path.join(args.directory, f)) for f in os.listdir(args.directory)
                if f.endswith(".safetensors"))
    base = int(baseline.stdout.strip().splitlines()[-1])
    host_params = result["parameters_bytes"] if result["platform"] == "cpu" else 0
    print(f"platform {result['platform']}: checkpoint {files / 1e9:.2f} GB, parameters {result['parameters_bytes'] / 1e9:.2f} GB "
          f"(largest tensor {result['largest_tensor_bytes'] / 1e6:.0f} MB); peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
          f"of which the process before loading {base / 1e9:.2f} GB and parameters in host memory {host_params / 1e9:.2f} GB: "
          f"the loader's own peak {(result['peak_rss_bytes'] - base - host_params) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
