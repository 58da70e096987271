"""`chunkkv batch` under a real torchrun launch: two processes on CPU meeting over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*args: str, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def write_jobs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_two_ranks_answer_every_job_once_and_rank_zero_merges(tmp_path):
    rows = [{"id": f"j{i}", "document": f"d{i % 3}.md", "question": f"q{i}" + (" fail" if i == 4 else "")}
            for i in range(10)]  # fmt: skip
    jobs, out = write_jobs(tmp_path / "jobs.jsonl", rows), tmp_path / "answers.jsonl"
    result = torchrun(str(ROOT / "tests" / "batch_rank.py"), str(jobs), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("SUMMARY ")]
    summary = json.loads(line.removeprefix("SUMMARY "))
    assert (summary["ranks"], summary["answered"], summary["failed"]) == (2, 9, 1)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [f"j{i}" for i in range(10)]
    for record in records:  # each answer came from the rank that wrote the record
        assert record["status"] == "error" or record["answer"].endswith(f"from rank {record['rank']}")
    ranks_of = {}
    for record in records:
        ranks_of.setdefault(record["document"], set()).add(record["rank"])
    assert sorted(len(r) for r in ranks_of.values()) == [1, 1, 1] and {0, 1} == set().union(*ranks_of.values())
    assert records[4]["error"] == "ValueError: asked to fail"
    assert not (tmp_path / "answers.jsonl.parts").exists()


@pytest.mark.slow
def test_cli_on_two_ranks_gives_the_answers_of_one_process(tmp_path):
    """The embedded SmolLM2 on CPU: `torchrun ... chunkkv batch` equals a plain `chunkkv batch`."""
    text = (ROOT / "samples" / "lighthouse.md").read_text()
    (tmp_path / "first.md").write_text(text[:800])
    (tmp_path / "second.md").write_text(text[800:1600])
    rows = [
        {"document": "first.md", "question": "What is this document about?"},
        {"document": "second.md", "question": "Who is named here?"},
        {"document": "first.md", "question": "Which year is mentioned first?"},
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", rows)
    options = ["--device", "cpu", "--ratio", "0.3", "--max-new-tokens", "8", "--json"]
    single = subprocess.run(
        [sys.executable, "-m", "chunkkv_cli.cli", "batch", str(jobs), "-o", str(tmp_path / "one.jsonl"), *options],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    result = torchrun("-m", "chunkkv_cli.cli", "batch", str(jobs), "-o", str(tmp_path / "two.jsonl"), *options)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["ranks"] == 2
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["answer"] for r in two] == [r["answer"] for r in one] and all(r["answer"] for r in two)
    assert {r["rank"] for r in two} == {0, 1} and two[0]["rank"] == two[2]["rank"]
