"""`chunkkv batch` without a model: the jobs file, sharding over ranks, resume, failures and the merge.

The runner is a plain function (no torch), so these run in milliseconds; ranks run as threads that meet at
the same barriers torch.distributed would give them.
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chunkkv_cli import answers
from chunkkv_cli.batch import Rank, Settings, check_resume, run_batch
from chunkkv_cli.cli import app
from chunkkv_cli.documents import read_document
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.jobs import batch_methods, default_id, read_jobs, run_order, shard

SETTINGS = Settings(model="fake")


def write_jobs(folder: Path, rows: list, name: str = "jobs.jsonl") -> Path:
    path = folder / name
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def docs(tmp_path):
    for name, text in (("a.md", "alpha " * 5), ("b.md", "bravo " * 7), ("c.md", "charlie " * 3)):
        (tmp_path / name).write_text(text)
    return tmp_path


# The jobs of most tests: five documents' worth, interleaved so input order and run order differ.
ROWS = [
    {"id": "a1", "document": "a.md", "question": "first?"},
    {"id": "b1", "document": "b.md", "question": "second?"},
    {"id": "a2", "document": "a.md", "question": "third?"},
    {"id": "c1", "document": "c.md", "question": "fourth?"},
    {"id": "b2", "document": "b.md", "question": "fifth?"},
    {"id": "a3", "document": "./a.md", "question": "sixth?"},
]


class Recorder:
    """A fake runner: the answer is the document's length and the reversed question; every call is logged."""

    def __init__(self, fail_on: str | None = None, stop_after: int | None = None):
        self.calls: list[tuple[str, str]] = []
        self.fail_on, self.stop_after = fail_on, stop_after
        self.lock = threading.Lock()

    def __call__(self, job, settings):
        with self.lock:
            if self.stop_after is not None and len(self.calls) == self.stop_after:
                raise KeyboardInterrupt  # the run is killed here
            self.calls.append((job.id, threading.current_thread().name))
        text = read_document(str(job.path))  # a missing document fails like the real runner
        if job.question == self.fail_on:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"answer": f"{len(text)}:{job.question[::-1]}", "new_tokens": 3, "prefill_tokens": 10}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the jobs file ---------------------------------------------------------------------------------------


def test_read_jobs_fields_paths_and_ids(docs):
    rows = [
        {"document": "a.md", "question": "Who?"},
        "",
        {"id": 7, "document": str(docs / "b.md"), "question": "When?", "method": "snapkv", "budget": 64},
        {"id": "x", "document": "sub/../c.md", "question": "Why?", "ratio": 0.25, "meta": {"gold": ["1911"]}},
    ]
    first, second, third = read_jobs(write_jobs(docs, rows))
    assert (first.id, first.line, first.path) == (default_id("a.md", "Who?"), 1, docs / "a.md")
    assert len(first.id) == 12 and first.method is first.ratio is first.budget is None
    assert (second.id, second.line, second.method, second.budget, second.path) == ("7", 3, "snapkv", 64, docs / "b.md")
    assert (third.id, third.ratio, third.meta, third.document) == ("x", 0.25, {"gold": ["1911"]}, "sub/../c.md")


def test_relative_documents_are_read_from_the_jobs_folder_not_the_working_directory(docs, tmp_path, monkeypatch):
    (docs / "sub").mkdir()
    jobs_file = write_jobs(docs / "sub", [{"document": "../a.md", "question": "q"}])
    monkeypatch.chdir(tmp_path.parent)
    (job,) = read_jobs(jobs_file)
    assert job.path.resolve() == (docs / "a.md").resolve() and job.path.is_file()


def test_default_ids_follow_the_job_not_its_line(docs):
    rows = [{"document": "a.md", "question": "one?"}, {"document": "a.md", "question": "two?"}]
    forward = [job.id for job in read_jobs(write_jobs(docs, rows))]
    backward = [job.id for job in read_jobs(write_jobs(docs, [""] + rows[::-1]))]
    assert forward == backward[::-1] and forward[0] != forward[1]
    assert default_id("a.md", "one?", method="snapkv") != default_id("a.md", "one?")
    assert default_id("a.md", "one?", ratio=0.2) != default_id("a.md", "one?", budget=1)


def test_batch_methods_are_the_registered_methods_whose_compression_is_reusable():
    from chunkkv_cli.commands.options import Method
    from chunkkv_cli.compress import METHODS

    assert set(batch_methods()) == {m.value for m in Method if METHODS[m.value].caps.reusable}
    assert "clusterkv" not in batch_methods() and "chunkkv" in batch_methods()


GOOD = json.dumps({"document": "a.md", "question": "fine?"})


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ('{"document": "a.md", "question": ', "not valid JSON"),
        ('["a.md", "q"]', "expected a JSON object"),
        ('{"question": "q"}', "'document' must be a non-empty string"),
        ('{"document": "a.md", "question": "  "}', "'question' must be a non-empty string"),
        ('{"document": 3, "question": "q"}', "'document' must be a non-empty string"),
        ('{"document": "a.md", "questoin": "q"}', "unknown key 'questoin'"),
        ('{"document": "a.md", "question": "q", "method": "clusterkv"}', "'method' must be one of chunkkv"),
        ('{"document": "a.md", "question": "q", "ratio": 0}', "'ratio' must be a number in (0, 1]"),
        ('{"document": "a.md", "question": "q", "ratio": 1.5}', "'ratio' must be a number in (0, 1]"),
        ('{"document": "a.md", "question": "q", "ratio": "0.2"}', "'ratio' must be a number"),
        ('{"document": "a.md", "question": "q", "ratio": true}', "'ratio' must be a number"),
        ('{"document": "a.md", "question": "q", "budget": 0}', "'budget' must be a positive integer"),
        ('{"document": "a.md", "question": "q", "budget": 12.5}', "'budget' must be a positive integer"),
        ('{"document": "a.md", "question": "q", "ratio": 0.2, "budget": 9}', "'ratio' or 'budget', not both"),
        ('{"id": true, "document": "a.md", "question": "q"}', "'id' must be a non-empty string or an integer"),
        ('{"id": "", "document": "a.md", "question": "q"}', "'id' must be a non-empty string or an integer"),
        (GOOD, "repeats line 1"),
    ],
)
def test_a_malformed_line_is_named_by_its_number(docs, bad, fragment):
    path = write_jobs(docs, [GOOD, "", bad, {"document": "b.md", "question": "after?"}])
    with pytest.raises(ChunkKVError) as err:
        read_jobs(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: ") and fragment in message and "\n" not in message


def test_cli_reports_a_malformed_line_in_one_line(docs):
    path = write_jobs(docs, [GOOD, '{"document": "a.md"}'])
    result = CliRunner().invoke(app, ["batch", str(path), "-o", str(docs / "out.jsonl")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {path}:2: 'question' must be a non-empty string"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--method", "clusterkv"], "--method clusterkv"),
        (["--ratio", "2"], "--ratio must be in (0, 1]"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--decoder", "turbo"], "--decoder must be one of"),
        (["--model", "nope"], "unknown model 'nope'"),
        (["-o", "/no/such/folder/out.jsonl"], "--output folder does not exist"),
    ],
)
def test_cli_option_errors(docs, args, fragment):
    path = write_jobs(docs, [GOOD])
    result = CliRunner().invoke(app, ["batch", str(path), "-o", str(docs / "out.jsonl"), *args])
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.output


def test_missing_jobs_file(tmp_path):
    with pytest.raises(ChunkKVError, match="jobs file not found"):
        read_jobs(tmp_path / "nope.jsonl")


# --- sharding --------------------------------------------------------------------------------------------


def many_jobs(folder: Path, n_docs: int = 9) -> list:
    """Documents with 1..n questions each, lines interleaved."""
    rows = [{"document": f"d{d}.md", "question": f"q{q}"} for q in range(n_docs) for d in range(n_docs) if q <= d % 5]
    return read_jobs(write_jobs(folder, rows))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_job_lands_on_exactly_one_rank_and_no_document_is_split(tmp_path, world):
    jobs = many_jobs(tmp_path)
    shards = shard(jobs, world)
    assert len(shards) == world
    ids = [job.id for part in shards for job in part]
    assert sorted(ids) == sorted(job.id for job in jobs) and len(ids) == len(set(ids))
    owner = {}
    for rank, part in enumerate(shards):
        for job in part:
            assert owner.setdefault(job.document, rank) == rank, f"{job.document} on ranks {owner[job.document]} and {rank}"
    biggest_document = max(sum(j.document == d for j in jobs) for d in owner)
    sizes = [len(part) for part in shards]
    assert max(sizes) - min(sizes) <= biggest_document
    assert shard(jobs, world) == shards  # deterministic: every rank computes the same split


def test_documents_are_dealt_largest_first_to_the_least_loaded_rank(docs):
    rows = [{"document": d, "question": f"{d} {i}"} for d, n in (("d.md", 1), ("c.md", 2), ("b.md", 2), ("a.md", 3))
            for i in range(n)]  # fmt: skip
    jobs = read_jobs(write_jobs(docs, rows))
    zero, one = shard(jobs, 2)
    # a (3) -> rank 0; b and c (2 each, c first in the file) -> rank 1 then rank 1 (2 < 3); d (1) -> rank 0
    assert [j.document for j in zero] == ["d.md", "a.md", "a.md", "a.md"]
    assert [j.document for j in one] == ["c.md", "c.md", "b.md", "b.md"]


def test_one_file_spelt_two_ways_is_one_document(docs):
    jobs = read_jobs(write_jobs(docs, ROWS))
    for part in shard(jobs, 3):
        if any(j.id == "a1" for j in part):
            assert {"a1", "a2", "a3"} <= {j.id for j in part}


def test_run_order_groups_a_documents_jobs_by_compression(docs):
    rows = [
        {"id": "1", "document": "a.md", "question": "q1"},
        {"id": "2", "document": "b.md", "question": "q2"},
        {"id": "3", "document": "a.md", "question": "q3", "ratio": 0.5},
        {"id": "4", "document": "a.md", "question": "q4"},
        {"id": "5", "document": "a.md", "question": "q5", "ratio": 0.5},
    ]
    assert [j.id for j in run_order(read_jobs(write_jobs(docs, rows)))] == ["1", "4", "3", "5", "2"]


# --- running, failures, resume, merge ----------------------------------------------------------------------


def test_answers_are_merged_in_input_order_and_each_document_is_run_together(docs):
    jobs = read_jobs(write_jobs(docs, ROWS))
    out = docs / "answers.jsonl"
    runner = Recorder()
    summary = run_batch(jobs, out, runner, SETTINGS)
    assert [call[0] for call in runner.calls] == ["a1", "a2", "a3", "b1", "b2", "c1"]
    rows = records(out)
    assert [r["id"] for r in rows] == ["a1", "b1", "a2", "c1", "b2", "a3"]
    assert rows[1]["answer"] == "42:?dnoces" and rows[1]["status"] == "ok" and rows[1]["error"] is None
    assert rows[1]["settings"]["ratio"] == 0.1 and rows[1]["settings"]["model"] == "fake" and rows[1]["rank"] == 0
    assert not answers.parts_dir(out).exists()
    assert summary["answered"] == 6 and summary["failed"] == summary["skipped"] == summary["missing"] == 0
    assert summary["new_tokens"] == 18 and summary["prefill_tokens"] == 60 and summary["ranks"] == 1


def test_a_failed_job_is_recorded_and_the_others_go_on(docs):
    rows = [*ROWS[:3], {"id": "gone", "document": "missing.md", "question": "q"}, *ROWS[3:]]
    jobs = read_jobs(write_jobs(docs, rows))
    out = docs / "answers.jsonl"
    summary = run_batch(jobs, out, Recorder(fail_on="third?"), SETTINGS)
    by_id = {r["id"]: r for r in records(out)}
    assert len(by_id) == 7 and summary["answered"] == 5 and summary["failed"] == 2
    assert by_id["gone"]["status"] == "error" and by_id["gone"]["answer"] is None
    assert "document not found" in by_id["gone"]["error"] and "missing.md" in by_id["gone"]["error"]
    assert by_id["a2"]["error"].startswith("out of memory: CUDA out of memory")
    assert by_id["a3"]["status"] == "ok"  # the job after the failure, on the same document


def test_per_job_settings_are_recorded(docs):
    rows = [{"id": "s", "document": "a.md", "question": "q", "method": "snapkv", "budget": 99, "meta": [1, 2]}]
    run_batch(read_jobs(write_jobs(docs, rows)), docs / "out.jsonl", Recorder(), SETTINGS)
    (record,) = records(docs / "out.jsonl")
    assert record["settings"]["method"] == "snapkv" and record["settings"]["budget"] == 99
    assert record["settings"]["ratio"] is None and record["meta"] == [1, 2]


def test_an_interrupted_run_resumes_without_redoing_finished_jobs(docs):
    jobs = read_jobs(write_jobs(docs, ROWS))
    out = docs / "answers.jsonl"
    with pytest.raises(KeyboardInterrupt):
        run_batch(jobs, out, Recorder(stop_after=4), SETTINGS)
    assert not out.exists()
    (part,) = answers.parts_dir(out).iterdir()
    assert [r["id"] for r in records(part)] == ["a1", "a2", "a3", "b1"]
    again = Recorder()
    summary = run_batch(jobs, out, again, SETTINGS)
    assert [call[0] for call in again.calls] == ["c1", "b2"]  # b1 is done: c1 (line 4) now comes first
    assert summary["skipped"] == 4 and summary["answered"] == 2
    assert [r["id"] for r in records(out)] == ["a1", "b1", "a2", "c1", "b2", "a3"]
    third = Recorder()
    assert run_batch(jobs, out, third, SETTINGS)["skipped"] == 6 and third.calls == []


def test_failed_jobs_are_tried_again_on_a_rerun(docs):
    rows = [ROWS[0], {"id": "late", "document": "late.md", "question": "q"}]
    jobs = read_jobs(write_jobs(docs, rows))
    out = docs / "answers.jsonl"
    assert run_batch(jobs, out, Recorder(), SETTINGS)["failed"] == 1
    (docs / "late.md").write_text("now here")
    runner = Recorder()
    summary = run_batch(jobs, out, runner, SETTINGS)
    assert runner.calls == [("late", threading.current_thread().name)]
    assert summary["failed"] == 0 and [r["status"] for r in records(out)] == ["ok", "ok"]


def test_a_torn_last_line_is_ignored_and_cut_before_appending(docs):
    jobs = read_jobs(write_jobs(docs, ROWS))
    out = docs / "answers.jsonl"
    part = answers.part_path(out, 0, 1)
    part.parent.mkdir()
    good = {"id": "a1", "status": "ok", "answer": "kept", "settings": {**SETTINGS.for_job(jobs[0]).__dict__}}
    part.write_text(json.dumps(good) + "\n" + '{"id": "b1", "status": "o')  # killed mid-write
    runner = Recorder()
    run_batch(jobs, out, runner, SETTINGS)
    assert "a1" not in [call[0] for call in runner.calls] and "b1" in [call[0] for call in runner.calls]
    rows = records(out)
    assert len(rows) == 6 and rows[0]["answer"] == "kept"


def test_a_corrupt_middle_line_is_an_error_naming_it(docs):
    out = docs / "answers.jsonl"
    out.write_text('{"id": "a1", "status": "ok"}\nnot json\n{"id": "b1", "status": "ok"}\n')
    with pytest.raises(ChunkKVError, match=r"answers.jsonl:2: not a batch answer record"):
        run_batch(read_jobs(write_jobs(docs, ROWS)), out, Recorder(), SETTINGS)


def test_resume_refuses_other_settings_and_other_jobs(docs):
    jobs = read_jobs(write_jobs(docs, ROWS))
    out = docs / "answers.jsonl"
    run_batch(jobs, out, Recorder(), SETTINGS)
    with pytest.raises(ChunkKVError, match=r"answered with ratio = 0.1, this run asks for 0.2"):
        run_batch(jobs, out, Recorder(), Settings(model="fake", ratio=0.2))
    with pytest.raises(ChunkKVError, match=r"holds records of 3 jobs not in the jobs file"):
        run_batch(read_jobs(write_jobs(docs, ROWS[:3], "fewer.jsonl")), out, Recorder(), SETTINGS)
    check_resume(answers.existing_records(out), jobs, Settings(model="fake", ratio=0.1), out)  # 0.1 is the default


def test_an_error_record_never_replaces_an_answer():
    ok, error = {"id": "x", "status": "ok", "answer": "yes"}, {"id": "x", "status": "error", "error": "later"}
    assert answers.latest([ok, error])["x"] is ok
    assert answers.latest([error, ok])["x"] is ok
    newer = {"id": "x", "status": "ok", "answer": "newer"}
    assert answers.latest([ok, newer])["x"] is newer


# --- ranks ------------------------------------------------------------------------------------------------


class ThreadCollective:
    """torch.distributed's barrier and all_gather_object, for ranks that are threads of one process."""

    def __init__(self, world: int):
        self.world, self._barrier, self._slots = world, threading.Barrier(world, timeout=30), [None] * world

    def for_rank(self, rank: int):
        outer = self

        class One:
            def barrier(self):
                outer._barrier.wait()

            def gather(self, value):
                outer._slots[rank] = value
                outer._barrier.wait()
                values = list(outer._slots)
                outer._barrier.wait()
                return values

        return One()


def run_ranks(jobs, out, world: int, runner, settings=SETTINGS) -> list:
    """run_batch on `world` threads at once, as torchrun would start them; returns each rank's return value."""
    group, results, errors = ThreadCollective(world), [None] * world, []

    def one(rank: int) -> None:
        try:
            results[rank] = run_batch(jobs, out, runner, settings, Rank(rank, world, rank), collective=group.for_rank(rank))
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=one, args=(r,), name=f"rank{r}") for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_the_work_and_rank_zero_merges_in_input_order(tmp_path, world):
    jobs = many_jobs(tmp_path)
    for d in range(9):
        (tmp_path / f"d{d}.md").write_text(f"document {d}")
    out = tmp_path / "answers.jsonl"
    runner = Recorder()
    summary, *others = run_ranks(jobs, out, world, runner)
    assert others == [None] * (world - 1)
    ran = [job_id for job_id, _ in runner.calls]
    assert sorted(ran) == sorted(job.id for job in jobs) and len(ran) == len(set(ran))
    rows = records(out)
    assert [r["id"] for r in rows] == [job.id for job in jobs]
    ranks_of = {}
    for row in rows:
        ranks_of.setdefault(row["document"], set()).add(row["rank"])
    assert all(len(ranks) == 1 for ranks in ranks_of.values())
    assert {row["rank"] for row in rows} == set(range(world))
    assert summary["answered"] == len(jobs) and summary["ranks"] == world
    assert not answers.parts_dir(out).exists()


def test_a_run_on_three_ranks_resumes_on_two(tmp_path):
    jobs = many_jobs(tmp_path)
    for d in range(9):
        (tmp_path / f"d{d}.md").write_text(f"document {d}")
    out = tmp_path / "answers.jsonl"
    # An interrupted 3-rank run: only rank 2 wrote its part before the job was killed.
    third = shard(jobs, 3)[2]
    answers.part_path(out, 2, 3).parent.mkdir()
    with answers.PartWriter(answers.part_path(out, 2, 3)) as writer:
        for job in third:
            writer.write({"id": job.id, "status": "ok", "answer": "old", "settings": SETTINGS.for_job(job).__dict__})
    runner = Recorder()
    summary, _ = run_ranks(jobs, out, 2, runner)
    ran = [job_id for job_id, _ in runner.calls]
    assert sorted(ran + [job.id for job in third]) == sorted(job.id for job in jobs)
    assert summary["skipped"] == len(third) and summary["answered"] == len(jobs) - len(third)
    assert [r["id"] for r in records(out)] == [job.id for job in jobs]


def test_rank_from_environment():
    assert Rank.from_env({}) == Rank(0, 1, 0)
    assert Rank.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Rank(3, 4, 1)
    assert Rank.from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Rank(2, 4, 2)
    for env, fragment in (({"RANK": "4", "WORLD_SIZE": "4"}, "0 <= RANK < WORLD_SIZE"), ({"WORLD_SIZE": "two"}, "WORLD_SIZE")):
        with pytest.raises(ChunkKVError, match=fragment):
            Rank.from_env(env)


def test_every_rank_count_gives_the_same_answers_file(tmp_path):
    """Whatever the number of ranks, the merged file is the same (rank and timing fields aside)."""
    jobs = many_jobs(tmp_path)
    for d in range(9):
        (tmp_path / f"d{d}.md").write_text(f"document {d}")
    files = []
    for world in (1, 2, 4):
        out = tmp_path / f"answers-{world}.jsonl"
        run_ranks(jobs, out, world, Recorder())
        files.append([{k: v for k, v in r.items() if k not in ("rank", "seconds")} for r in records(out)])
    assert all(a == b for a, b in itertools.pairwise(files))


def test_ranks_without_a_launcher_fail_in_one_line(docs, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, ["batch", str(write_jobs(docs, [GOOD])), "-o", str(docs / "out.jsonl")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "rank 1 of 2 cannot reach the other ranks" in result.stderr and "torchrun" in result.stderr
