"""`chunkkv bench` on every model family's profile up to 30B parameters, at 32k tokens (random weights, bf16).

    PYTHONPATH=$PWD python benchmarks/families_32k.py --out benchmarks/results/families_32k_h200.json

One process, one model at a time (smallest first, each freed before the next), fullkv against chunkkv at
ratio 0.1 with no index reuse, the hf decoder (the fast one on families without sliding-window layers too).
The JSON is rewritten after every model, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import torch

from chunkkv_cli.commands.bench import Plan, measure
from chunkkv_cli.options import Compression, ModelSpec
from chunkkv_cli.profiles import load_profile

# Smallest first; mixtral-8x7b (46.7B) is over the 30B line. gemma-2-9b's context is 8k: 32k times the shape only.
PROFILES = ["llama3.2-3b", "phi-3.5-mini", "gemma-3-4b", "qwen3-8b", "mistral-7b-v0.1", "gemma-2-9b",
            "gemma-3-12b", "gpt-oss-20b", "gemma-3-27b", "qwen3-30b-a3b"]  # fmt: skip


def one(name: str, seq: int, decode_tokens: int, repeats: int = 1) -> dict:
    profile = load_profile(name)
    decoders = "hf" if profile.sliding_window else "hf,fast"
    plan = Plan(seqs=[seq], reuse=[1], batches=[1], decode_tokens=decode_tokens, repeats=repeats)
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = measure(ModelSpec(name, device, "bf16"), Compression("chunkkv", ratio=0.1), plan, decoders, True)
    report["wall_s"] = time.perf_counter() - start
    report["layer_types"] = {"full": profile.layer_types().count("full_attention"),
                             "sliding": profile.layer_types().count("sliding_attention"),
                             "sliding_window": profile.sliding_window}  # fmt: skip
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--models", default=",".join(PROFILES))
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row after the warm-up (the median is kept)")
    args = parser.parse_args()
    results = {"command": " ".join(["python", *sys.argv]), "models": {}}
    for name in args.models.split(","):
        try:
            results["models"][name] = one(name, args.seq, args.decode_tokens, args.repeats)
        except Exception as err:  # one family failing must not lose the others' figures
            results["models"][name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with open(args.out, "w") as file:
            json.dump(results, file, indent=1)
        print(name, json.dumps(results["models"][name].get("error") or results["models"][name]["wall_s"]), flush=True)


if __name__ == "__main__":
    main()
