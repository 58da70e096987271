"""Bench harness logic on CPU with a tiny model; no timing assertions."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chunkkv_cli.bench import Case, add_ratios, plan_cases, run_bench, search_max_batch
from chunkkv_cli.options import Compression
from chunkkv_cli.cli import app


def test_plan_has_fullkv_and_no_reuse_rows_beside_reuse_rows():
    cases = plan_cases("chunkkv", [1024, 2048], [2, 4], [1, "max"], decoders=("hf", "fast"))
    assert [c.label for c in cases[:5]] == [
        "fullkv (hf)", "chunkkv, reuse 1 (hf)", "chunkkv, reuse 2 (hf)", "chunkkv, reuse 4 (hf)", "fullkv (fast)"
    ]
    assert len(cases) == 2 * 2 * 2 * 4
    assert {(c.seq, c.batch) for c in cases} == {(s, b) for s in (1024, 2048) for b in (1, "max")}


@pytest.mark.parametrize("capacity", [0, 1, 2, 7, 64, 100])
def test_max_batch_search_finds_the_exact_capacity(capacity):
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= capacity

    assert search_max_batch(fits, limit=4096) == capacity
    assert len(tried) <= 2 * 13 + 2


def test_max_batch_search_stops_at_the_limit():
    assert search_max_batch(lambda b: True, limit=50) == 50


def row(method, reuse, prefill, decode_ms, tok_s, kv=100, batch=1):
    return {"method": method, "reuse_layers": reuse, "seq": 1024, "batch_kind": "fixed", "batch": batch,
            "prefill_s": prefill, "decode_ms_per_token": decode_ms, "decode_tokens_per_s": tok_s,
            "e2e_s": prefill + decode_ms, "e2e_tokens_per_s": tok_s / 2, "kv_bytes": kv}


def test_ratios_compare_with_fullkv_and_with_no_reuse():
    rows = [row("fullkv", 1, 2.0, 10, 100, kv=1000), row("chunkkv", 1, 2.2, 5, 200), row("chunkkv", 2, 1.1, 5, 250)]
    add_ratios(rows)
    assert rows[1]["vs_fullkv"]["prefill"] == pytest.approx(1.1)
    assert rows[1]["vs_fullkv"]["kv_bytes"] == pytest.approx(0.1)
    assert rows[2]["vs_no_reuse"]["prefill"] == pytest.approx(0.5)
    assert rows[2]["vs_no_reuse"]["decode_tokens_per_s"] == pytest.approx(1.25)
    assert rows[0]["vs_no_reuse"] is None


def test_run_bench_on_tiny_model_fills_every_row(model):
    cases = plan_cases("chunkkv", [96], [2], [1])
    rows = run_bench(model, cases, Compression(ratio=0.25, window=8, chunk_size=4), 3, 1)
    assert [(r["method"], r["reuse_layers"]) for r in rows] == [("fullkv", 1), ("chunkkv", 1), ("chunkkv", 2)]
    full, no_reuse, reuse = rows
    assert no_reuse["kv_bytes"] < full["kv_bytes"]
    assert no_reuse["kept_tokens"] == 24
    assert reuse["vs_no_reuse"] is not None and full["vs_fullkv"]["prefill"] == 1.0
    assert all(r["peak_prefill_bytes"] is None for r in rows)  # CPU: no allocator peak


def test_bench_cli_json_has_reuse_and_no_reuse_rows(model, monkeypatch):
    from chunkkv_cli import model as model_module
    from chunkkv_cli.profiles import load_profile

    def fake_load(spec, device, dtype=None, random_weights=False, trust_remote_code=False, allow_random=False):
        return model_module.Loaded(model, None, load_profile("smollm2-135m"), "cpu")

    monkeypatch.setattr(model_module, "load_model", fake_load)
    result = CliRunner().invoke(
        app, ["bench", "--device", "cpu", "--seq", "80", "--reuse-layers", "2", "--decode-tokens", "2",
              "--repeats", "1", "--window", "8", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert {(r["method"], r["reuse_layers"]) for r in report["rows"]} == {("fullkv", 1), ("chunkkv", 1), ("chunkkv", 2)}
    assert report["environment"]["torch"]


@pytest.mark.parametrize("args, message", [
    (["--seq", "3x"], "3x"),
    (["--reuse-layers", "0"], "--reuse-layers"),
    (["--batch", "two"], "--batch"),
    (["--ratio", "2"], "ratio"),
    (["--method", "magic"], "unknown method"),
])
def test_bench_bad_input_is_one_line(args, message):
    result = CliRunner().invoke(app, ["bench", "--device", "cpu", *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_a_method_with_its_own_pass_reports_the_pass_apart(model):
    rows = run_bench(model, plan_cases("kvzip", [96], [1], [1]), Compression(method="kvzip", ratio=0.25, window=8), 2, 1)
    full, kvzip = rows
    assert full["pass_s"] == 0.0 and 0 < kvzip["pass_s"] <= kvzip["compress_s"] <= kvzip["prefill_s"]
