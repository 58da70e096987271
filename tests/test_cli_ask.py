"""`chunkkv ask` through the CLI, with the model loader patched to a tiny model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chunkkv_cli.cli import app
from tests.conftest import CharTokenizer


@pytest.fixture
def tiny_loaded(model, monkeypatch):
    from dataclasses import replace

    from chunkkv_cli import model as model_module
    from chunkkv_cli.options import ModelSpec
    from chunkkv_cli.profiles import load_profile

    profile = replace(load_profile("smollm2-135m"), max_context=600)
    loaded = model_module.Loaded(model, CharTokenizer(), profile, "cpu")
    monkeypatch.setattr(ModelSpec, "load", lambda *args, **kwargs: loaded)
    return loaded


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("The harbour master keeps the blue ledger. " * 8)
    return path


def invoke(*args):
    return CliRunner().invoke(app, ["ask", *map(str, args)])


def test_ask_json_reports_kept_tokens_and_bytes(tiny_loaded, doc):
    result = invoke(doc, "Who keeps the ledger?", "--ratio", "0.2", "--max-new-tokens", "5", "--window", "8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["method"] == "chunkkv" and report["new_tokens"] == 5
    assert report["kept_tokens"] == pytest.approx(0.2 * report["prompt_tokens"], abs=1)
    assert report["kept_kv_bytes"] < 0.25 * report["full_kv_bytes"]


def test_ask_reads_standard_input(tiny_loaded):
    result = CliRunner().invoke(app, ["ask", "-", "Why?", "--max-new-tokens", "2", "--json"], input="some text " * 20)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("method", ["fullkv", "snapkv", "pyramidkv", "h2o", "streamingllm", "keydiff"])
def test_ask_every_method(tiny_loaded, doc, method):
    result = invoke(doc, "Who?", "--method", method, "--max-new-tokens", "3", "--window", "8", "--json")
    assert result.exit_code == 0, result.output


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output
    return result


def test_missing_file(tiny_loaded, tmp_path):
    one_line_error(invoke(tmp_path / "nope.txt", "q"), "not found", "nope.txt")


def test_empty_file(tiny_loaded, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    one_line_error(invoke(tmp_path / "empty.txt", "q"), "empty")


def test_binary_file(tiny_loaded, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    one_line_error(invoke(tmp_path / "blob.bin", "q"), "binary")


def test_non_utf8_file(tiny_loaded, tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    one_line_error(invoke(tmp_path / "latin.txt", "q"), "UTF-8")


def test_directory(tiny_loaded, tmp_path):
    one_line_error(invoke(tmp_path, "q"), "directory")


def test_unknown_method(tiny_loaded, doc):
    result = invoke(doc, "q", "--method", "magic")
    assert result.exit_code == 2 and "magic" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.2"])
def test_bad_ratio(tiny_loaded, doc, ratio):
    one_line_error(invoke(doc, "q", "--ratio", ratio), "--ratio must be in (0, 1]")


def test_prompt_longer_than_context(tiny_loaded, tmp_path):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text("word " * 400)
    result = one_line_error(invoke(long_doc, "q", "--max-new-tokens", "10"), "the prompt is 2", "room for 590", "--truncate")
    assert len(result.output.strip().splitlines()) == 1


def test_truncate_fits_the_context(tiny_loaded, tmp_path):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text("word " * 400)
    result = invoke(long_doc, "q", "--max-new-tokens", "4", "--truncate", "--json", "--window", "8")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["prompt_tokens"] <= 596

