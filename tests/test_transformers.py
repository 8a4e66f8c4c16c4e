"""from_pretrained + the KV-cache decode against Hugging Face transformers on checkpoints it and the
compressed-tensors library wrote (skipped without them: ``pip install -r tests/writers.txt``);
tests/hf_equivalence.py says what is compared.

Tolerances: bfloat16's relative L2 band (1e-2) for float and weight-only models, whose every layer rounds to
bfloat16 either way. W8A8: compressed-tensors' reference quantizes activations its own way (fp8 scales rounded
to the activations' bfloat16, int8 scales max/127.5), vLLM's kernels and jaxq another (float32 scales, max/127),
so the two round different activations differently: they must agree within the scheme's own error (the
reference against the unquantized model), and a wrong weight layout would miss that by far."""

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


@pytest.mark.parametrize("scheme", list(hf_equivalence.COMPRESSED_SCHEMES))
def test_compressed_tensors_library_checkpoints_match_its_decompression(tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    model, unquantized = hf_equivalence.save_compressed_model(scheme, str(tmp_path))
    errors = hf_equivalence.compare(model, str(tmp_path), float_model=unquantized)
    weight_only = hf_equivalence.COMPRESSED_SCHEMES[scheme][2] is None
    bound = BF16_TOLERANCE if weight_only else errors.scheme_error
    assert errors.prefill < bound and errors.decode < bound, errors
