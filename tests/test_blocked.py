"""Prefill in sequence blocks: the same tokens and caches as the unblocked pass, and a block that does not fit refused."""

from __future__ import annotations

import json

import pytest
import torch

from chunkkv_cli import blocked, registry
from chunkkv_cli.compress import METHODS, make_compressor
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.generate import decode, new_target, prefill
from chunkkv_cli.memory import Activations
from chunkkv_cli.options import PREFILL_BLOCK_ATTR
from tests.test_bad_inputs import w  # noqa: F401  (the fixture: a scratch folder and the tiny model behind `ask`)

PROMPT = 150
# Every method that compresses during the forward (own-pass methods score afterwards, on the same cache).
FORWARD_METHODS = [name for name in registry.names() if not METHODS[name].caps.own_pass]


def run(model, ids, method: str, block: int | None, reuse_layers: int = 1, **kwargs):
    target = new_target(model, make_compressor(method, ratio=0.3, **kwargs), reuse_layers, record=True)
    pre = prefill(model, ids, [target], block=block)
    tokens = decode(model, target.cache, pre.logits, ids.shape[1], 8, decoder="hf")
    return pre, target, tokens


@pytest.mark.parametrize("method", FORWARD_METHODS)
@pytest.mark.parametrize("block", [64, 37])
def test_blocked_prefill_gives_the_unblocked_tokens_and_cache(model, method, block):
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    whole_pre, whole, whole_tokens = run(model, ids, method, None)
    blocks_pre, blocks, block_tokens = run(model, ids, method, block)
    assert (whole_pre.block, blocks_pre.block) == (PROMPT, block)
    assert torch.equal(whole_tokens, block_tokens)
    torch.testing.assert_close(blocks_pre.logits, whole_pre.logits, atol=1e-4, rtol=1e-4)
    for layer_idx, (a, b) in enumerate(zip(whole.cache.layers, blocks.cache.layers)):
        assert torch.equal(whole.kept[layer_idx], blocks.kept[layer_idx])
        torch.testing.assert_close(b.keys, a.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.values, a.values, atol=1e-4, rtol=1e-4)


def test_a_window_longer_than_the_last_block_gathers_queries_from_earlier_blocks(model):
    ids = torch.randint(0, 128, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    _, whole, whole_tokens = run(model, ids, "snapkv", None, window=48)
    _, blocks, block_tokens = run(model, ids, "snapkv", 20, window=48)
    assert torch.equal(whole_tokens, block_tokens)
    assert all(torch.equal(whole.kept[i], blocks.kept[i]) for i in whole.kept)


def test_layers_run_their_own_forward_again_after_the_prefill(model):
    ids = torch.randint(0, 128, (1, 40))
    run(model, ids, "chunkkv", 16)
    decoder = model.get_decoder()
    assert all("forward" not in module.__dict__ for module in (*decoder.layers, decoder.norm))


def test_block_bounds_start_at_multiples_of_the_block():
    assert blocked.block_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert blocked.block_bounds(8, 4) == [(0, 4), (4, 8)]
    assert blocked.block_bounds(3, 8) == [(0, 3)]


def test_prefix_attention_matches_a_causal_mask_over_the_prefix():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, 5), (2, 12), (2, 12)))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=torch.ones(5, 12, dtype=torch.bool).tril(7)
    )
    torch.testing.assert_close(blocked.prefix_attention(q, k, v, 8**-0.5), expected.transpose(1, 2))


def test_a_block_that_does_not_fit_names_the_largest_that_does(model, monkeypatch):
    seq = 1024
    ids = torch.zeros(1, seq, dtype=torch.long)
    targets = [new_target(model, make_compressor("chunkkv"))]
    needed = blocked.needed_bytes(model.config, 4, 1, seq, targets)
    monkeypatch.setattr(blocked, "available_bytes", lambda device: needed(512))
    assert blocked.choose_block(model, ids, targets, None) == 512
    with pytest.raises(ChunkKVError, match=r"^--prefill-block 1,000 needs .* the largest block that fits is 512$"):
        blocked.choose_block(model, ids, targets, 1000)
    monkeypatch.setattr(blocked, "available_bytes", lambda device: needed(1) // 2)
    with pytest.raises(ChunkKVError, match="no block size fits"):
        blocked.choose_block(model, ids, targets, None)


def test_the_cpu_runs_unblocked_unless_a_block_is_asked_for(model):
    ids = torch.zeros(1, 300, dtype=torch.long)
    targets = [new_target(model, make_compressor("chunkkv"))]
    assert blocked.choose_block(model, ids, targets, None) == 300
    assert blocked.choose_block(model, ids, targets, 64) == 64


def test_activations_count_one_hidden_state_one_block_and_the_window_scores():
    acts = Activations(hidden=4096, intermediate=14336, q_heads=32, head_dim=128, dtype_bytes=2, window=32)
    seq, block = 131_072, 8192
    expected = 2 * (seq * (4096 + 256) + block * (3 * 14336 + 2 * 4096) + 2 * 32 * 32 * seq)
    assert acts.bytes(1, seq, block) == expected
    assert acts.bytes(1, 100, block) == 2 * (100 * (4096 + 256) + 100 * (3 * 14336 + 2 * 4096) + 2 * 32 * 32 * 100)


def test_ask_with_a_prefill_block_gives_the_same_answer(w, model, monkeypatch):
    from tests.test_bad_inputs import ASK, invoke

    monkeypatch.setattr(model, PREFILL_BLOCK_ATTR, None, raising=False)  # the shared model is left as it was
    plain = invoke(w, ASK + " --json")
    monkeypatch.delattr(model, PREFILL_BLOCK_ATTR)
    blocks = invoke(w, ASK + " --prefill-block 16 --json")
    assert plain.exit_code == blocks.exit_code == 0, blocks.output
    assert getattr(model, PREFILL_BLOCK_ATTR) == 16
    assert json.loads(blocks.output)["answer"] == json.loads(plain.output)["answer"]


@pytest.mark.parametrize("command", ["ask {w}/doc.txt Who? --prefill-block 0", "memory --prefill-block 0",
                                     "compress {w}/doc.txt --prefill-block -5"])
def test_a_prefill_block_below_one_is_one_line(w, command):
    from tests.test_bad_inputs import invoke

    result = invoke(w, command)
    assert result.exit_code != 0
    assert result.output.strip().startswith("error: --prefill-block must be a positive number of tokens")
    assert len(result.output.strip().splitlines()) == 1


def test_memory_reports_the_prefill_peak_and_the_longest_prompt_whose_prefill_fits():
    from chunkkv_cli.memory import memory_report, prefill_peak
    from chunkkv_cli.profiles import load_profile

    profile = load_profile("llama3.1-8b")
    report = memory_report(profile, "128k", dtype="bf16", gpu_mem="24GB")
    activations = 2 * (131_072 * (4096 + 256) + 8192 * (3 * 14336 + 2 * 4096) + 2 * 32 * 32 * 131_072)
    assert report["activation_bytes"] == activations
    assert report["prefill_peak_bytes"] == 16_060_522_496 + 2_201_145_344 + activations == prefill_peak(
        profile, "bf16", 131_072, ratio=0.1)
    longest = report["max_seq_prefill"]
    assert prefill_peak(profile, "bf16", longest, ratio=0.1) <= 24 * 10**9 < prefill_peak(profile, "bf16", longest + 1, ratio=0.1)
    assert report["max_seq_compressed"] > longest  # activations count


def math_part(query, key, value, causal: bool, scaling: float):
    """A stand-in for cuDNN's (output, log-sum-exp), with the same GQA and causal (top-left, square) rules."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ value, scores.logsumexp(-1)


def test_merged_attention_equals_one_causal_call_over_the_prefix():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, 5), (2, 12), (2, 12)))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=torch.ones(5, 12, dtype=torch.bool).tril(7)
    )
    torch.testing.assert_close(blocked.merged_attention(q, k, v, 8**-0.5, math_part), expected)
    square = blocked.merged_attention(q, k[:, :, :5], v[:, :, :5], 8**-0.5, math_part)
    torch.testing.assert_close(square, math_part(q, k[:, :, :5], v[:, :, :5], True, 8**-0.5)[0])


def test_blocked_prefill_through_the_merged_attention_gives_the_unblocked_tokens(model, monkeypatch):
    ids = torch.randint(0, 128, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    whole_pre, whole, whole_tokens = run(model, ids, "snapkv", None)
    monkeypatch.setattr(blocked, "cudnn_applies", lambda *tensors: True)
    monkeypatch.setattr(blocked, "cudnn_part", math_part)
    blocks_pre, blocks, block_tokens = run(model, ids, "snapkv", 40)
    assert torch.equal(whole_tokens, block_tokens)
    torch.testing.assert_close(blocks_pre.logits, whole_pre.logits, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(whole.kept[i], blocks.kept[i]) for i in whole.kept)
