"""`chunkkv batch` on the local path vs on Ray Data (`--ray`), one process, one GPU, the same jobs and weights.

Random weights of a profile's shape (llama3-8b by default) with the SmolLM2 tokenizer (its ids fit any larger
vocabulary), documents of synthetic text cut to the context (`truncate`), jobs grouped 8 per document. Both paths
load their own model (the local one in this process, Ray's in its one GPU actor) and run the same `ModelRunner`;
a short warm-up first compiles the Triton kernels, so neither path pays for it. Reported: end-to-end seconds
(model load included, Ray's start included for Ray), new tokens per second, and whether the answers agree.

    python benchmarks/ray_batch.py --tokenizer .devcarry/tokenizer --out benchmarks/results/ray_batch_h200.json
    (on the GPU machine, which has no ray: benchmarks/ray_bundle.sh packs one small enough to carry)
    python benchmarks/ray_batch.py --tokenizer DIR --model smollm2-135m --docs 2 --jobs-per-doc 2 \\
        --doc-words 300 --max-new-tokens 4 --out /tmp/ray_batch_cpu.json        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

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


class Runners:
    """The Ray path's runner factory: one model per actor, a ModelRunner per document."""

    def __init__(self, load: RandomModel, settings: Settings):
        self.load, self.settings, self.loaded = load, settings, None

    def __call__(self, jobs):
        return ModelRunner(self._load, jobs, self.settings)

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


def measure(name: str, run) -> dict:
    start = time.perf_counter()
    summary = run()
    seconds = time.perf_counter() - start
    print(f"{name}: {summary['answered']} answered, {summary['new_tokens']} new tokens in {seconds:.1f} s", flush=True)
    return {"seconds": round(seconds, 2), "tokens_per_second": round(summary["new_tokens"] / seconds, 2),
            "jobs_per_second": round(summary["answered"] / seconds, 3),
            "answered": summary["answered"], "failed": summary["failed"], "new_tokens": summary["new_tokens"]}  # fmt: skip


def warm_up(load: RandomModel, settings: Settings, folder: Path) -> None:
    """One short job in this process: Triton compiles (and caches on disk) before either path is timed."""
    import torch

    jobs = read_jobs(write_jobs(folder, 1, 1, 200))
    run_batch(jobs, folder / "warm.jsonl", ModelRunner(load, jobs, settings), settings)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def both_paths(args, load: RandomModel, settings: Settings, folder: Path) -> dict:
    """The same jobs on the local path, then on Ray (its start timed apart: a cluster is started once, not per batch)."""
    import gc

    import torch

    from chunkkv_cli.ray_batch import connect, run_ray_batch

    jobs = read_jobs(write_jobs(folder, args.docs, args.jobs_per_doc, args.doc_words))
    local_out, ray_out = folder / "local.jsonl", folder / "ray.jsonl"
    local = measure("local", lambda: run_batch(jobs, local_out, ModelRunner(load, jobs, settings), settings))
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    start = time.perf_counter()
    connect("local")
    ray_start = time.perf_counter() - start
    ray_path = measure("ray", lambda: run_ray_batch(jobs, ray_out, Runners(load, settings), settings, actors=args.actors))
    ray_path.update(ray_start_seconds=round(ray_start, 2), seconds_with_start=round(ray_path["seconds"] + ray_start, 2))
    rows = [[json.loads(line) for line in path.read_text().splitlines()] for path in (local_out, ray_out)]
    with_start = ray_path["new_tokens"] / ray_path["seconds_with_start"]
    return {
        "local": local,
        "ray": ray_path,
        "ray_over_local_throughput": round(ray_path["tokens_per_second"] / local["tokens_per_second"], 3),
        "ray_over_local_throughput_with_ray_start": round(with_start / local["tokens_per_second"], 3),
        "same_answers": [r["answer"] for r in rows[0]] == [r["answer"] for r in rows[1]],
        "prompt_tokens_per_job": [min(r["prompt_tokens"] for r in rows[0]), max(r["prompt_tokens"] for r in rows[0])],
    }


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
    args = parser.parse_args()
    settings = Settings(f"{args.model} (random weights)", args.method, args.ratio, max_new_tokens=args.max_new_tokens,
                        truncate=True)  # fmt: skip
    load = RandomModel(args.model, str(Path(args.tokenizer).resolve()))
    result = {"command": "python " + " ".join(sys.argv), "environment": environment(), "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        warm_up(load, settings, Path(tmp))
        result.update(both_paths(args, load, settings, Path(tmp)))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
