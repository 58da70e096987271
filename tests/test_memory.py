"""Exact numbers for the KV-cache arithmetic in chunkkv_cli.memory (no torch)."""

import pytest

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.memory import (
    DTYPE_BYTES,
    human_bytes,
    kept_tokens,
    kv_bytes,
    max_batch,
    max_seq,
    memory_report,
    paper_kv_bytes,
    parse_bytes,
    parse_size,
)
from chunkkv_cli.profiles import load_profile

GIB = 2**30
LLAMA3_8B = dict(layers=32, head_dim=128)  # 32 attention heads, 8 KV heads


def test_paper_formula_matches_the_paper_for_llama3_8b():
    # ChunkKV paper, Eq. 1: LLaMA-3-8B, B=1, S=2048 -> 1,073,741,824 bytes
    assert paper_kv_bytes(batch=1, seq=2048, attn_heads=32, **LLAMA3_8B) == 1_073_741_824


def test_gqa_cache_is_four_times_smaller_for_llama3_8b():
    assert kv_bytes(batch=1, seq=2048, kv_heads=8, dtype_bytes=2, **LLAMA3_8B) == 268_435_456


def test_32k_tokens_llama3_8b_is_16_gib_by_the_paper_and_4_gib_stored():
    assert paper_kv_bytes(batch=1, seq=32 * 1024, attn_heads=32, **LLAMA3_8B) == 16 * GIB
    assert kv_bytes(batch=1, seq=32 * 1024, kv_heads=8, dtype_bytes=2, **LLAMA3_8B) == 4 * GIB


def test_kv_bytes_scales_with_batch_and_dtype():
    one = kv_bytes(1, 1000, 32, 8, 128, 2)
    assert kv_bytes(4, 1000, 32, 8, 128, 2) == 4 * one
    assert kv_bytes(1, 1000, 32, 8, 128, DTYPE_BYTES["fp32"]) == 2 * one
    assert kv_bytes(1, 1000, 32, 8, 128, DTYPE_BYTES["fp8"]) == one // 2


@pytest.mark.parametrize(
    "text, tokens",
    [("2048", 2048), ("32k", 32768), ("128K", 131072), ("1M", 1048576), ("1m", 1048576), (" 8k ", 8192), (4096, 4096)],
)
def test_parse_size_accepts_plain_and_binary_suffixes(text, tokens):
    assert parse_size(text) == tokens


@pytest.mark.parametrize("text", ["3x", "", "-1", "0", "0k", "1.5k", "k", "12 tokens"])
def test_parse_size_rejects_bad_values_naming_value_and_form(text):
    with pytest.raises(ChunkKVError) as err:
        parse_size(text)
    message = str(err.value)
    assert f"'{text}'" in message and "--seq" in message and "32k" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, n_bytes",
    [
        ("80GB", 80 * 10**9),
        ("80gb", 80 * 10**9),
        ("141G", 141 * 10**9),
        ("80GiB", 80 * GIB),
        ("80Gi", 80 * GIB),
        ("512MiB", 512 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        ("1000", 1000),
    ],
)
def test_parse_bytes_decimal_gb_binary_gib(text, n_bytes):
    assert parse_bytes(text) == n_bytes


@pytest.mark.parametrize("text", ["", "80XB", "-1GB", "0GB", "GB", "eighty"])
def test_parse_bytes_rejects_bad_values(text):
    with pytest.raises(ChunkKVError, match="--gpu-mem"):
        parse_bytes(text)


def test_kept_tokens_by_ratio_budget_and_default():
    assert kept_tokens(2048, ratio=0.1) == 205  # round(204.8), as Compressor.kept_tokens
    assert kept_tokens(32768, ratio=0.1) == 3277
    assert kept_tokens(2048) == 205  # default ratio 0.1
    assert kept_tokens(2048, ratio=1.0) == 2048
    assert kept_tokens(3, ratio=0.01) == 1  # at least one token
    assert kept_tokens(2048, budget=512) == 512
    assert kept_tokens(300, budget=512) == 300  # capped at seq
    assert kept_tokens(2048, ratio=0.5, budget=100) == 100  # budget overrides ratio


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5])
def test_kept_tokens_rejects_ratio_outside_0_1(ratio):
    with pytest.raises(ChunkKVError, match=r"--ratio must be in \(0, 1\]"):
        kept_tokens(2048, ratio=ratio)


@pytest.mark.parametrize("budget", [0, -5])
def test_kept_tokens_rejects_non_positive_budget(budget):
    with pytest.raises(ChunkKVError, match="--budget"):
        kept_tokens(2048, budget=budget)


def test_max_batch_and_max_seq():
    assert max_batch(100, 30) == 3
    assert max_batch(-5, 30) == 0
    assert max_seq(1000, lambda seq: 10 * seq) == 100
    assert max_seq(999, lambda seq: 10 * seq) == 99
    assert max_seq(5, lambda seq: 10 * seq) == 0


def test_human_bytes():
    assert human_bytes(1_073_741_824) == "1.00 GiB"
    assert human_bytes(268_435_456) == "256.00 MiB"
    assert human_bytes(512) == "512 B"


def test_memory_report_llama3_8b_32k_on_80gb():
    report = memory_report(load_profile("llama3-8b"), "32k", batch=1, ratio=None, budget=None, dtype="fp16")
    assert report["paper_bytes"] == 16 * GIB
    assert report["gqa_bytes"] == 4 * GIB
    assert report["kept_tokens"] == 3277
    assert report["compressed_bytes"] == 3277 * 131072  # 128 KiB per token over all 32 layers at fp16
    assert report["saved_bytes"] == 4 * GIB - 3277 * 131072
    assert report["weight_bytes"] == 8_030_261_248 * 2
    assert report["gpu_mem_bytes"] == 80 * 10**9
    free = 80 * 10**9 - 8_030_261_248 * 2
    assert report["max_batch_full"] == free // (4 * GIB) == 14
    # prefill peak: 31 layers hold 3,277 tokens, the layer being compressed all 32,768
    peak = (31 * 3277 + 32768) * 4096
    assert report["compressed_peak_bytes"] == peak
    assert report["max_batch_compressed"] == free // peak
    assert report["max_seq_full"] == free // 131072
    assert "4x fewer" in report["why_paper_differs"]


def test_memory_report_budget_and_dtype():
    report = memory_report(load_profile("llama3-8b"), 2048, batch=2, ratio=None, budget=256, dtype="fp32")
    assert report["ratio"] is None and report["budget"] == 256
    assert report["kept_tokens"] == 256
    assert report["gqa_bytes"] == 2 * 268_435_456 * 2  # batch 2, 4 bytes per value
    assert report["paper_bytes"] == 2 * 1_073_741_824  # the paper's formula is always fp16
    assert "fp32" in report["why_paper_differs"]


def test_memory_report_weights_larger_than_gpu_fit_nothing():
    report = memory_report(load_profile("llama3-70b"), "8k", dtype="fp16", gpu_mem="80GB")
    assert report["free_bytes"] < 0
    assert report["max_batch_full"] == report["max_batch_compressed"] == 0
    assert report["max_seq_full"] == report["max_seq_compressed"] == 0


@pytest.mark.parametrize("batch", [0, -1])
def test_memory_report_rejects_bad_batch(batch):
    with pytest.raises(ChunkKVError, match="--batch"):
        memory_report(load_profile("llama3-8b"), "2k", batch=batch)


def test_memory_report_rejects_unknown_dtype():
    with pytest.raises(ChunkKVError, match="--dtype"):
        memory_report(load_profile("llama3-8b"), "2k", dtype="fp64")
