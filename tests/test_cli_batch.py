"""`chunkkv batch` end to end on the tiny random model: the CLI's loader patched as in test_cli_ask."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chunkkv_cli.cli import app
from tests.test_cli_ask import tiny_loaded  # noqa: F401 - the fixture that patches the CLI's model loader
from tests.conftest import write_batch_jobs

OPTIONS = ["--ratio", "0.3", "--window", "8", "--max-new-tokens", "5"]


def cli(*args):
    return CliRunner().invoke(app, list(map(str, args)))


@pytest.fixture
def jobs(tmp_path):
    return write_batch_jobs(tmp_path)


def compressions(monkeypatch) -> list[int]:
    """Counts reuse.compress_prefix calls (the prefix lengths), to see each document compressed once."""
    from chunkkv_cli import reuse

    lengths, original = [], reuse.compress_prefix

    def counting(model, ids, *args, **kwargs):
        lengths.append(len(ids))
        return original(model, ids, *args, **kwargs)

    monkeypatch.setattr(reuse, "compress_prefix", counting)
    return lengths


def ask_questions(document, questions, tmp_path) -> list[str]:
    listing = tmp_path / f"{document.stem}-questions.txt"
    listing.write_text("\n".join(questions) + "\n")
    result = cli("ask", document, "--questions", listing, *OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line)["answer"] for line in result.stdout.splitlines() if line.startswith("{")]


def test_batch_answers_like_ask_questions_compressing_each_document_once(tiny_loaded, jobs, tmp_path, monkeypatch):  # noqa: F811
    compressed = compressions(monkeypatch)
    out = tmp_path / "answers.jsonl"
    result = cli("batch", jobs, "-o", out, *OPTIONS, "--json")
    assert result.exit_code == 1, result.output  # one job failed
    summary = json.loads(result.stdout)
    assert (summary["jobs"], summary["answered"], summary["failed"], summary["skipped"]) == (4, 3, 1, 0)
    assert summary["new_tokens"] == 15 and summary["tokens_per_second"] > 0
    assert len(compressed) == 2  # harbour once for both its questions, mill once
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["h1", "m1", "gone", "h2"]
    assert rows[2]["status"] == "error" and "document not found" in rows[2]["error"]
    assert rows[3]["meta"] == {"gold": "tower"} and rows[3]["settings"]["ratio"] == 0.3
    assert rows[0]["prefill_tokens"] == rows[0]["prompt_tokens"]  # the document and its question
    assert rows[3]["prefill_tokens"] == rows[3]["prompt_tokens"] - compressed[0]  # the question alone
    harbour = ask_questions(tmp_path / "harbour.txt", ["Who keeps the ledger?", "Where is the ledger?"], tmp_path)
    assert [rows[0]["answer"], rows[3]["answer"]] == harbour
    assert rows[1]["answer"] == ask_questions(tmp_path / "mill.txt", ["What is ground on Tuesdays?"], tmp_path)[0]


def test_batch_rerun_skips_answered_jobs_and_retries_the_failed_one(tiny_loaded, jobs, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "answers.jsonl"
    assert cli("batch", jobs, "-o", out, *OPTIONS).exit_code == 1
    first = out.read_text()
    (tmp_path / "nowhere.txt").write_text("Now the document exists. " * 3)
    compressed = compressions(monkeypatch)
    result = cli("batch", jobs, "-o", out, *OPTIONS)
    assert result.exit_code == 0, result.output
    assert "4 jobs · 1 answered, 0 failed, 3 skipped" in result.stdout
    assert len(compressed) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert [r["answer"] for i, r in enumerate(rows) if i != 2] == [
        json.loads(line)["answer"] for i, line in enumerate(first.splitlines()) if i != 2
    ]


def test_batch_question_aware_answers_like_ask(tiny_loaded, jobs, tmp_path):  # noqa: F811
    out = tmp_path / "answers.jsonl"
    result = cli("batch", jobs, "-o", out, *OPTIONS, "--question-aware", "--json")
    assert result.exit_code == 1, result.output
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    single = cli("ask", tmp_path / "mill.txt", "What is ground on Tuesdays?", *OPTIONS, "--json")
    assert single.exit_code == 0, single.output
    report = json.loads(single.stdout[single.stdout.index("{"):])
    assert rows["m1"]["answer"] == report["answer"] and rows["m1"]["prefill_tokens"] == report["prompt_tokens"]
    assert rows["m1"]["settings"]["question_aware"] is True


def test_batch_prompt_too_long_fails_that_job_only(tiny_loaded, jobs, tmp_path):  # noqa: F811
    (tmp_path / "harbour.txt").write_text("word " * 400)  # 2,000 characters: beyond the tiny profile's 600
    out = tmp_path / "answers.jsonl"
    result = cli("batch", jobs, "-o", out, *OPTIONS, "--json")
    assert result.exit_code == 1
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    for job_id in ("h1", "h2"):
        assert "the document's prompt is" in rows[job_id]["error"] and "--truncate" in rows[job_id]["error"]
    assert rows["m1"]["status"] == "ok"
    truncated = cli("batch", jobs, "-o", tmp_path / "cut.jsonl", *OPTIONS, "--truncate")
    assert "3 answered, 1 failed" in truncated.stdout
