"""from_pretrained + the KV-cache decode against Hugging Face transformers on checkpoints it wrote (skipped
without torch and transformers: ``pip install -r tests/writers.txt``). Tolerance: bfloat16's relative L2 band (1e-2)
for a model whose every layer rounds to bfloat16 (tests/hf_equivalence.py says what is compared)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_equivalence  # noqa: E402

BF16_TOLERANCE = 1e-2


@pytest.mark.parametrize("case", list(hf_equivalence.CASES))
def test_matches_transformers_prefill_and_cached_decode(tmp_path, case):
    model = hf_equivalence.save_random_model(case, str(tmp_path))
    errors = hf_equivalence.compare(model, str(tmp_path))
    assert errors.prefill < BF16_TOLERANCE, errors
    assert errors.decode < BF16_TOLERANCE, errors
