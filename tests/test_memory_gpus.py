"""`chunkkv memory --gpus N`: weights and KV split by layer over several GPUs, exact numbers (no torch)."""

import json

import pytest
from typer.testing import CliRunner

from chunkkv_cli.cli import app
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.memory import layer_blocks, memory_report, weight_split
from chunkkv_cli.profiles import load_profile

# Llama-3-70B: 80 layers of 855,654,400 parameters (q, o: 8192x8192; k, v: 8192x1024; MLP 3x8192x28672;
# two norms of 8192), embeddings and lm_head of 128,256 x 8192 each, a final norm of 8192.
LAYER = 855_654_400
EMBEDDINGS = 128_256 * 8192
KV_PER_TOKEN_PER_LAYER = 2 * 8 * 128 * 2  # K and V, 8 KV heads, head dim 128, 2 bytes


def test_layer_blocks_are_contiguous_and_equal_the_first_ones_larger():
    assert layer_blocks(80, 2) == [range(0, 40), range(40, 80)]
    assert layer_blocks(80, 3) == [range(0, 27), range(27, 54), range(54, 80)]
    assert layer_blocks(4, 4) == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert layer_blocks(32, 1) == [range(0, 32)]


@pytest.mark.parametrize("gpus, fragment", [(0, "--gpus must be a positive"), (81, "more GPUs than the model's 80 layers")])
def test_layer_blocks_rejects_impossible_counts(gpus, fragment):
    with pytest.raises(ChunkKVError, match=fragment):
        layer_blocks(80, gpus)


def test_weight_split_puts_embeddings_first_and_lm_head_last():
    profile = load_profile("llama3-70b")
    split = weight_split(profile, "bf16", layer_blocks(80, 2))
    assert split == [(40 * LAYER + EMBEDDINGS) * 2, (40 * LAYER + 8192 + EMBEDDINGS) * 2]
    assert sum(split) == profile.weight_bytes("bf16") == 141_107_412_992


def test_weight_split_of_tied_embeddings_counts_them_once():
    profile = load_profile("smollm2-135m")  # tie_word_embeddings: true
    split = weight_split(profile, "fp32", layer_blocks(profile.num_layers, 3))
    assert sum(split) == profile.weight_bytes("fp32")
    assert split[0] > split[1]  # the embeddings sit on the first GPU; the last adds only the final norm


def test_llama3_70b_bf16_32k_on_two_h200():
    report = memory_report(load_profile("llama3-70b"), "32k", dtype="bf16", gpu_mem="141GB", gpus=2)
    first, last = report["per_gpu"]
    assert (first["first_layer"], first["last_layer"], last["first_layer"], last["last_layer"]) == (0, 39, 40, 79)
    assert first["weight_bytes"] == 70_553_698_304 and last["weight_bytes"] == 70_553_714_688
    for share in (first, last):
        assert share["full_kv_bytes"] == 5 * 2**30  # 40 layers x 32,768 tokens x 4 KiB
        assert share["compressed_kv_bytes"] == 40 * 3277 * KV_PER_TOKEN_PER_LAYER == 536_903_680
        assert share["compressed_peak_bytes"] == (39 * 3277 + 32768) * KV_PER_TOKEN_PER_LAYER == 657_698_816
        assert share["fits_full"] and share["fits_compressed"]
    assert last["free_bytes"] == 141 * 10**9 - 70_553_714_688
    assert report["gpus"] == 2 and report["fits_full"] and report["fits_compressed"]
    assert report["gqa_bytes"] == 10 * 2**30  # the totals are the whole model's, as with one GPU
    assert report["max_batch_full"] == (141 * 10**9 - 70_553_714_688) // (5 * 2**30) == 13
    assert report["free_bytes"] == 2 * 141 * 10**9 - 141_107_412_992


def test_seventy_b_fits_two_80gb_gpus_but_not_one():
    profile = load_profile("llama3-70b")
    one = memory_report(profile, "8k", dtype="fp16", gpu_mem="80GB")
    two = memory_report(profile, "8k", dtype="fp16", gpu_mem="80GB", gpus=2)
    assert not one["fits_full"] and not one["fits_compressed"] and one["max_batch_full"] == 0
    assert two["fits_full"] and two["fits_compressed"]
    free = 80 * 10**9 - 70_553_714_688  # the last GPU holds one norm more than the first
    assert two["max_batch_full"] == free // (40 * 8192 * KV_PER_TOKEN_PER_LAYER) == 7
    assert two["max_seq_full"] == free // (40 * KV_PER_TOKEN_PER_LAYER) == 57_655


def test_limits_come_from_the_gpu_that_fills_first():
    report = memory_report(load_profile("llama3-70b"), "8k", dtype="fp16", gpu_mem="80GB", gpus=3)
    weights = [w["weight_bytes"] for w in report["per_gpu"]]
    assert weights == [48_306_683_904, 46_205_337_600, 46_595_391_488]
    # GPU 0 has 27 layers and the embeddings: 31,693,316,096 bytes free, 110,592 bytes per token
    assert report["max_seq_full"] == (80 * 10**9 - 48_306_683_904) // (27 * KV_PER_TOKEN_PER_LAYER) == 286_578


def test_one_gpu_per_gpu_row_is_the_whole_model():
    report = memory_report(load_profile("llama3-8b"), "32k", dtype="fp16")
    (share,) = report["per_gpu"]
    assert (share["first_layer"], share["last_layer"]) == (0, 31)
    assert share["weight_bytes"] == report["weight_bytes"] and share["full_kv_bytes"] == report["gqa_bytes"]
    assert share["compressed_peak_bytes"] == report["compressed_peak_bytes"]
    assert report["max_batch_full"] == 14 and report["gpus"] == 1


def invoke(*args: str):
    return CliRunner().invoke(app, ["memory", *args])


def test_memory_gpus_json_and_table():
    args = ["--model", "llama3-70b", "--seq", "32k", "--dtype", "bf16", "--gpus", "2", "--gpu-mem", "141GB"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [share["weight_bytes"] for share in report["per_gpu"]] == [70_553_698_304, 70_553_714_688]
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    for fragment in ("Split by layer over 2 GPUs of 141GB", "0: 0-39", "1: 40-79", "65.71 GiB", "70.71 GiB",
                     "What fits in 2 x 141GB", "full cache yes, compressed yes"):  # fmt: skip
        assert fragment in table.stdout, fragment


def test_memory_gpus_says_when_only_the_compressed_cache_fits():
    # 71 GB per GPU leaves 0.45 GB beside 70.55 GB of weights: 1.34 GB of full KV does not fit, 0.16 GB peak does
    args = ["--model", "llama3-70b", "--seq", "8k", "--gpus", "2", "--gpu-mem", "71GB"]
    report = json.loads(invoke(*args, "--json").stdout)
    assert [(s["fits_full"], s["fits_compressed"]) for s in report["per_gpu"]] == [(False, True), (False, True)]
    assert report["per_gpu"][1]["compressed_peak_bytes"] == (39 * 819 + 8192) * KV_PER_TOKEN_PER_LAYER
    table = invoke(*args)
    assert table.exit_code == 0, table.output
    assert "full cache no, compressed yes" in " ".join(table.stdout.split())


@pytest.mark.parametrize("gpus, fragment", [("0", "--gpus must be a positive"), ("33", "more GPUs than the model's 32")])
def test_memory_bad_gpus_is_a_one_line_error(gpus, fragment):
    result = invoke("--model", "llama3-8b", "--gpus", gpus)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output
