"""The Python API, through the public names of `import chunkkv` only (the tiny model stands in for a loaded one)."""

from __future__ import annotations

import pytest

import chunkkv
from tests.test_cli_ask import tiny_loaded  # noqa: F401 - the fixture that patches ModelSpec.load

TEXT = "The harbour master keeps the blue ledger in the tower by the quay. " * 3
SMALL = chunkkv.Compression("chunkkv", ratio=0.3, window=8)
SHORT = chunkkv.Generation(max_new_tokens=5)


@pytest.fixture
def model(tiny_loaded):  # noqa: F811
    return chunkkv.load("smollm2-135m")


def test_ask_a_text_keeps_the_ratio_and_returns_an_answer(model):
    answer = model.ask(TEXT, "Who keeps the ledger?", SMALL, SHORT)
    assert isinstance(answer, chunkkv.Answer) and answer.new_tokens == 5 and answer.text
    assert answer.kept_tokens == pytest.approx(0.3 * answer.prompt_tokens, abs=1)
    assert answer.kept_kv_bytes < 0.35 * answer.full_kv_bytes
    full = model.ask(TEXT, "Who keeps the ledger?", chunkkv.Compression("fullkv"), SHORT)
    assert full.kept_tokens == full.prompt_tokens == answer.prompt_tokens


def test_a_path_is_read_and_answered_like_its_text(model, tmp_path):
    path = tmp_path / "doc.md"
    path.write_text(TEXT)
    from_path = model.ask(path, "Where is the ledger?", SMALL, SHORT)
    assert from_path.token_ids == model.ask(TEXT, "Where is the ledger?", SMALL, SHORT).token_ids


def test_a_compressed_cache_answers_the_same_after_a_round_trip_through_a_ckv(model, tmp_path):
    cache = model.compress(TEXT, chunkkv.Compression("snapkv", ratio=0.3, window=8))
    assert cache.method == "snapkv" and cache.kept_tokens == pytest.approx(0.3 * cache.prompt_tokens, abs=1)
    assert cache.save(tmp_path / "doc.ckv") > 0
    again = chunkkv.CompressedCache.load(tmp_path / "doc.ckv")
    questions = ["Who keeps the ledger?", "Where is the tower?"]
    before = [a.token_ids for a in model.answers(cache, questions, SHORT)]
    after = [a.token_ids for a in model.answers(again, questions, SHORT)]
    assert before == after and all(before)
    assert model.ask(again, questions[1], generation=SHORT).token_ids == after[1]


def test_narrowing_a_cache_with_a_compression_keeps_fewer_tokens(model):
    cache = model.compress(TEXT, chunkkv.Compression("snapkv", ratio=0.6, window=8))
    narrowed = model.ask(cache, "Who keeps the ledger?", chunkkv.Compression("chunkkv", ratio=0.2, window=8), SHORT)
    whole = model.ask(cache, "Who keeps the ledger?", generation=SHORT)
    assert narrowed.kept_tokens < whole.kept_tokens == pytest.approx(cache.kept_tokens)


def test_hooks_see_stages_layers_text_and_warnings(model):
    stages, layers, pieces, warnings = [], [], [], []
    hooks = chunkkv.Hooks(on_stage=lambda d, total: stages.append(d), on_layer=layers.append,
                          on_text=pieces.append, on_warning=warnings.append)  # fmt: skip
    answer = model.ask(TEXT, "Who?", chunkkv.Compression("chunkkv", budget=4, window=8), SHORT, hooks=hooks)
    assert stages == ["tokenising", "prefill + chunkkv"] and layers == [0, 1, 2, 3]
    assert "".join(pieces).strip() == answer.text
    assert len(warnings) == 1 and "observation window" in warnings[0]


def test_bad_input_raises_one_chunkkv_error(model, tmp_path):
    cache = model.compress(TEXT, chunkkv.Compression("snapkv", ratio=0.3, window=8))
    with pytest.raises(chunkkv.ChunkKVError, match="end in .ckv"):
        cache.save(tmp_path / "doc.safetensors")
    with pytest.raises(chunkkv.ChunkKVError, match="question is empty"):
        model.ask(cache, "  ")
    with pytest.raises(chunkkv.ChunkKVError, match="document is empty"):
        model.ask("", "Who?")
    with pytest.raises(chunkkv.ChunkKVError, match="exceeds the model's"):
        next(model.answers(cache, ["Who?"], chunkkv.Generation(max_new_tokens=10_000)))
    with pytest.raises(chunkkv.ChunkKVError, match="unknown method"):
        chunkkv.Compression("nonesuch")
    (tmp_path / "junk.ckv").write_bytes(b"not a cache")
    with pytest.raises(chunkkv.ChunkKVError, match="corrupt"):
        chunkkv.CompressedCache.load(tmp_path / "junk.ckv")


def test_a_cache_of_another_model_is_refused(model):
    cache = model.compress(TEXT, chunkkv.Compression("snapkv", ratio=0.3, window=8))
    cache.meta["model"]["weights_sha256"] = "0" * 64
    with pytest.raises(chunkkv.ChunkKVError, match="another model's weights"):
        model.ask(cache, "Who?", generation=SHORT)


def test_compress_needs_a_method_whose_cache_serves_later_questions(model):
    once = set(chunkkv.methods(reusable=True))
    assert once < set(chunkkv.methods())
    per_step = next(name for name in chunkkv.methods() if name not in once)
    with pytest.raises(chunkkv.ChunkKVError, match="compresses a document once"):
        model.compress(TEXT, chunkkv.Compression(per_step, ratio=0.3))


def test_the_method_registry_gives_each_method_its_class():
    for name in chunkkv.methods():
        cls = chunkkv.method(name)
        assert cls.name == name and cls.__doc__.strip()
    assert all(chunkkv.method(name).caps.reusable for name in chunkkv.methods(reusable=True))


def test_bundled_samples_are_found_and_a_missing_one_is_named():
    assert chunkkv.sample().name == "lighthouse.md" and chunkkv.sample().is_file()
    assert (chunkkv.samples_dir() / "questions.txt").is_file()
    with pytest.raises(chunkkv.ChunkKVError, match="no bundled sample 'nope.md'"):
        chunkkv.sample("nope.md")


def test_the_public_names_are_documented():
    for name in chunkkv.__all__:
        obj = getattr(chunkkv, name)
        assert name == "__version__" or (obj.__doc__ or "").strip(), name
