"""Compress once, ask many: saved .ckv caches, their checks, atomic writes, and the CLI around them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from chunkkv_cli import cache_io
from chunkkv_cli.cli import app
from chunkkv_cli.compress import METHODS, make_compressor
from chunkkv_cli.documents import prefix_ids, prompt_ids, question_ids, read_questions
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.generate import decode, new_target, prefill
from chunkkv_cli.reuse import compress_prefix, question_tokens
from tests.conftest import CharTokenizer, tiny_model

DOC = "The harbour master keeps the blue ledger in the tower. " * 6
QUESTIONS = ["Who keeps the ledger?", "Where is the ledger kept?", "What colour is it?"]


class Tokenizer(CharTokenizer):
    """CharTokenizer whose decode is one-to-one, so equal answers mean equal tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x100 + i) for i in ids)


class OtherTokenizer(Tokenizer):
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [(b + 1) % 128 for b in text.encode()]}


def loaded_with(model, tokenizer):
    from chunkkv_cli.model import Loaded
    from chunkkv_cli.profiles import load_profile

    return Loaded(model, tokenizer, replace(load_profile("smollm2-135m"), max_context=1000), "cpu")


@pytest.fixture
def use_model(monkeypatch):
    """Patch the CLI's model loader; returns a setter so a test can switch models between commands."""
    from chunkkv_cli.options import ModelSpec

    def use(model, tokenizer=None):
        loaded = loaded_with(model, tokenizer or Tokenizer())
        monkeypatch.setattr(ModelSpec, "load", lambda *args, **kwargs: loaded)
        return loaded

    return use


@pytest.fixture
def files(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC)
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    return doc, questions, tmp_path / "doc.ckv"


def cli(*args, **kwargs):
    return CliRunner().invoke(app, list(map(str, args)), **kwargs)


def jsonl(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def json_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def compress_cli(doc, out, *extra):
    method = () if "--method" in extra else ("--method", "chunkkv")
    result = cli("compress", doc, "-o", out, "--ratio", "0.3", "--window", "8", *method, *extra, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- the prompt split -----------------------------------------------------------------------------------


def test_prefix_and_question_ids_rebuild_the_full_prompt():
    tok = Tokenizer()
    for question in QUESTIONS:
        assert prefix_ids(tok, DOC) + question_ids(tok, question) == prompt_ids(tok, DOC, question)
    assert CharTokenizer().decode(prefix_ids(tok, DOC)[-10:])  # ends with the closing tag and "Question: "


def test_read_questions_lines_and_jsonl(tmp_path):
    plain, lines = tmp_path / "q.txt", tmp_path / "q.jsonl"
    plain.write_text("First?\n\n  Second?  \n")
    lines.write_text('{"question": "First?", "answers": ["a"]}\n{"question": "Second?"}\n')
    assert read_questions(str(plain)) == read_questions(str(lines)) == ["First?", "Second?"]
    lines.write_text('{"question": "First?"}\n{"q": 1}\n')
    with pytest.raises(ChunkKVError, match="q.jsonl:2"):
        read_questions(str(lines))


# --- library: round trips and equivalence ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (240,), generator=torch.Generator().manual_seed(4)).tolist()


def save_prefix(path, prefix, **meta):
    base = {"format": cache_io.FORMAT, "format_version": 1, "layers": len(prefix.keys),
            "prefix_tokens": prefix.prefix_len, "full_kv_bytes": prefix.full_bytes}  # fmt: skip
    cache_io.save(path, prefix, {**base, **meta})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_round_trips_and_answers_the_same(model, ids, tmp_path, method):
    prefix = compress_prefix(model, ids, make_compressor(method, budget=50, window=8))
    save_prefix(tmp_path / "x.ckv", prefix)
    _, loaded = cache_io.read(tmp_path / "x.ckv")
    cache_io.check_shapes(loaded, model.config, "x.ckv")
    assert loaded.kept_lengths() == prefix.kept_lengths()
    tensors = zip(prefix.keys + prefix.values + prefix.positions, loaded.keys + loaded.values + loaded.positions)
    for mine, theirs in tensors:
        assert torch.equal(mine, theirs)
    question = [7, 30, 99, 4]
    assert torch.equal(question_tokens(model, prefix, question, 8), question_tokens(model, loaded, question, 8))


def test_pyramidkv_layers_differ_and_per_head_positions_are_kept(model, ids, tmp_path):
    prefix = compress_prefix(model, ids, make_compressor("pyramidkv", budget=50, window=8))
    save_prefix(tmp_path / "p.ckv", prefix)
    _, loaded = cache_io.read(tmp_path / "p.ckv")
    assert len(set(loaded.kept_lengths())) == 4
    assert loaded.positions[0].shape == (1, 2, loaded.kept_lengths()[0])


def test_fullkv_prefix_plus_question_equals_one_prefill_of_the_whole_prompt(model, ids):
    question = [11, 12, 13, 14, 15]
    target = new_target(model, make_compressor("fullkv"))
    pre = prefill(model, torch.tensor([ids + question]), [target])
    whole = decode(model, target.cache, pre.logits, len(ids) + len(question), 10)
    split = question_tokens(model, compress_prefix(model, ids, make_compressor("fullkv")), question, 10)
    assert torch.equal(whole, split)


def test_each_question_gets_its_own_copy(model, ids):
    prefix = compress_prefix(model, ids, make_compressor("chunkkv", budget=40, window=8))
    before = [k.clone() for k in prefix.keys]
    first = question_tokens(model, prefix, [1, 2, 3], 6)
    question_tokens(model, prefix, [9, 9], 6)
    assert torch.equal(first, question_tokens(model, prefix, [1, 2, 3], 6))
    assert all(torch.equal(a, b) for a, b in zip(before, prefix.keys)) and prefix.kept_lengths() == [40] * 4


def test_identity_ignores_dtype_and_load_path_but_not_weights(model):
    half = tiny_model().to(torch.bfloat16)
    assert cache_io.weights_hash(half) == cache_io.weights_hash(model)
    assert cache_io.config_hash(half.config) == cache_io.config_hash(model.config)
    other = tiny_model()
    with torch.no_grad():
        other.model.layers[2].mlp.up_proj.weight.mul_(1.1)
    assert cache_io.weights_hash(other) != cache_io.weights_hash(model)
    assert cache_io.tokenizer_hash(Tokenizer()) != cache_io.tokenizer_hash(OtherTokenizer())


# --- atomic writes --------------------------------------------------------------------------------------


def failing_save_file(tensors, filename, metadata=None):
    with open(filename, "wb") as file:
        file.write(b"half a cache")
    raise OSError(28, "No space left on device")


def test_interrupted_write_leaves_no_file_and_keeps_the_old_one(model, ids, tmp_path, monkeypatch):
    import safetensors.torch

    prefix = compress_prefix(model, ids, make_compressor("chunkkv", budget=40, window=8))
    path = tmp_path / "doc.ckv"
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(ChunkKVError, match="No space left"):
        save_prefix(path, prefix)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"previous cache")
    with pytest.raises(ChunkKVError):
        save_prefix(path, prefix)
    assert path.read_bytes() == b"previous cache" and list(tmp_path.iterdir()) == [path]


def test_interrupted_compress_command_leaves_no_file(model, use_model, files, monkeypatch):
    import safetensors.torch

    doc, _, out = files
    use_model(model)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    result = one_line_error(cli("compress", doc, "-o", out), "cannot write", "No space left")
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["doc.txt", "questions.txt"]
    assert result


# --- the CLI --------------------------------------------------------------------------------------------


def test_ask_saved_cache_equals_compress_and_ask_in_one_process(model, use_model, files):
    doc, questions, out = files
    use_model(model)
    report = compress_cli(doc, out, "--method", "kvzip")  # both paths' default: compression before the questions
    assert report["method"] == "kvzip" and report["prefix_tokens"] == len(prefix_ids(Tokenizer(), DOC)) and out.stat().st_size == report["file_bytes"]
    options = ("--ratio", "0.3", "--window", "8")
    together = jsonl(cli("ask", doc, "--questions", questions, *options, "--max-new-tokens", "12", "--json"))
    from_file = jsonl(cli("ask", out, "--questions", questions, "--max-new-tokens", "12", "--json"))
    one = json_of(cli("ask", out, QUESTIONS[1], "--max-new-tokens", "12", "--json"))
    assert [r["question"] for r in together] == QUESTIONS
    assert [r["answer"] for r in together] == [r["answer"] for r in from_file]
    assert one["answer"] == together[1]["answer"] and one["new_tokens"] == 12 and one["cache"] == str(out)


def test_compress_defaults_to_the_question_agnostic_method(tmp_path):
    doc, out = tmp_path / "doc.md", tmp_path / "doc.ckv"
    doc.write_text(DOC)
    result = cli("compress", str(doc), "-o", str(out), "--ratio", "0.3", "--window", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "kvzip"


def test_saved_cache_answers_match_the_library_tokens(model, use_model, files):
    from chunkkv_cli.reuse import compress_prefix as compress_in_process

    doc, _, out = files
    use_model(model)
    compress_cli(doc, out)
    tok = Tokenizer()
    prefix = compress_in_process(model, prefix_ids(tok, DOC), make_compressor("chunkkv", ratio=0.3, window=8))
    expected = tok.decode(question_tokens(model, prefix, question_ids(tok, QUESTIONS[0]), 12)[0].tolist())
    assert json_of(cli("ask", out, QUESTIONS[0], "--max-new-tokens", "12", "--json"))["answer"] == expected


def test_questions_table_and_jsonl_file(model, use_model, files):
    doc, _, out = files
    use_model(model)
    compress_cli(doc, out)
    questions = out.parent / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": ["x"]}) + "\n" for q in QUESTIONS[:2]))
    result = cli("ask", out, "--questions", questions, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "Who keeps the ledger?" in result.stdout and "question" in result.stdout and "answer" in result.stdout


def test_inspect_reports_metadata_kept_lengths_and_size(model, use_model, files):
    doc, _, out = files
    use_model(model)
    compress_cli(doc, out, "--method", "pyramidkv")
    report = json_of(cli("inspect", out, "--json"))
    assert report["file_bytes"] == out.stat().st_size and report["method"]["name"] == "pyramidkv"
    assert len(set(report["kept_per_layer"])) == 4 and report["per_head"] is True
    assert report["document"]["source"] == "doc.txt" and report["prefix_tokens"] > 300
    text = cli("inspect", out)
    assert text.exit_code == 0 and "kept per layer" in text.stdout and "size on disk" in text.stdout


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    return result


@pytest.fixture
def saved(model, use_model, files):
    doc, _, out = files
    use_model(model)
    compress_cli(doc, out)
    return out


def test_another_model_is_refused(saved, use_model):
    use_model(tiny_model(num_hidden_layers=3))
    one_line_error(cli("ask", saved, "Who?"), "made with another model", "compress the document again")


def test_another_checkpoint_of_the_same_architecture_is_refused(saved, use_model):
    other = tiny_model()
    with torch.no_grad():
        other.lm_head.weight.add_(0.5)
    use_model(other)
    one_line_error(cli("ask", saved, "Who?"), "another model's weights")


def test_another_tokenizer_is_refused(saved, use_model, model):
    use_model(model, OtherTokenizer())
    one_line_error(cli("ask", saved, "Who?"), "made with another tokenizer")


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    one_line_error(cli("ask", saved, "Who?"), "corrupt or truncated")
    one_line_error(cli("inspect", saved), "corrupt or truncated")


@pytest.mark.parametrize("where", ["header", "data"])
def test_flipped_bytes(saved, where):
    data = bytearray(saved.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    spots = range(20, 8 + header_len, 97) if where == "header" else [8 + header_len + 1000]
    for spot in spots:
        flipped = bytearray(data)
        flipped[spot] ^= 0x55
        saved.write_bytes(bytes(flipped))
        one_line_error(cli("inspect", saved), "corrupt")


def rewrite_meta(path, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as file:
        meta = json.loads(file.metadata()["chunkkv"])
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    save_file(tensors, str(path), metadata={"chunkkv": json.dumps({**meta, **changes})})


def test_unknown_format_version(saved):
    rewrite_meta(saved, format_version=7)
    one_line_error(cli("ask", saved, "Who?"), "format version 7", "upgrade chunkkv")


def test_edited_metadata_fails_the_checksum(saved):
    rewrite_meta(saved, prefix_tokens=100)
    one_line_error(cli("ask", saved, "Who?"), "corrupt", "checksum")


def test_garbage_and_foreign_files(tmp_path, use_model, model):
    from safetensors.torch import save_file

    use_model(model)
    garbage = tmp_path / "garbage.ckv"
    garbage.write_bytes(b"\x07" * 64)
    one_line_error(cli("ask", garbage, "Who?"), "not a chunkkv cache")
    foreign = tmp_path / "foreign.ckv"
    save_file({"w": torch.zeros(2)}, str(foreign))
    one_line_error(cli("ask", foreign, "Who?"), "not a chunkkv cache")
    one_line_error(cli("ask", tmp_path / "missing.ckv", "Who?"), "cache file not found")


def test_compression_options_are_refused_for_a_saved_cache(saved):
    one_line_error(cli("ask", saved, "Who?", "--reuse-layers", "2"), "--reuse-layers sets how a document is compressed")
    one_line_error(cli("ask", saved, "Who?", "--method", "snapkv"), "give --ratio or --budget")
    one_line_error(cli("ask", saved, "Who?", "--ratio", "0.1", "--method", "h2o"), "h2o cannot narrow")


def test_a_saved_cache_is_narrowed_per_question_by_ratio(saved):
    plain = json_of(cli("ask", saved, "Who?", "--max-new-tokens", "4", "--json"))
    narrowed = json_of(cli("ask", saved, "Who?", "--ratio", "0.1", "--max-new-tokens", "4", "--json"))
    assert narrowed["narrowed_by"] == "chunkkv" and narrowed["kept_tokens"] < plain["kept_tokens"]
    document_tokens = plain["prompt_tokens"] - len(question_ids(Tokenizer(), "Who?"))
    assert narrowed["kept_tokens"] == round(0.1 * document_tokens)


def test_question_arguments(saved, files):
    one_line_error(cli("ask", saved, "Who?", "--questions", files[1]), "not both")
    one_line_error(cli("ask", saved), "give a question")


def test_compress_output_name(files, use_model, model):
    doc, _, _ = files
    use_model(model)
    one_line_error(cli("compress", doc, "-o", doc.parent / "doc.bin"), "must end in .ckv")
    one_line_error(cli("compress", "-", "--window", "8", input="text"), "--output is required")
    assert cli("compress", doc, "--ratio", "0.3", "--window", "8").exit_code == 0
    assert (doc.parent / "doc.ckv").is_file()


@pytest.mark.slow
def test_embedded_tokenizer_splits_the_sample_prompts_exactly():
    from pathlib import Path

    from transformers import AutoTokenizer

    from chunkkv_cli.model import weights_folder
    from chunkkv_cli.profiles import load_profile

    tok = AutoTokenizer.from_pretrained(weights_folder(load_profile("smollm2-135m")), local_files_only=True)
    samples = Path(__file__).resolve().parents[1] / "samples"
    doc = (samples / "lighthouse.md").read_text()
    prefix = prefix_ids(tok, doc)
    for question in read_questions(str(samples / "questions.jsonl")):
        assert prefix + question_ids(tok, question) == prompt_ids(tok, doc, question)
