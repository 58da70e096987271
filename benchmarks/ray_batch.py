"""`chunkkv batch` on the local path vs on Ray Data (`--ray`), one GPU, the same jobs and weights.

Random weights of a profile's shape (llama3-8b by default) with the SmolLM2 tokenizer (its ids fit any larger
vocabulary), documents of synthetic text cut to the context (`truncate`), jobs grouped 8 per document. Each path
runs in fresh processes, as users meet them: the local path is this script again in a child process (timed from
its spawn: imports, CUDA start, model load and the jobs, as `chunkkv batch` pays them), Ray's model lives in its
actor, also a fresh process (the cluster's start, `ray.init`, is timed apart: a cluster is started once, not per
batch). A short warm-up in another child first compiles the Triton kernels into their disk cache, so neither path
pays for that. Both run the same `ModelRunner`. Reported: end-to-end seconds, new tokens per second, whether the
answers agree, and per path a `breakdown` from wall-clock marks the model's process writes (one host, one clock):
when each step first happened after the run's start (`first_at_s`: `process_started`, Ray's `actor_unpickled`,
`load_start`, `imports_done`, `device_ready`, `load_end`, `job_end` = the first answer), the load's parts (`imports_s`,
`device_start_s`, `model_build_s`), the steady state from the first answer to the last (`steady_jobs_per_second`,
`steady_tokens_per_second`), each document's seconds, and the seconds the model's process sat between jobs.

    python benchmarks/ray_batch.py --tokenizer .devcarry/tokenizer --out benchmarks/results/ray_batch_h200.json
    (on the GPU machine, which has no ray: benchmarks/ray_bundle.sh packs one small enough to carry)
    OMP_NUM_THREADS=1 python benchmarks/ray_batch.py --tokenizer DIR --model smollm2-135m --docs 4 \\
        --jobs-per-doc 2 --doc-words 300 --max-new-tokens 4 --actors 1 --out /tmp/ray_batch_cpu.json   # CPU smoke
    (one thread each: Ray gives its CPU actor one, and `breakdown.torch_threads` shows what each path had)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chunkkv_cli.batch import Settings, run_batch  # noqa: E402
from chunkkv_cli.batch_runner import ModelRunner  # noqa: E402
from chunkkv_cli.jobs import read_jobs  # noqa: E402

WORDS = ("harbour ledger tower lamp keeper storm schooner rock lens beacon signal tide channel pilot wreck "
         "cargo mast rope cliff island gull fog bell chart compass anchor deck hull sail winter").split()  # fmt: skip


class RandomModel:
    """Loads the profile's shape with random weights and a saved tokenizer; picklable, so Ray ships it to actors."""

    def __init__(self, profile: str, tokenizer: str, device: str = "auto"):
        self.profile, self.tokenizer, self.device = profile, tokenizer, device

    def __call__(self):
        from transformers import AutoTokenizer

        from chunkkv_cli.model import Loaded, build_random_model, resolve_device, resolve_dtype
        from chunkkv_cli.profiles import load_profile

        profile = load_profile(self.profile)
        device = resolve_device(self.device)
        model = build_random_model(profile, device, resolve_dtype(None, device))
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer, local_files_only=True)
        return Loaded(model, tokenizer, profile, device)


class Timeline:
    """Wall-clock marks appended to a file by this process or by a Ray actor (one host, so one clock)."""

    def __init__(self, file: Path, path: str):
        self.file, self.path = file, path

    def mark(self, what: str, at: float | None = None, **extra) -> None:
        row = {"path": self.path, "what": what, "t": time.time() if at is None else at, "pid": os.getpid(), **extra}
        with open(self.file, "a") as out:
            out.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict]:
        lines = self.file.read_text().splitlines() if self.file.exists() else []
        return [row for row in map(json.loads, lines) if row["path"] == self.path]


class TimedLoad:
    """The model load in steps: a fresh process's imports and CUDA start (`start_steps`), then the build."""

    def __init__(self, load: RandomModel, timeline: Timeline):
        self.load, self.timeline = load, timeline

    def __call__(self):
        self.timeline.mark("load_start", process_started=process_started())
        start_steps(lambda: self.timeline.mark("imports_done"))
        import torch

        self.timeline.mark("device_ready", torch_threads=torch.get_num_threads())  # Ray sets OMP_NUM_THREADS
        loaded = self.load()
        sync()
        self.timeline.mark("load_end")
        return loaded


def start_steps(imported: Callable[[], None]) -> None:
    """What a fresh process pays before its model: torch, transformers and the runner's modules, then CUDA."""
    import torch
    import transformers  # noqa: F401

    from chunkkv_cli import documents, model, reuse  # noqa: F401

    imported()
    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")
    sync()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TimedRunner:
    """A ModelRunner whose jobs mark when they start and end."""

    def __init__(self, runner: ModelRunner, timeline: Timeline):
        self.runner, self.timeline = runner, timeline

    def __call__(self, job, settings):
        self.timeline.mark("job_start", job=job.id, document=job.document)
        result = self.runner(job, settings)
        self.timeline.mark("job_end", job=job.id, document=job.document, new_tokens=result.get("new_tokens") or 0)
        return result


def process_started() -> float | None:
    """When this process started (a Ray actor's may have been started ahead by Ray, before the batch)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except ImportError:
        return None


class Runners:
    """The Ray path's runner factory: one model per actor, a ModelRunner per document."""

    def __init__(self, load: TimedLoad, settings: Settings):
        self.load, self.settings, self.loaded = load, settings, None

    def __call__(self, jobs):
        self.load.timeline.mark("document_start", document=jobs[0].document)
        return TimedRunner(ModelRunner(self._load, jobs, self.settings), self.load.timeline)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.load.timeline.mark("actor_unpickled", process_started=process_started())

    def _load(self):
        if self.loaded is None:
            self.loaded = self.load()
        return self.loaded


def write_jobs(folder: Path, docs: int, per_doc: int, words: int) -> Path:
    rng = random.Random(0)
    rows = []
    for d in range(docs):
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        (folder / f"doc{d}.txt").write_text(f"Report {d}. {text}.")
        rows += [{"id": f"d{d}-q{q}", "document": f"doc{d}.txt", "question": f"What does report {d} say about "
                  f"the {WORDS[q % len(WORDS)]} in part {q}?"} for q in range(per_doc)]  # fmt: skip
    (folder / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "jobs.jsonl"


def measure(name: str, run, timeline: Timeline) -> dict:
    """End to end (the run's wall time, as before), and its breakdown from the timeline's marks."""
    start, wall = time.perf_counter(), time.time()
    summary = run()
    seconds, end = time.perf_counter() - start, time.time()
    print(f"{name}: {summary['answered']} answered, {summary['new_tokens']} new tokens in {seconds:.1f} s", flush=True)
    return {"seconds": round(seconds, 2), "tokens_per_second": round(summary["new_tokens"] / seconds, 2),
            "jobs_per_second": round(summary["answered"] / seconds, 3),
            "answered": summary["answered"], "failed": summary["failed"], "new_tokens": summary["new_tokens"],
            "breakdown": breakdown(timeline.rows(), wall, end)}  # fmt: skip


def breakdown(rows: list[dict], start: float, end: float) -> dict:
    """Seconds from the run's start to each step (the load's parts, the first answer), the load's parts, and the
    steady-state rate: jobs and new tokens per second from the first answer to the last (the fixed start left out)."""
    first = {}
    for row in rows:
        first.setdefault(row["what"], row)
    ends = [row for row in rows if row["what"] == "job_end"]
    since = {what: row["t"] - start for what, row in first.items()}
    started = first.get("load_start", {}).get("process_started")
    if started is not None:  # < 0: the process started before the run (Ray starts workers ahead)
        since["process_started"] = started - start
    out = {"first_at_s": {what: round(value, 3) for what, value in sorted(since.items(), key=lambda item: item[1])}}
    out["torch_threads"] = first.get("device_ready", {}).get("torch_threads")
    steps = ("load_start", "imports_done", "device_ready", "load_end")
    if all(step in since for step in steps):
        out.update(imports_s=since["imports_done"] - since["load_start"],
                   device_start_s=since["device_ready"] - since["imports_done"],
                   model_build_s=since["load_end"] - since["device_ready"],
                   model_load_s=since["load_end"] - since["load_start"])  # fmt: skip
    if len(ends) > 1:
        span = ends[-1]["t"] - ends[0]["t"]
        out.update(steady_seconds=span, steady_jobs_per_second=(len(ends) - 1) / span,
                   steady_tokens_per_second=sum(row["new_tokens"] for row in ends[1:]) / span,
                   last_answer_to_end_s=end - ends[-1]["t"])  # fmt: skip
    out["document_seconds"] = document_seconds(rows)
    out["idle_between_jobs_s"] = idle_between_jobs(rows)
    return {key: round(value, 3) if isinstance(value, float) else value for key, value in out.items()}


def idle_between_jobs(rows: list[dict]) -> float:
    """Seconds each model process spent between one job's end and its next job's start (for Ray: the hand-over
    of documents between the driver, Ray Data and the actor), summed over the processes."""
    idle, last_end = 0.0, {}
    for row in rows:
        if row["what"] == "job_end":
            last_end[row["pid"]] = row["t"]
        elif row["what"] == "job_start" and row["pid"] in last_end:
            idle += row["t"] - last_end.pop(row["pid"])
    return idle


def document_seconds(rows: list[dict]) -> list[float]:
    """Each document's seconds from its first job's start to its last job's end, less a model load inside it."""
    spans: dict[str, list[float]] = {}
    loads: dict[str, float] = {}
    current, load_started = {}, {}
    for row in rows:
        pid, what = row["pid"], row["what"]
        if what in ("job_start", "job_end"):
            spans.setdefault(row["document"], []).append(row["t"])
            current[pid] = row["document"]
        elif what == "load_start":
            load_started[pid] = row["t"]
        elif what == "load_end" and pid in current and pid in load_started:
            loads[current[pid]] = loads.get(current[pid], 0.0) + row["t"] - load_started.pop(pid)
    return [round(max(times) - min(times) - loads.get(doc, 0.0), 2) for doc, times in spans.items()]


def child(args, role: str, folder: Path) -> None:
    """This script again in a fresh process (`--role`): the warm-up, or the local path as a user's `chunkkv batch`."""
    import subprocess

    command = [sys.executable, __file__, "--role", role, "--folder", str(folder)] + sys.argv[1:]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def local_in_child(args, folder: Path) -> dict:
    """The local path in a fresh process; its `run_batch` summary."""
    child(args, "local", folder)
    return json.loads((folder / "local_summary.json").read_text())


def run_role(args, settings: Settings, folder: Path) -> None:
    """In the child: `warm` runs one short job (Triton compiles into its disk cache, so neither timed path pays for
    it); `local` runs the jobs on the local path, its model loaded inside the timing as an actor's is."""
    load = RandomModel(args.model, str(Path(args.tokenizer).resolve()))
    if args.role == "warm":
        (folder / "warm").mkdir()
        jobs = read_jobs(write_jobs(folder / "warm", 1, 1, 200))
        run_batch(jobs, folder / "warm.jsonl", ModelRunner(load, jobs, settings), settings)
        return
    jobs = read_jobs(folder / "jobs.jsonl")
    timeline = Timeline(folder / "timeline.jsonl", "local")
    runner = TimedRunner(ModelRunner(TimedLoad(load, timeline), jobs, settings), timeline)
    summary = run_batch(jobs, folder / "local.jsonl", runner, settings)
    (folder / "local_summary.json").write_text(json.dumps(summary))


def both_paths(args, settings: Settings, folder: Path) -> dict:
    """The same jobs on the local path, in a fresh process timed from its spawn (imports, CUDA start and model load
    inside, as a user's `chunkkv batch` pays them), then on Ray, whose actors are fresh processes too (the cluster's
    start, `ray.init`, timed apart: a cluster is started once, not per batch)."""
    from chunkkv_cli.ray_batch import connect, run_ray_batch

    jobs = read_jobs(write_jobs(folder, args.docs, args.jobs_per_doc, args.doc_words))
    local = measure("local", lambda: local_in_child(args, folder), Timeline(folder / "timeline.jsonl", "local"))
    start = time.perf_counter()
    connect("local")
    ray_start = time.perf_counter() - start
    load = RandomModel(args.model, str(Path(args.tokenizer).resolve()))
    runners = Runners(TimedLoad(load, Timeline(folder / "timeline.jsonl", "ray")), settings)
    ray_path = measure("ray", lambda: run_ray_batch(jobs, folder / "ray.jsonl", runners, settings, actors=args.actors),
                       runners.load.timeline)  # fmt: skip
    ray_path.update(ray_start_seconds=round(ray_start, 2), seconds_with_start=round(ray_path["seconds"] + ray_start, 2))
    rows = [[json.loads(line) for line in (folder / name).read_text().splitlines()] for name in ("local.jsonl", "ray.jsonl")]
    with_start = ray_path["new_tokens"] / ray_path["seconds_with_start"]
    return {
        "local": local,
        "ray": ray_path,
        "ray_over_local_throughput": round(ray_path["tokens_per_second"] / local["tokens_per_second"], 3),
        "ray_over_local_throughput_with_ray_start": round(with_start / local["tokens_per_second"], 3),
        "ray_over_local_steady_throughput": steady_ratio(local, ray_path),
        "same_answers": [r["answer"] for r in rows[0]] == [r["answer"] for r in rows[1]],
        "prompt_tokens_per_job": [min(r["prompt_tokens"] for r in rows[0]), max(r["prompt_tokens"] for r in rows[0])],
    }


def steady_ratio(local: dict, ray_path: dict) -> float | None:
    """Ray's steady-state new tokens per second over the local path's (the fixed starts left out)."""
    rates = [path["breakdown"].get("steady_tokens_per_second") for path in (local, ray_path)]
    return round(rates[1] / rates[0], 3) if all(rates) else None


def environment() -> dict:
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--tokenizer", required=True, help="a folder holding tokenizer.json (SmolLM2's)")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--jobs-per-doc", type=int, default=8)
    parser.add_argument("--doc-words", type=int, default=7000, help="words per document, cut to the context")
    parser.add_argument("--method", default="kvzip")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--role", choices=("warm", "local"), help=argparse.SUPPRESS)  # set for this script's children
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(f"{args.model} (random weights)", args.method, args.ratio, max_new_tokens=args.max_new_tokens,
                        truncate=True)  # fmt: skip
    if args.role:
        return run_role(args, settings, Path(args.folder))
    result = {"command": "python " + " ".join(sys.argv), "environment": environment(), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        child(args, "warm", Path(tmp))
        result.update(both_paths(args, settings, Path(tmp)))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
