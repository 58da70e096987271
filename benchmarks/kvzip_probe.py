"""Development probe: score the bundled sample's prefix once with the repeat pass, then try selection variants.

    .venv/bin/python benchmarks/kvzip_probe.py '{"ratio": 0.2}' '{"ratio": 0.2, "heads": "each"}'
"""
import json, sys, time
from pathlib import Path

import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.base import gather_tokens
from chunkkv_cli.compress.kvzip import reconstruction_scores
from chunkkv_cli.documents import pass_request_ids, prefix_ids, question_ids
from chunkkv_cli.eval.scoring import substring_match, token_f1
from chunkkv_cli.generate import new_target, prefill
from chunkkv_cli.model import load_model
from chunkkv_cli.reuse import CompressedPrefix, answer_question

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
loaded = load_model("smollm2-135m", "cpu")
model, tok = loaded.model, loaded.tokenizer
doc = (SAMPLES / "lighthouse.md").read_text()
qa = [json.loads(l) for l in (SAMPLES / "questions.jsonl").read_text().splitlines() if l.strip()]
ids = torch.tensor([prefix_ids(tok, doc)])
full = new_target(model, make_compressor("fullkv"))
t = time.perf_counter()
prefill(model, ids, [full])
t1 = time.perf_counter()
normalize = json.loads(sys.argv[1]).get("normalize", "local")
cached = Path(f"/tmp/kvzip_scores_{normalize}.pt")
if cached.exists():
    scores = torch.load(cached)
else:
    comp = make_compressor("kvzip", normalize=normalize)
    scores = reconstruction_scores(model, full.cache, ids, pass_request_ids(tok, comp), comp)
    torch.save(scores, cached)
print(f"prefill {t1 - t:.1f}s, pass {time.perf_counter() - t1:.1f}s", flush=True)
keys = [l.keys for l in full.cache.layers]
values = [l.values for l in full.cache.layers]
for spec in sys.argv[1:]:
    params = json.loads(spec)
    comp = make_compressor("kvzip", **params)
    keep = comp.keep(scores)
    prefix = CompressedPrefix([gather_tokens(k, i) for k, i in zip(keys, keep)], [gather_tokens(v, i) for v, i in zip(values, keep)],
                              [i for i in keep], ids.shape[1])
    answers = [answer_question(model, tok, prefix, question_ids(tok, q["question"]), 32).text for q in qa]
    hits = sum(substring_match(a, q["answers"]) for a, q in zip(answers, qa))
    f1 = 100 * sum(token_f1(a, q["answers"]) for a, q in zip(answers, qa)) / len(qa)
    kept = prefix.kept_lengths()
    print(f"{params}: {hits:.0f}/12 F1 {f1:.1f} · kept min/max {min(kept)}/{max(kept)}", flush=True)
