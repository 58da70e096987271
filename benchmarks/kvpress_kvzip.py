"""NVIDIA kvpress 0.5.5 KVzipPress (plus SnapKV / ChunkKV / full-cache controls), question-agnostic, on chunkkv's inputs.

Runs in its own venv (kvpress pins transformers < 5.3). Each document prefix (chat header, instruction, document,
'Question:') is prefilled alone inside `press(model)`, so no press ever sees a question; KVzipPress then runs its
context-reconstruction scoring when the context manager exits. Every question is appended to the compressed cache
at its original positions (prefix_len, prefix_len + 1, ...) and answered greedily, then cut off the cache again
(compress once, ask many: what `benchmarks/question_agnostic.py` does with chunkkv). Answers go out as token ids;
`benchmarks/kvpress_inputs.py score` decodes and scores them with chunkkv's code.

kvpress's compression_ratio is the fraction REMOVED: kept 0.2 here is KVzipPress(compression_ratio=0.8).

Setup (CPU only; torch first, from the local CPU wheel index, so nothing pulls a CUDA build):

    python3 -m venv /work/kvpress-venv
    /work/kvpress-venv/bin/pip install torch==2.13.0
    /work/kvpress-venv/bin/pip install kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 --no-deps
    /work/kvpress-venv/bin/pip install accelerate safetensors "huggingface_hub>=1.3,<2" numpy pyyaml regex tqdm \
        packaging requests
    # datasets, fire, cachetools (imported by kvpress for presses not used here) come from benchmarks/kvpress_shims

Run (from the repository root, after `benchmarks/kvpress_inputs.py build --out /tmp/kvpress_inputs.json`):

    PYTHONPATH=benchmarks/kvpress_shims /work/kvpress-venv/bin/python benchmarks/kvpress_kvzip.py \
        --inputs /tmp/kvpress_inputs.json --task lighthouse --kept 0.1,0.2,0.3 --control-kept 0.2,0.3 \
        --timing 2 --timing-kvzip 0 --out /tmp/kvpress_pred_lighthouse.json
    PYTHONPATH=benchmarks/kvpress_shims /work/kvpress-venv/bin/python benchmarks/kvpress_kvzip.py \
        --inputs /tmp/kvpress_inputs.json --task needle --kept 0.2,0.1 --control-kept 0.2 \
        --out /tmp/kvpress_pred_needle.json

The loop is document-major (every method on document 1, then document 2, ...) and the predictions file is
rewritten after each document, so a run stopped early still holds complete rows for the documents done.
KVzipPress's reconstruction scoring depends only on the prefix, so it runs once per document and each
(kept, shape) point re-applies `KVzipPress.compress_post` to a copy of the scores (see `kvzip_scores`).
The committed results were produced in parts (the machine was shared; see the `commands` in each results
file); `kvpress_inputs.py score` accepts several predictions files and merges their runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def load(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def presses(kept: list[float], control_kept: list[float], shapes: list[str], window: int, chunk: int, full: bool):
    """(method, kept, press) in run order; KVzip entries carry (compression_ratio, layerwise) instead of a press."""
    from kvpress import ChunkKVPress, SnapKVPress

    runs = [("fullkv", 1.0, None)] if full else []
    for k in kept:
        for shape in shapes:
            runs.append((f"kvzip-{shape}", k, (round(1 - k, 6), shape == "layerwise")))
    for k in control_kept:
        runs.append(("snapkv", k, SnapKVPress(compression_ratio=round(1 - k, 6), window_size=window)))
        runs.append(("chunkkv", k, ChunkKVPress(SnapKVPress(compression_ratio=round(1 - k, 6), window_size=window),
                                                chunk_length=chunk)))  # fmt: skip
    return runs


def kvzip_scores(model, prefix: list[int]):
    """Prefill + KVzipPress's context-reconstruction scoring, once: (cache, the press's scores, seconds).

    The scores depend only on the prefix (not on the ratio or the budget shape), so every (kept, shape) point
    re-applies KVzipPress.compress_post to a copy of them: the same masks a fresh press would build.
    """
    from kvpress import KVzipPress

    press = KVzipPress(compression_ratio=0.5)  # any ratio > 0 runs the scoring
    stash = {}
    budget_step = press.compress_post

    def keep_scores(m):
        stash["scores"] = press.score_val.clone()
        budget_step(m)

    press.compress_post = keep_scores
    cache, seconds = compress(model, press, prefix)
    return cache, stash["scores"], seconds


def kvzip_budget(model, scores, compression_ratio: float, layerwise: bool) -> None:
    from kvpress import KVzipPress

    press = KVzipPress(compression_ratio=compression_ratio, layerwise=layerwise)
    press.score_val = scores.clone()  # compress_post writes the sinks' scores in place
    press.compress_post(model)


@torch.inference_mode()
def compress(model, press, prefix: list[int]):
    """Prefill the prefix alone under the press; returns (cache, seconds)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    ids = torch.tensor([prefix])
    start = time.perf_counter()
    if press is None:
        model.model(input_ids=ids, past_key_values=cache)
    else:
        with press(model):
            model.model(input_ids=ids, past_key_values=cache)
    return cache, time.perf_counter() - start


def kept_fraction(model, cache, prefix_len: int) -> float:
    """Fraction of the prefix's (layer, kv-head, token) entries still attended to (KVzip masks instead of dropping)."""
    total = kept = 0
    for layer_idx, layer in enumerate(cache.layers):
        heads, n = layer.keys.shape[1], layer.keys.shape[2]
        masked = getattr(model.model.layers[layer_idx].self_attn, "masked_key_indices", None)
        total += heads * prefix_len
        kept += heads * n - (0 if masked is None else len(masked[0]))
    return kept / total


@torch.inference_mode()
def answer(model, cache, prefix_len: int, question: list[int], max_new: int, stops: set[int], value=None) -> list[int]:
    """Append the question at its original positions, greedy-decode, then cut the cache back to the prefix."""
    lengths = [layer.keys.shape[-2] for layer in cache.layers]
    positions = torch.arange(prefix_len, prefix_len + len(question))[None]
    out = model(input_ids=torch.tensor([question]), past_key_values=cache, position_ids=positions, logits_to_keep=1)
    ids = [int(out.logits[0, -1].argmax())]
    pos = prefix_len + len(question)
    while len(ids) < max_new and ids[-1] not in stops:
        if value is not None and value in model.tok.decode(ids, skip_special_tokens=True).replace(",", ""):
            break  # `chunkkv eval needle` also stops once the needle's value is in the answer
        out = model(input_ids=torch.tensor([[ids[-1]]]), past_key_values=cache, position_ids=torch.tensor([[pos]]))
        ids.append(int(out.logits[0, -1].argmax()))
        pos += 1
    for layer, n in zip(cache.layers, lengths):
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
    return ids


def timing(model, prefix: list[int], repeats: int, kvzip_repeats: int) -> dict:
    """Plain prefill vs KVzipPress prefill + reconstruction scoring of the same prefix (kvzip_repeats 0: plain only)."""
    plain = [compress(model, None, prefix)[1] for _ in range(repeats)]
    kvzip = [kvzip_scores(model, prefix)[2] for _ in range(kvzip_repeats)]
    out = {"prefix_tokens": len(prefix), "plain_prefill_s": [round(t, 2) for t in plain],
           "plain_median_s": round(statistics.median(plain), 2)}  # fmt: skip
    if kvzip:
        out |= {"kvzip_prefill_and_score_s": [round(t, 2) for t in kvzip],
                "kvzip_median_s": round(statistics.median(kvzip), 2)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", required=True)
    parser.add_argument("--task", choices=["lighthouse", "needle"], required=True)
    parser.add_argument("--kept", default="0.1,0.2,0.3", help="KVzipPress kept fractions")
    parser.add_argument("--shapes", default="global,layerwise", help="KVzipPress budget shapes (layerwise=False/True)")
    parser.add_argument("--control-kept", default="0.2", help="SnapKV / ChunkKV kept fractions")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--timing", type=int, default=0, help="repeats of the prefill vs KVzip timing (lighthouse)")
    parser.add_argument("--timing-kvzip", type=int, default=None, help="KVzip repeats of the timing [--timing]")
    parser.add_argument("--threads", type=int, default=1, help="1 beats 2 on this shared 2-core CPU")
    parser.add_argument("--no-full", action="store_true", help="skip the full-cache run")
    parser.add_argument("--limit", type=int, default=None, help="first N documents only (needle: by length)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.timing_kvzip = args.timing if args.timing_kvzip is None else args.timing_kvzip

    import kvpress
    import transformers
    from importlib.metadata import version
    from transformers import AutoTokenizer

    data = json.loads(open(args.inputs).read())
    model = load(data["model_folder"])
    model.tok = AutoTokenizer.from_pretrained(data["model_folder"])
    stops = set(data["eos_ids"])
    floats = lambda s: [float(x) for x in s.split(",") if x.strip()]  # noqa: E731
    runs = presses(floats(args.kept), floats(args.control_kept), args.shapes.split(","), args.window, args.chunk,
                   not args.no_full)
    if args.task == "lighthouse":
        lh = data["lighthouse"]
        docs = [(lh["prefix"], [q["ids"] for q in lh["questions"]], None)]
        max_new = lh["max_new_tokens"]
    else:
        nd = data["needle"]
        docs = [(s["prefix"], [s["question_ids"]], s["value"]) for s in nd["samples"]]
        max_new = nd["max_new_tokens"]
    report = {
        "task": args.task,
        "kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__,
        "machine": f"CPU only, 2-core shared machine ({platform.machine()}), torch threads {args.threads}",
        "model": data["model_folder"], "dtype": "float32", "attn_implementation": "sdpa",
        "command": " ".join(["python"] + sys.argv),
        "settings": {"max_new_tokens": max_new, "snapkv_window": args.window, "chunkkv_chunk": args.chunk,
                     "kvzip_defaults": "n_sink=4, chunk_size=2048, kvzip_plus_normalization=False",
                     "question_agnostic": True},
        "runs": [],
    }  # fmt: skip
    del kvpress
    rows = {(m, k): {"method": m, "kept": k, "press": repr(p) if not isinstance(p, tuple) else
                     f"KVzipPress(compression_ratio={p[0]}, layerwise={p[1]}, n_sink=4, chunk_size=2048)",
                     "kvpress_compression_ratio": round(1 - k, 6), "measured_kept_fraction": [], "prefill_s": [],
                     "answer_ids": []} for m, k, p in runs}  # fmt: skip
    report["runs"] = list(rows.values())
    report["kvzip_scoring"] = ("one KVzipPress prefill + reconstruction pass per prefix; each (kept, shape) point "
                               "re-applies KVzipPress.compress_post to a copy of its scores (prefill_s of kvzip rows "
                               "is that shared pass)")  # fmt: skip
    for n_doc, (prefix, questions, value) in enumerate(docs[: args.limit]):
        scored = None
        for method, kept, press in runs:
            row = rows[(method, kept)]
            if isinstance(press, tuple):
                if scored is None:
                    scored = kvzip_scores(model, prefix)
                cache, scores, seconds = scored
                kvzip_budget(model, scores, *press)
            else:
                cache, seconds = compress(model, press, prefix)
            row["prefill_s"].append(round(seconds, 2))
            row["measured_kept_fraction"].append(round(kept_fraction(model, cache, len(prefix)), 4))
            for q in questions:
                row["answer_ids"].append(answer(model, cache, len(prefix), q, max_new, stops, value))
            print(f"doc {n_doc} {method:16} kept {kept:<4} measured {row['measured_kept_fraction'][-1]:.3f} "
                  f"prefill {seconds:.1f} s | {model.tok.decode(row['answer_ids'][-1], skip_special_tokens=True)!r}",
                  flush=True)  # fmt: skip
            if scored is not None and not isinstance(press, tuple):
                scored = None  # another press prefilled: KVzip's masks are gone, score again if needed
        report["docs_done"] = n_doc + 1
        with open(args.out, "w") as fh:
            json.dump(report, fh)
    if args.timing:
        report["timing"] = timing(model, docs[0][0], args.timing, args.timing_kvzip)
        print(report["timing"], flush=True)
        with open(args.out, "w") as fh:
            json.dump(report, fh)


if __name__ == "__main__":
    main()
