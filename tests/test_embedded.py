"""The embedded SmolLM2-135M on the bundled sample (slow: about a minute on a 2-core CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SAMPLES = Path(__file__).resolve().parent.parent / "samples"
DEMO_QUESTION = "What was the name of the schooner that struck the Harrow Rocks in October 1868?"


@pytest.fixture(scope="module")
def embedded():
    from chunkkv_cli.model import load_model

    return load_model("smollm2-135m", "cpu")


def test_embedded_gguf_is_converted_once_into_the_cache(embedded):
    from safetensors import safe_open

    from chunkkv_cli.model import weights_folder

    folder = weights_folder(embedded.profile)
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert folder.name.endswith("-fp16-v2")  # an older fp32 conversion is never mistaken for this one
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}
    assert embedded.model.config.num_hidden_layers == 30 and embedded.model.config.num_key_value_heads == 3


def test_demo_question_is_answered_from_a_chunkkv_cache_at_ratio_0_2(embedded):
    from chunkkv_cli.compress import make_compressor
    from chunkkv_cli.documents import prompt_ids, read_document
    from chunkkv_cli.pipeline import answer

    answers = {json.loads(line)["question"]: json.loads(line)["answers"] for line in open(SAMPLES / "questions.jsonl")}
    ids = prompt_ids(embedded.tokenizer, read_document(str(SAMPLES / "lighthouse.md")), DEMO_QUESTION)
    result = answer(embedded.model, embedded.tokenizer, ids, make_compressor("chunkkv", ratio=0.2), max_new_tokens=24)
    assert any(a in result.text for a in answers[DEMO_QUESTION]), result.text
    assert result.kept_kv_bytes <= 0.21 * result.full_kv_bytes
