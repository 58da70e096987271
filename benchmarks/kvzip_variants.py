"""KVzip's selection variants on the bundled sample, question-agnostic: one reconstruction pass, many selections.

The scores of the repeat pass do not depend on the ratio, chunk size or budget shape, so the sample's prefix is
prefilled and scored once per normalisation, and each variant only selects, appends the question and decodes
(the `eval longqa` settings: the 12 sample questions, 32 new tokens, greedy; substring match and token F1).
A variant may narrow the stored cache per question with chunkkv (`ask DOC.ckv --ratio R`).

    .venv/bin/python benchmarks/kvzip_variants.py --out benchmarks/results/kvzip_variants_lighthouse.json \
        '{"ratio": 0.2}' '{"ratio": 0.3}' '{"ratio": 0.2, "chunk_size": 10}' '{"ratio": 0.3, "narrow": 0.1}' ...

`budget_shape: heads` keeps each KV head its own length (a packed prefix, as `compress` stores it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.base import gather_tokens
from chunkkv_cli.compress.kvzip import reconstruction_scores
from chunkkv_cli.documents import pass_request_ids, prefix_ids, question_ids
from chunkkv_cli.eval.scoring import substring_match, token_f1
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import load_model
from chunkkv_cli.packed import is_per_head, pack
from chunkkv_cli.reuse import CompressedPrefix, answer_question

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


PASS_PARAMS = ("normalize", "repeat_chunk", "reach", "sinks")


def scored(model, tok, ids, params: dict, memo: dict):
    """The full prefilled cache and its reconstruction scores (computed once per setting of the pass)."""
    pass_params = {k: params[k] for k in PASS_PARAMS if k in params}
    key = json.dumps(pass_params, sort_keys=True)
    if key not in memo:
        full = new_target(model, make_compressor("fullkv"))
        start = time.perf_counter()
        prefill(model, ids, [full])
        prefilled = time.perf_counter()
        comp = make_compressor("kvzip", **pass_params)
        scores = reconstruction_scores(model, full.cache, ids, pass_request_ids(tok, comp), comp)
        timing = {"prefill_s": round(prefilled - start, 1), "pass_s": round(time.perf_counter() - prefilled, 1)}
        memo[key] = (full.cache, scores, timing)
    return memo[key]


def kept_prefix(layers, keep, prefix_len: int) -> CompressedPrefix:
    """The kept tokens as a prefix, read out of the shared full cache (left whole for the next variant)."""
    if is_per_head(keep):
        return CompressedPrefix([pack(l.keys, k) for l, k in zip(layers, keep)], [pack(l.values, k) for l, k in zip(layers, keep)],
                                [k.positions for k in keep], prefix_len, head_lengths=[k.lengths for k in keep])  # fmt: skip
    return CompressedPrefix([gather_tokens(l.keys, i) for l, i in zip(layers, keep)],
                            [gather_tokens(l.values, i) for l, i in zip(layers, keep)], keep, prefix_len)  # fmt: skip


def run_variant(model, tok, ids, qa, params: dict, memo: dict) -> dict:
    params = dict(params)
    narrow_ratio = params.pop("narrow", None)
    cache, scores, timing = scored(model, tok, ids, params, memo)
    keep = make_compressor("kvzip", **params).keep(scores)
    prefix = kept_prefix(cache.layers, keep, ids.shape[1])
    narrow = None if narrow_ratio is None else make_compressor("chunkkv", ratio=narrow_ratio)
    answers = [answer_question(model, tok, prefix, question_ids(tok, q["question"]), 32, narrow=narrow).text for q in qa]
    hits = [substring_match(a, q["answers"]) for a, q in zip(answers, qa)]
    f1 = [token_f1(a, q["answers"]) for a, q in zip(answers, qa)]
    kept = prefix.kept_lengths()
    return {"params": params, "narrow": narrow_ratio, "correct": int(sum(hits)), "n": len(qa),
            "f1": round(100 * sum(f1) / len(f1), 1), "kept_per_layer": kept, "pass_timing": timing,
            "answers": answers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", help="JSON objects of kvzip parameters; 'narrow': a chunkkv ratio")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([prefix_ids(tok, (SAMPLES / "lighthouse.md").read_text())])
    qa = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines() if line.strip()]
    memo, rows = {}, []
    for spec in args.variants:
        rows.append(run_variant(model, tok, ids, qa, json.loads(spec), memo))
        print(f"{spec}: {rows[-1]['correct']}/12 F1 {rows[-1]['f1']}", flush=True)
        args.out.write_text(json.dumps({"command": "benchmarks/kvzip_variants.py " + " ".join(args.variants),
                                        "machine": "2-core CPU, fp32", "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
