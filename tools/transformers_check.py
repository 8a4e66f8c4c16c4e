"""Prints jaxq's errors against Hugging Face transformers per architecture and per compressed-tensors scheme
(tests/hf_equivalence.py says what is compared; tests/test_transformers.py asserts the same).

    python tools/transformers_check.py        # needs torch and transformers: pip install -r tests/writers.txt
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import hf_equivalence  # noqa: E402


def main():
    import jax
    import transformers

    print(f"transformers {transformers.__version__}, jax {jax.__version__} on {jax.default_backend()}; bfloat16 "
          f"models of shape {hf_equivalence.SHAPE}")
    print("| case | prefill logits rel. L2 | cached decode logits rel. L2 (8 steps) | greedy tokens equal |")
    print("|---|---|---|---|")
    for case in hf_equivalence.CASES:
        with tempfile.TemporaryDirectory() as directory:
            errors = hf_equivalence.compare(hf_equivalence.save_random_model(case, directory), directory)
        print(f"| {case} | {errors.prefill:.2e} | {errors.decode:.2e} | {errors.greedy_agreement:.3f} |")
    print("\n| compressed-tensors scheme | prefill logits rel. L2 | cached decode rel. L2 | greedy tokens equal | "
          "the reference's own error vs the unquantized model |\n|---|---|---|---|---|")
    for scheme in hf_equivalence.COMPRESSED_SCHEMES:
        with tempfile.TemporaryDirectory() as directory:
            model, unquantized = hf_equivalence.save_compressed_model(scheme, directory)
            errors = hf_equivalence.compare(model, directory, float_model=unquantized)
        print(f"| {scheme} | {errors.prefill:.2e} | {errors.decode:.2e} | {errors.greedy_agreement:.3f} | "
              f"{errors.scheme_error:.2e} |")


if __name__ == "__main__":
    main()
