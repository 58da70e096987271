"""`chunkkv batch --ray`: Ray Data on a local instance (2 CPUs) with the tiny model, against the local path.

The tests that start Ray are marked `ray` and skip where the extra is not installed (`make test-ray` runs them).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chunkkv_cli.batch import Settings, run_batch
from chunkkv_cli.batch_runner import ModelRunner
from chunkkv_cli.cli import app, fill_optional_values
from chunkkv_cli.jobs import read_jobs
from tests.conftest import write_batch_jobs

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Settings("tiny", "snapkv", ratio=0.3, window=8, max_new_tokens=5, decoder="hf")


def load_tiny():
    """The tiny random model with the byte tokenizer, as conftest and test_cli_ask build them (in any process)."""
    from chunkkv_cli.model import Loaded
    from chunkkv_cli.profiles import load_profile
    from tests.conftest import CharTokenizer, tiny_model

    return Loaded(tiny_model(), CharTokenizer(), replace(load_profile("smollm2-135m"), max_context=600), "cpu")


class TinyRunners:
    """A runner factory for the actors: one tiny model per actor. With `die_once`, the actor's process exits at
    its first job of mill.txt the first time any actor gets there (a marker file says it happened)."""

    def __init__(self, die_once: Path | None = None, die_always: bool = False):
        self.die_once, self.die_always, self.loaded = die_once, die_always, None

    def __call__(self, jobs):
        at_mill = jobs[0].path.name == "mill.txt"
        if at_mill and (self.die_always or (self.die_once is not None and not self.die_once.exists())):
            if self.die_once is not None:
                self.die_once.write_text(str(os.getpid()))
            os._exit(1)
        return ModelRunner(self._load, jobs, SETTINGS)

    def _load(self):
        if self.loaded is None:
            self.loaded = load_tiny()
        return self.loaded


@pytest.fixture
def jobs_file(tmp_path):
    return write_batch_jobs(tmp_path, [{"id": "m2", "document": "mill.txt", "question": "And on Fridays?", "ratio": 0.5}])


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    from chunkkv_cli.ray_batch import connect

    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    connect("local", num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["status"], r["answer"], r["error"], r["prompt_tokens"] if r["status"] == "ok" else None,
             r["settings"], r.get("meta")) for r in rows]  # fmt: skip


@pytest.mark.ray
def test_ray_gives_the_local_paths_records_and_resumes(local_ray, jobs_file, tmp_path):
    from chunkkv_cli.ray_batch import run_ray_batch

    jobs = read_jobs(jobs_file)
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run_batch(jobs, local_out, ModelRunner(load_tiny, jobs, SETTINGS), SETTINGS)
    seen = []
    summary = run_ray_batch(jobs, ray_out, TinyRunners(), SETTINGS, on_done=seen.append)
    assert (summary["answered"], summary["failed"], summary["ray_actors"]) == (4, 1, 2)
    assert comparable(records(ray_out)) == comparable(records(local_out))
    assert sorted(r["id"] for r in seen) == sorted(job.id for job in jobs)  # progress saw every job
    assert set(records(ray_out)[0]) == set(records(local_out)[0])  # the same schema
    kept = [r for r in records(ray_out) if r["id"] != "m2"]
    ray_out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    again = run_ray_batch(jobs, ray_out, TinyRunners(), SETTINGS)
    assert (again["answered"], again["skipped"], again["failed"]) == (1, 3, 1)  # m2 redone, gone retried
    assert comparable(records(ray_out)) == comparable(records(local_out))


@pytest.mark.ray
def test_an_actor_that_dies_has_its_document_retried_and_nothing_is_lost(local_ray, jobs_file, tmp_path):
    from chunkkv_cli.ray_batch import run_ray_batch

    jobs = read_jobs(jobs_file)
    marker, out = tmp_path / "died", tmp_path / "answers.jsonl"
    summary = run_ray_batch(jobs, out, TinyRunners(die_once=marker), SETTINGS, actors=1)
    assert marker.exists()  # an actor did die, at mill.txt
    rows = records(out)
    assert [r["id"] for r in rows] == ["h1", "m1", "gone", "h2", "m2"]  # each job once, in input order
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok", "ok"] and summary["answered"] == 4
    assert not (tmp_path / "answers.jsonl.parts").exists()


@pytest.mark.ray
def test_an_actor_that_always_dies_stops_the_run_in_one_line_keeping_what_was_written(local_ray, jobs_file, tmp_path):
    from chunkkv_cli.errors import ChunkKVError
    from chunkkv_cli.ray_batch import run_ray_batch

    jobs, out = read_jobs(jobs_file), tmp_path / "answers.jsonl"
    harbour = [job for job in jobs if job.path.name == "harbour.txt"]
    run_ray_batch(harbour, out, TinyRunners(), SETTINGS)
    out.rename(tmp_path / "harbour.jsonl")  # harbour's records, as a part file an interrupted run left behind
    (tmp_path / "answers.jsonl.parts").mkdir()
    (tmp_path / "harbour.jsonl").rename(tmp_path / "answers.jsonl.parts" / "rank-0-of-1.jsonl")
    with pytest.raises(ChunkKVError, match="the Ray run stopped .* records written are kept"):
        run_ray_batch(jobs, out, TinyRunners(die_always=True), SETTINGS, actors=1)
    part = tmp_path / "answers.jsonl.parts" / "rank-0-of-1.jsonl"
    assert {"h1", "h2"} <= {json.loads(line)["id"] for line in part.read_text().splitlines()}
    summary = run_ray_batch(jobs, out, TinyRunners(), SETTINGS, actors=1)
    assert (summary["skipped"], summary["answered"]) == (2, 2)
    assert [r["id"] for r in records(out)] == ["h1", "m1", "gone", "h2", "m2"]


def cli(*args):
    return CliRunner().invoke(app, list(map(str, args)))


def one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for fragment in fragments:
        assert fragment in result.output


def test_without_the_extra_ray_is_one_line_naming_it(jobs_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as when it is not installed
    one_line_error(cli("batch", jobs_file, "-o", tmp_path / "out.jsonl", "--ray"), "chunkkv[ray]")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.ray
def test_an_unreachable_address_is_one_line(jobs_file, tmp_path):
    pytest.importorskip("ray.data")
    one_line_error(cli("batch", jobs_file, "-o", tmp_path / "out.jsonl", "--ray", "127.0.0.1:9"),
                   "cannot reach the Ray cluster at 127.0.0.1:9")  # fmt: skip
    one_line_error(cli("batch", jobs_file, "-o", tmp_path / "out.jsonl", "--ray", "nonsense"), "give HOST:PORT")


def test_ray_takes_an_optional_address():
    assert fill_optional_values(["jobs.jsonl", "--ray"]) == ["jobs.jsonl", "--ray", "local"]
    assert fill_optional_values(["--ray", "-o", "a"]) == ["--ray", "local", "-o", "a"]
    assert fill_optional_values(["--ray", "h:6379", "-o", "a"]) == ["--ray", "h:6379", "-o", "a"]
    assert fill_optional_values(["x", "--", "--ray"]) == ["x", "--", "--ray"]
