"""Question-agnostic (compress once, ask many) vs question-aware compression on the bundled sample.

Question-aware: the whole prompt (document + question) is prefilled, so the observation window holds the
question (what `chunkkv ask DOC "q"` and `chunkkv eval longqa` do). Question-agnostic: only the prompt up to
the question is prefilled and compressed, once, and every question is appended to its own copy (what
`chunkkv compress` + `chunkkv ask DOC.ckv` and `ask --questions` do). Same settings as `chunkkv eval longqa`
(window 32, chunk 10, 32 new tokens, greedy); answers are scored by substring match and token F1.

    .venv/bin/python benchmarks/question_agnostic.py --out benchmarks/results/question_agnostic.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.documents import prefix_ids, prompt_ids, question_ids
from chunkkv_cli.eval.scoring import substring_match, token_f1
from chunkkv_cli.generate import decode, new_target, prefill
from chunkkv_cli.model import load_model
from chunkkv_cli.pipeline import TextStream, eos_ids
from chunkkv_cli.reuse import answer_question, compress_prefix

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def points(methods: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    return [(m, 1.0) if m == "fullkv" else (m, r) for m in methods for r in ([1.0] if m == "fullkv" else ratios)]


def compressor(method: str, ratio: float, window: int):
    return make_compressor(method, ratio=ratio, window=window)


def aware_answers(model, tok, ids, grid, window, max_new_tokens) -> list[str]:
    """One prefill of the whole prompt feeds every grid point's cache; each is decoded in turn."""
    targets = [new_target(model, compressor(m, r, window)) for m, r in grid]
    pre = prefill(model, torch.tensor([ids]), targets, tokenizer=tok)
    answers = []
    for target in targets:
        stream = TextStream(tok, None, eos_ids(model, tok))
        decode(model, target.cache, pre.logits, len(ids), max_new_tokens, stream.stop_ids, on_token=stream)
        target.cache = None
        answers.append(stream.text.strip())
    return answers


def score(answers: list[str], gold: list[list[str]]) -> dict:
    hits = [substring_match(a, g) for a, g in zip(answers, gold)]
    f1 = [token_f1(a, g) for a, g in zip(answers, gold)]
    return {"correct": int(sum(hits)), "n": len(hits), "f1": round(100 * sum(f1) / len(f1), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="chunkkv,snapkv,fullkv")
    parser.add_argument("--ratios", default="0.1,0.2")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    grid = points(args.methods.split(","), [float(r) for r in args.ratios.split(",")])
    loaded = load_model("smollm2-135m", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    doc = (SAMPLES / "lighthouse.md").read_text()
    qa = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines() if line.strip()]
    start = time.perf_counter()
    prefixes = [compress_prefix(model, prefix_ids(tok, doc), compressor(m, r, args.window), tokenizer=tok) for m, r in grid]
    agnostic = [[] for _ in grid]
    aware = [[] for _ in grid]
    for item in qa:
        suffix = question_ids(tok, item["question"])
        for column, prefix in zip(agnostic, prefixes):
            column.append(answer_question(model, tok, prefix, suffix, args.max_new_tokens).text)
        for column, text in zip(aware, aware_answers(model, tok, prompt_ids(tok, doc, item["question"]), grid,
                                                      args.window, args.max_new_tokens)):  # fmt: skip
            column.append(text)
        print(f"{item['question']}\n  aware:    {aware[0][-1]}\n  agnostic: {agnostic[0][-1]}", flush=True)
    gold = [item["answers"] for item in qa]
    rows = []
    for (method, ratio), aw, ag in zip(grid, aware, agnostic):
        rows.append({"method": method, "ratio": ratio, "aware": score(aw, gold), "agnostic": score(ag, gold),
                     "answers": [{"question": q["question"], "aware": a, "agnostic": b} for q, a, b in zip(qa, aw, ag)]})  # fmt: skip
    print(f"\n{'method':10} {'ratio':>5}  aware correct / F1   agnostic correct / F1   ({time.perf_counter() - start:.0f} s)")
    for row in rows:
        aw, ag = row["aware"], row["agnostic"]
        print(f"{row['method']:10} {row['ratio']:>5}  {aw['correct']:>2}/{aw['n']} / {aw['f1']:>5}      "
              f"{ag['correct']:>2}/{ag['n']} / {ag['f1']:>5}")  # fmt: skip
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        args.out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
