"""Inputs for, and scores of, the kvpress KVzipPress baseline (`benchmarks/kvpress_kvzip.py`), in chunkkv's own venv.

The token ids are built with chunkkv's code (`prefix_ids` / `question_ids` for the question-agnostic split,
`needle_samples` for the needle task), so the kvpress run sees exactly the ids `benchmarks/question_agnostic.py`
and `chunkkv eval needle --lengths 1k,2k,4k --depths 5` use; the answers come back as token ids and are decoded
and scored here with chunkkv's tokenizer and `chunkkv_cli/eval/scoring.py`.

Reproduce (from this repository's root; the main venv has chunkkv installed, the kvpress venv is separate):

    # 1. chunkkv converts the embedded SmolLM2-135M-Instruct GGUF to safetensors under ~/.cache/chunkkv
    /work/main/.venv/bin/chunkkv ask samples/lighthouse.md "Who?" --max-new-tokens 4
    # 2. token ids (main venv)
    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/kvpress_inputs.py build --out /tmp/kvpress_inputs.json
    # 3. kvpress venv and run: see the docstring of benchmarks/kvpress_kvzip.py
    # 4. scores (main venv)
    PYTHONPATH=$PWD /work/main/.venv/bin/python benchmarks/kvpress_inputs.py score \
        --inputs /tmp/kvpress_inputs.json --predictions /tmp/kvpress_pred_lighthouse*.json \
        --out benchmarks/results/kvpress_kvzip_lighthouse.json
    (same with the needle predictions -> benchmarks/results/kvpress_kvzip_needle.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def build(out: Path, lengths: str, depths: int) -> None:
    from chunkkv_cli.commands.eval import DEFAULT_MAX_NEW_TOKENS, depth_list, needle_triple, parse_lengths
    from chunkkv_cli.documents import prefix_ids, prompt_ids, question_ids
    from chunkkv_cli.eval import data as ev
    from chunkkv_cli.model import load_model
    from chunkkv_cli.pipeline import eos_ids

    loaded = load_model("smollm2-135m", "cpu")
    model, tok = loaded.model, loaded.tokenizer
    doc = (SAMPLES / "lighthouse.md").read_text()
    qa = [json.loads(line) for line in (SAMPLES / "questions.jsonl").read_text().splitlines() if line.strip()]
    prefix = prefix_ids(tok, doc)
    questions = []
    for item in qa:
        suffix = question_ids(tok, item["question"])
        assert prefix + suffix == prompt_ids(tok, doc, item["question"]), item["question"]
        questions.append({"question": item["question"], "answers": item["answers"], "ids": suffix})
    lighthouse = {"prefix": prefix, "questions": questions, "max_new_tokens": DEFAULT_MAX_NEW_TOKENS["longqa"]}

    text, question, value = needle_triple(None, None, None)
    length_list, depth_values = parse_lengths(lengths), depth_list(depths)
    samples = ev.needle_samples(tok, length_list, depth_values, (text, question, value))
    hay = ev.haystack_ids(tok, max(length_list))
    needle = []
    for sample in samples:
        haystack_doc = ev.insert_needle(tok, hay, sample.meta["length"], sample.meta["depth"], text)
        pre, suf = prefix_ids(tok, haystack_doc), question_ids(tok, question)
        assert pre + suf == sample.prompt, sample.id  # the eval's own prompt, split before the question
        needle.append({"id": sample.id, **sample.meta, "value": value, "prefix": pre, "question_ids": suf})
    payload = {
        "model_folder": str(Path(model.config.name_or_path)),
        "eos_ids": sorted(eos_ids(model, tok)),
        "lighthouse": lighthouse,
        "needle": {"lengths": length_list, "depths": depth_values, "question": question,
                   "max_new_tokens": DEFAULT_MAX_NEW_TOKENS["needle"], "samples": needle},
    }  # fmt: skip
    out.write_text(json.dumps(payload))
    print(f"lighthouse prefix {len(prefix)} tokens, {len(questions)} questions; "
          f"needle {len(needle)} samples, prefixes {[len(s['prefix']) for s in needle]} -> {out}")  # fmt: skip


def _text(tok, ids: list[int], stops: set[int]) -> str:
    kept = []
    for i in ids:
        if i in stops:
            break
        kept.append(i)
    return tok.decode(kept, skip_special_tokens=True).strip()


def score(inputs: Path, predictions: list[Path], out: Path) -> None:
    from transformers import AutoTokenizer

    from chunkkv_cli.eval.scoring import contains_value, substring_match, token_f1

    data = json.loads(inputs.read_text())
    parts = [json.loads(p.read_text()) for p in predictions]  # runs of several kvpress_kvzip.py calls, merged
    pred = {k: v for part in parts for k, v in part.items() if k not in ("runs", "command", "docs_done")}
    pred["commands"] = [part["command"] for part in parts]
    pred["runs"] = [run for part in parts for run in part["runs"]]
    tok = AutoTokenizer.from_pretrained(data["model_folder"], local_files_only=True)
    stops = set(data["eos_ids"])
    rows = []
    for run in pred["runs"]:
        texts = [_text(tok, ids, stops) for ids in run["answer_ids"]]
        row = {k: v for k, v in run.items() if k != "answer_ids"}
        if pred["task"] == "lighthouse":
            gold = [q["answers"] for q in data["lighthouse"]["questions"]]
            hits = [substring_match(t, g) for t, g in zip(texts, gold)]
            f1 = [token_f1(t, g) for t, g in zip(texts, gold)]
            row |= {"correct": int(sum(hits)), "n": len(hits), "f1": round(100 * sum(f1) / len(f1), 1),
                    "answers": [{"question": q["question"], "answer": t, "substring": h}
                                for q, t, h in zip(data["lighthouse"]["questions"], texts, hits)]}  # fmt: skip
        else:
            samples = data["needle"]["samples"]
            found = [contains_value(t, s["value"]) for t, s in zip(texts, samples)]
            by_length = {}
            for sample, f in zip(samples, found):
                by_length.setdefault(str(sample["length"]), []).append(f)
            row |= {"found": int(sum(found)), "n": len(found), "found_pct": round(100 * sum(found) / len(found), 1),
                    "found_by_length": {k: f"{int(sum(v))}/{len(v)}" for k, v in by_length.items()},
                    "answers": [{"id": s["id"], "length": s["length"], "depth": s["depth"], "answer": t, "found": f}
                                for s, t, f in zip(samples, texts, found)]}  # fmt: skip
        rows.append(row)
        metric = (f"{row['correct']}/{row['n']} F1 {row['f1']}" if "f1" in row
                  else f"{row['found']}/{row['n']} {row['found_by_length']}")  # fmt: skip
        print(f"{row['method']:28} kept {row['kept']:<4} {metric}")
    if pred["task"] == "lighthouse":
        plain = [t for r in rows if r["method"] == "fullkv" for t in r["prefill_s"]]
        plain += pred.get("timing", {}).get("plain_prefill_s", [])
        kvzip = sorted({t for r in rows if r["method"].startswith("kvzip") for t in r["prefill_s"]})
        pred["timing_summary"] = {
            "prefix_tokens": len(data["lighthouse"]["prefix"]), "plain_prefill_s": plain,
            "kvzip_prefill_and_score_s": kvzip, "plain_median_s": round(statistics.median(plain), 1),
            "kvzip_median_s": round(statistics.median(kvzip), 1),
            "kvzip_over_plain": round(statistics.median(kvzip) / statistics.median(plain), 2),
            "note": "every KVzipPress prefill + reconstruction pass and every plain prefill of the lighthouse prefix in "
                    "these runs, 1 torch thread on a shared 2-core CPU (load average ~6 from other jobs)",
        }  # fmt: skip
    report = {k: v for k, v in pred.items() if k != "runs"} | {
        "scoring": "chunkkv_cli/eval/scoring.py (" + ("substring_match, token_f1" if pred["task"] == "lighthouse"
                                                      else "contains_value") + ")",
        "score_command": " ".join(sys.argv),
        "rows": rows,
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="dump the lighthouse and needle token ids")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--lengths", default="1k,2k,4k")
    b.add_argument("--depths", type=int, default=5)
    s = sub.add_parser("score", help="decode and score a kvpress_kvzip.py predictions file")
    s.add_argument("--inputs", type=Path, required=True)
    s.add_argument("--predictions", type=Path, nargs="+", required=True)
    s.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cmd == "build":
        build(args.out, args.lengths, args.depths)
    else:
        score(args.inputs, args.predictions, args.out)


if __name__ == "__main__":
    main()
