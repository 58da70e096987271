"""The evaluation grid: one prefill per sample feeds every (method, ratio); finished points are kept for resume.

Records, one JSON line per finished (task, sample, method, ratio), are appended to
``OUT/records.jsonl`` as they finish; a rerun with the same ``--out`` skips the keys already there.
``OUT/settings.json`` holds the settings that change results (model, window, data, ...): a rerun
with different ones is refused rather than mixed in.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from chunkkv_cli.compress.h2o import H2O, accumulated_attention
from chunkkv_cli.compress.base import keep_top
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.eval import scoring
from chunkkv_cli.eval.data import Sample
from chunkkv_cli.options import Compression, param_pair
from chunkkv_cli.records import RecordFile, RecordFormat, read_records
from chunkkv_cli.registry import REFERENCE

RECORDS_FILE = "records.jsonl"
SETTINGS_FILE = "settings.json"
RESULTS_FILE = "results.json"
METRIC_NAMES = {
    "needle": "needle found (%)",
    "longqa": "token F1 (%)",
    "manyshot": "final number correct (%)",
    "similarity": "adjacent-layer Jaccard of kept indices (%)",
}

SETTING_FLAGS = {
    "task": "task",
    "model": "--model",
    "window": "--window",
    "chunk_size": "--chunk-size",
    "reuse_layers": "--reuse-layers",
    "max_new_tokens": "--max-new-tokens",
    "params": "--param",
    "source": "data (--data, --haystack, --needle*, --seed)",
}


@dataclass
class Settings:
    """One eval run: the grid axes and everything that changes the results."""

    task: str
    model: str
    methods: list[str]
    ratios: list[float]
    window: int = 32
    chunk_size: int | None = None  # None: each method's own
    reuse_layers: int = 1
    max_new_tokens: int = 24
    question_agnostic: bool = False  # compress each sample's document before its question is appended
    params: list[str] = field(default_factory=list)  # KEY=VALUE, each given to the methods that take KEY
    source: dict = field(default_factory=dict)  # where the samples come from: files, needle, seed

    def compression(self, point: Point) -> Compression:
        """The options of one grid point: its method and ratio (or budget), this run's window, chunks and reuse."""
        from chunkkv_cli.compress import method_class

        taken = method_class(point.method).parameters()
        own = tuple(p for p in self.params if param_pair(p)[0] in taken)
        return Compression(point.method, window=self.window, chunk_size=self.chunk_size,
                           reuse_layers=self.reuse_layers, params=own, **point.compression())  # fmt: skip

    def identity(self) -> dict:
        """What a resumed run must share with the records already in --out (grid axes may change)."""
        keep = ("task", "model", "window", "chunk_size", "reuse_layers", "max_new_tokens", "question_agnostic", "params",
                "source")  # fmt: skip
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass(frozen=True)
class Point:
    """One cell of the grid; fullkv has a single point at ratio 1. A `ratio` above 1 is a token budget."""

    method: str
    ratio: float

    @property
    def label(self) -> str:
        return ratio_label(self.ratio)

    def compression(self) -> dict:
        return {"budget": int(self.ratio)} if self.ratio > 1 else {"ratio": self.ratio}


def ratio_label(ratio: float) -> str:
    return f"{ratio:g}"


def grid_points(methods: Iterable[str], ratios: Iterable[float]) -> list[Point]:
    ratios = list(ratios)
    points = []
    for method in methods:
        points.extend([Point(method, 1.0)] if method == REFERENCE else [Point(method, r) for r in ratios])
    return points


def record_key(task: str, sample_id: str, method: str, ratio: float | str) -> tuple[str, str, str, str]:
    label = ratio if isinstance(ratio, str) else ratio_label(ratio)
    return (task, str(sample_id), method, label)


class RecordStore:
    """`records.jsonl`: finished grid points by key, appended one fsynced line at a time (`records.RecordFile`)."""

    def __init__(self, out: Path):
        self.path = Path(out) / RECORDS_FILE
        self.records: dict[tuple, dict] = {}
        if self.path.exists():
            for record in read_records(self.path, POINTS):
                self.records[self.key(record)] = record

    @staticmethod
    def key(record: dict) -> tuple:
        return record_key(record["task"], record["sample"], record["method"], record["ratio"])

    def has(self, key: tuple) -> bool:
        return key in self.records

    def add(self, record: dict) -> None:
        with RecordFile(self.path) as file:
            file.write(record)
        self.records[self.key(record)] = record


POINTS = RecordFormat(
    what="eval records",
    is_record=lambda record: all(k in record for k in ("task", "sample", "method", "ratio")),
    bad_line="not a record; delete the line or use another --out",
    other_file="use another --out",
)


def check_settings(out: Path, settings: Settings) -> None:
    """Refuse to resume into an --out whose records came from different settings; write them when new."""
    path = Path(out) / SETTINGS_FILE
    mine = settings.identity()
    if path.exists():
        theirs = read_settings(path)
        changed = [SETTING_FLAGS[k] for k in mine if theirs.get(k) != mine[k]]
        if changed:
            raise ChunkKVError(
                f"{out} holds a run with a different {', '.join(changed)}; "
                "use another --out, or delete it to start over"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2) + "\n", encoding="utf-8")


def read_settings(path: Path) -> dict:
    """An --out folder's settings.json; anything but a JSON object is refused, never overwritten."""
    try:
        theirs = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = getattr(err, "strerror", None) or "not valid JSON"
        raise ChunkKVError(f"{path}: {reason}; use another --out, or delete it to start over") from None
    if not isinstance(theirs, dict):
        raise ChunkKVError(f"{path} is not a settings object; use another --out, or delete it to start over")
    return theirs


def run_grid(
    model,
    tokenizer,
    samples: list[Sample],
    settings: Settings,
    out: Path,
    on_sample: Callable[[int, Sample, float | None], None] | None = None,
) -> RecordStore:
    """Evaluate every sample at every grid point not already in --out; returns the record store.

    on_sample(index, sample, seconds) runs after each sample; seconds is None when it was skipped.
    """
    check_settings(out, settings)
    store = RecordStore(out)
    points = grid_points(settings.methods, settings.ratios)
    for index, sample in enumerate(samples):
        todo = [p for p in points if not store.has(record_key(settings.task, sample.id, p.method, p.ratio))]
        start = time.perf_counter()
        for record in evaluate_sample(model, tokenizer, sample, todo, settings):
            store.add(record)
        if on_sample is not None:
            on_sample(index, sample, time.perf_counter() - start if todo else None)
    return store


def evaluate_sample(model, tokenizer, sample: Sample, points: list[Point], settings: Settings) -> Iterator[dict]:
    """One prefill for all `points`, then each point's answer (or kept-index similarity) as a record."""
    if not points:
        return
    import torch

    from chunkkv_cli.generate import prefill

    targets = make_targets(model, points, settings)
    device = next(model.parameters()).device
    agnostic = settings.question_agnostic and sample.split is not None
    seen = sample.prompt[: sample.split] if agnostic else sample.prompt
    pre = prefill(model, torch.tensor([seen], device=device), targets, tokenizer=tokenizer)
    base = {"task": settings.task, "sample": sample.id, "meta": sample.meta, "prompt_tokens": len(sample.prompt)}
    for point, target in zip(points, targets):
        kept = _mean_kept(target)
        if settings.task == "similarity":
            result = {"score": None, **similarity_metrics(target.kept)}
        else:
            after = with_the_question(model, target, pre, sample) if agnostic else pre
            result = answer_and_score(model, tokenizer, target, after, sample, settings)
        target.cache = None  # free this method's cache before the next decode
        yield {**base, "method": point.method, "ratio": point.ratio, "kept_tokens": kept,
               "prefill_seconds": round(pre.seconds, 3), **result}  # fmt: skip


def with_the_question(model, target, pre, sample: Sample):
    """Append the question to a cache compressed without it; the prefill record, now ending after the question."""
    from dataclasses import replace

    from chunkkv_cli.reuse import append

    logits = append(model, target.cache, sample.prompt[sample.split :], sample.split)
    return replace(pre, logits=logits, prompt_len=len(sample.prompt))


def make_targets(model, points: list[Point], settings: Settings) -> list:
    """A compressed-cache target per point; H2O's costly scores are computed once per layer for all its ratios."""
    from chunkkv_cli.generate import new_target

    memo = LastLayerScores()
    targets = []
    for point in points:
        options = settings.compression(point)
        compressor = options.compressor()
        if isinstance(compressor, H2O):
            compressor = SharedH2O(**point.compression(), window=settings.window, block=compressor.block, memo=memo)
        targets.append(new_target(model, compressor, options.reuse_layers, record=settings.task == "similarity"))
    return targets


class LastLayerScores:
    """Accumulated attention of the last layer seen, reused while the same key tensor comes back."""

    def __init__(self):
        self.key = None
        self.scores = None

    def __call__(self, query, key, scaling, block):
        if key is not self.key:
            self.key, self.scores = key, accumulated_attention(query, key, scaling, block)
        return self.scores


@dataclass
class SharedH2O(H2O):
    """H2O whose per-layer scores come from a memo shared by the grid's H2O targets (same selection)."""

    memo: LastLayerScores | None = field(default=None, repr=False)

    def select_tokens(self, query, key, n_kept, window, scaling):
        scores = self.memo(query, key, scaling, self.block)[..., : key.shape[2] - window]
        return keep_top(scores, n_kept, window)


def _mean_kept(target) -> float:
    from chunkkv_cli.generate import kept_lengths

    kept = kept_lengths(target.cache)
    return round(sum(kept) / len(kept), 1)


class _Decided(Exception):
    """Raised from the token callback once the answer's score can no longer change."""


def answer_and_score(model, tokenizer, target, pre, sample: Sample, settings: Settings) -> dict:
    """The grid point's record fields: its greedy answer and the task's scores."""
    decided = _decided_check(settings.task, sample.reference)
    answer = greedy_answer(model, tokenizer, target, pre, settings.max_new_tokens, decided)
    return {"answer": answer.text, "new_tokens": answer.new_tokens, "decode_seconds": round(answer.decode_seconds, 3),
            **score_answer(settings.task, answer.text, sample.reference)}  # fmt: skip


def greedy_answer(model, tokenizer, target, pre, max_new_tokens: int, decided=None):
    """A `result.Answer` from the target's cache; stops early once `decided(text)` says the score cannot change."""
    from chunkkv_cli.generate import cache_bytes, decode, kept_lengths
    from chunkkv_cli.pipeline import eos_ids, recall_state
    from chunkkv_cli.result import Answer

    stops = eos_ids(model, tokenizer)
    ids: list[int] = []

    def collect(token) -> None:
        token_id = int(token[0])
        if token_id in stops:
            return
        ids.append(token_id)
        if decided is not None and decided(tokenizer.decode(ids, skip_special_tokens=True)):
            raise _Decided

    start = time.perf_counter()
    recall = recall_state(target.compressor, target.cache)  # clusterkv: clusters to attend through
    try:
        decode(model, target.cache, pre.logits, pre.prompt_len, max_new_tokens, stops, on_token=collect, recall=recall)
    except _Decided:
        pass
    kept = kept_lengths(target.cache)
    return Answer(
        text=tokenizer.decode(ids, skip_special_tokens=True).strip(), prompt_tokens=pre.prompt_len,
        kept_tokens=sum(kept) / len(kept), full_kv_bytes=pre.full_bytes, kept_kv_bytes=cache_bytes(target.cache),
        prefill_seconds=pre.seconds, compress_seconds=pre.compress_seconds, decode_seconds=time.perf_counter() - start,
        new_tokens=len(ids), token_ids=ids, kept_per_layer=kept,
    )  # fmt: skip


def _decided_check(task: str, reference: dict):
    if task == "needle":
        return lambda text: scoring.contains_value(text, reference["value"]) == 1.0
    return None


def score_answer(task: str, text: str, reference: dict) -> dict:
    """The task's metrics for one answer; `score` is the headline one, in [0, 1]."""
    if task == "needle":
        return {"score": scoring.contains_value(text, reference["value"])}
    if task == "longqa":
        answers = reference["answers"]
        f1 = scoring.token_f1(text, answers)
        return {"score": f1, "f1": f1, "exact": scoring.exact_match(text, answers),
                "substring": scoring.substring_match(text, answers)}  # fmt: skip
    if task == "manyshot":
        return {"score": scoring.number_match(text, reference["number"]), "predicted": scoring.final_number(text)}
    raise ChunkKVError(f"unknown task {task!r}")


def similarity_metrics(kept: dict) -> dict:
    matrix = jaccard_matrix(kept)
    return {"adjacent": adjacent_mean(matrix), "matrix": [[round(v, 4) for v in row] for row in matrix]}


def kept_masks(kept: dict) -> "torch.Tensor":
    """Kept-index sets as masks (layers, sets, kv_len): one set per (batch, head), or per batch for shared indices."""
    import torch

    layers = [kept[i] for i in sorted(kept)]
    kv_len = max(int(idx.max()) for idx in layers) + 1
    heads = max(idx.shape[1] if idx.dim() == 3 else 1 for idx in layers)
    masks = []
    for idx in layers:
        per_head = idx if idx.dim() == 3 else idx[:, None, :]
        per_head = per_head.expand(-1, heads, -1).reshape(-1, per_head.shape[-1])
        masks.append(torch.zeros(per_head.shape[0], kv_len).scatter_(1, per_head.long(), 1.0))
    return torch.stack(masks)


def jaccard_matrix(kept: dict) -> list[list[float]]:
    """|I_a ∩ I_b| / |I_a ∪ I_b| for every pair of layers, per head (or per shared set), averaged over sets."""
    import torch

    masks = kept_masks(kept)
    inter = torch.einsum("asn,bsn->abs", masks, masks)
    sizes = masks.sum(-1)
    union = sizes[:, None, :] + sizes[None, :, :] - inter
    return (inter / union.clamp(min=1)).mean(-1).tolist()


def adjacent_mean(matrix: list[list[float]]) -> float:
    pairs = [matrix[i][i + 1] for i in range(len(matrix) - 1)]
    return sum(pairs) / len(pairs) if pairs else 1.0


def summarize(store: RecordStore, samples: list[Sample], settings: Settings) -> dict:
    """results.json: the methods x ratios table of mean scores (%), per-cell metrics, and task extras."""
    points = grid_points(settings.methods, settings.ratios)
    cells = [summarize_cell(store, samples, settings.task, p) for p in points]
    table: dict[str, dict[str, float | None]] = {}
    for cell in cells:
        table.setdefault(cell["method"], {})[cell["ratio"]] = cell["score"]
    results = {
        "task": settings.task,
        "metric": METRIC_NAMES[settings.task],
        "model": settings.model,
        "settings": asdict(settings),
        "samples": len(samples),
        "table": table,
        "ranking": rankings(table, settings.ratios),
        "ordering": orderings(table, settings.ratios),
        "cells": cells,
    }
    if settings.task == "needle":
        results["needle"] = needle_grid(store, samples, points)
    if settings.task == "similarity":
        results["similarity"] = mean_matrices(store, samples, points)
    return results


def _cell_records(store: RecordStore, samples: list[Sample], task: str, point: Point) -> list[dict]:
    keys = (record_key(task, s.id, point.method, point.ratio) for s in samples)
    return [store.records[k] for k in keys if k in store.records]


def summarize_cell(store: RecordStore, samples: list[Sample], task: str, point: Point) -> dict:
    records = _cell_records(store, samples, task, point)
    headline = "adjacent" if task == "similarity" else "score"
    numeric = ("score", "f1", "exact", "substring", "adjacent", "kept_tokens", "decode_seconds", "new_tokens")
    means = {name: _mean([r[name] for r in records if r.get(name) is not None]) for name in numeric}
    score = means.pop(headline)
    return {
        "method": point.method,
        "ratio": point.label,
        "n": len(records),
        "score": None if score is None else round(100 * score, 2),
        "metrics": {k: round(v, 4) for k, v in means.items() if v is not None and k != "score"},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def rankings(table: dict, ratios: list[float]) -> dict[str, list[str]]:
    """Per ratio, methods best first (fullkv joins every ratio with its single score)."""
    return {ratio_label(r): [m for m, _ in _ranked(table, ratio_label(r))] for r in ratios}


def orderings(table: dict, ratios: list[float]) -> dict[str, str]:
    """Per ratio, the measured order as text with scores and ties: 'chunkkv 80.0 > snapkv 60.0 = h2o 60.0'."""
    texts = {}
    for ratio in ratios:
        ranked = _ranked(table, ratio_label(ratio))
        parts = [f"{m} {v:.1f}" for m, v in ranked]
        signs = [" = " if ranked[i][1] == ranked[i + 1][1] else " > " for i in range(len(ranked) - 1)]
        texts[ratio_label(ratio)] = "".join(p + s for p, s in zip(parts, signs + [""]))
    return texts


def _ranked(table: dict, label: str) -> list[tuple[str, float]]:
    scores = {m: row.get("1") if m == REFERENCE else row.get(label) for m, row in table.items()}
    return sorted(((m, v) for m, v in scores.items() if v is not None), key=lambda item: -item[1])


def needle_grid(store: RecordStore, samples: list[Sample], points: list[Point]) -> dict:
    """Scores per point as a depth x length grid (rows: depths, columns: lengths), None where not run."""
    lengths = sorted({s.meta["length"] for s in samples})
    depths = sorted({s.meta["depth"] for s in samples})
    by_cell = {(s.meta["length"], s.meta["depth"]): s.id for s in samples}
    grids: dict = {}
    for point in points:
        rows = []
        for depth in depths:
            row = []
            for length in lengths:
                record = store.records.get(record_key("needle", by_cell.get((length, depth), ""), point.method, point.ratio))
                row.append(None if record is None else record["score"])
            rows.append(row)
        grids.setdefault(point.method, {})[point.label] = rows
    return {"lengths": lengths, "depths": depths, "grid": grids}


def mean_matrices(store: RecordStore, samples: list[Sample], points: list[Point]) -> dict:
    """Layer x layer Jaccard averaged over samples, and its adjacent-layer mean, per method and ratio."""
    import torch

    matrices: dict = {}
    adjacent: dict = {}
    for point in points:
        records = _cell_records(store, samples, "similarity", point)
        if not records or point.method == REFERENCE:
            continue
        mean = torch.tensor([r["matrix"] for r in records]).mean(0).tolist()
        matrices.setdefault(point.method, {})[point.label] = [[round(v, 4) for v in row] for row in mean]
        adjacent.setdefault(point.method, {})[point.label] = round(adjacent_mean(mean), 4)
    return {"adjacent": adjacent, "matrix": matrices}


def write_results(out: Path, results: dict) -> Path:
    path = Path(out) / RESULTS_FILE
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path
