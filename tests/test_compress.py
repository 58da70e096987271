"""Selection rules of every method, on random tensors and on a tiny model."""

from __future__ import annotations

import pytest
import torch

from chunkkv_cli.compress import METHODS, compressor_for, make_compressor
from chunkkv_cli.compress.base import window_scores
from chunkkv_cli.compress.chunkkv import chunk_scores, keep_top_chunks
from chunkkv_cli.compress.h2o import accumulated_attention
from chunkkv_cli.compress.pyramidkv import PyramidKV
from chunkkv_cli.errors import ChunkKVError

SCORED = ["chunkkv", "snapkv", "h2o", "streamingllm", "keydiff"]


def qk(batch=2, q_heads=4, kv_heads=2, length=103, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_heads, length, dim, generator=gen), torch.randn(batch, kv_heads, length, dim, generator=gen)


def per_head(idx, kv_heads):
    return idx if idx.dim() == 3 else idx[:, None].expand(-1, kv_heads, -1)


@pytest.mark.parametrize("method", SCORED)
@pytest.mark.parametrize("length", [103, 100, 57])
def test_exact_budget_window_kept_no_duplicates(method, length):
    query, key = qk(length=length)
    comp = compressor_for(method, budget=30, window=8, chunk_size=10)
    idx = per_head(comp.select(query, key, 0, 4, 0.25), 2)
    assert idx.shape == (2, 2, 30)
    for row in idx.reshape(-1, 30):
        assert len(set(row.tolist())) == 30
        assert torch.all(row[1:] > row[:-1]), "indices must be sorted"
        assert set(range(length - 8, length)) <= set(row.tolist())
        assert row.min() >= 0 and row.max() < length


@pytest.mark.parametrize("method", list(METHODS))
def test_budget_at_or_above_prompt_keeps_everything(method):
    query, key = qk(length=40)
    for budget in (40, 41, 1000):
        assert make_compressor(method, budget=budget, window=8).select(query, key, 0, 4, 0.25) is None
    assert make_compressor(method, ratio=1.0, window=8).select(query, key, 0, 4, 0.25) is None


def test_ratio_rounds_to_kept_tokens():
    comp = make_compressor("snapkv", ratio=0.1)
    assert comp.kept_tokens(1000) == 100
    assert comp.kept_tokens(5) == 1


@pytest.mark.parametrize("bad", [0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ChunkKVError, match="ratio"):
        make_compressor("chunkkv", ratio=bad)


def test_unknown_method_is_rejected():
    with pytest.raises(ChunkKVError, match="unknown method"):
        make_compressor("magic")


def test_chunkkv_keeps_whole_chunks_shared_by_heads_and_per_sequence():
    query, key = qk(batch=2, length=203, seed=3)
    query[1] = torch.roll(query[1], 1, dims=0)  # give the second sequence different content
    key[1] = torch.flip(key[1], dims=[1])
    idx = make_compressor("chunkkv", budget=72, window=12, chunk_size=10).select(query, key, 0, 4, 0.25)
    assert idx.shape == (2, 72)
    assert not torch.equal(idx[0], idx[1]), "each sequence must get its own selection"
    for row in idx:
        prefix = row[:-12].tolist()
        chunks = {}
        for pos in prefix:
            chunks.setdefault(pos // 10, []).append(pos)
        partial = [c for c, members in chunks.items() if len(members) != min(10, 191 - c * 10)]
        assert len(partial) <= 1, "at most the lowest-ranked chunk may be cut"
        for c in partial:
            assert chunks[c] == list(range(c * 10, c * 10 + len(chunks[c]))), "a cut chunk keeps its start"


def test_keep_top_chunks_exact_example():
    scores = torch.tensor([[0.0, 0, 0, 5, 5, 5, 1, 1, 1, 9, 9]])  # chunks of 3: [0,5*3,1*3,9*2]
    assert chunk_scores(scores, 3).tolist() == [[0, 15, 3, 18]]
    assert keep_top_chunks(scores, 3, 5).tolist() == [[3, 4, 5, 9, 10]]
    assert keep_top_chunks(scores, 3, 6).tolist() == [[3, 4, 5, 6, 9, 10]]  # third chunk cut to its first token


def test_snapkv_and_h2o_select_per_head():
    query, key = qk(seed=5)
    for method in ("snapkv", "h2o"):
        idx = make_compressor(method, budget=30, window=8).select(query, key, 0, 4, 0.25)
        assert idx.shape == (2, 2, 30)
        assert not torch.equal(idx[:, 0], idx[:, 1])


def test_streamingllm_keeps_sinks_and_recent():
    query, key = qk(length=50)
    idx = make_compressor("streamingllm", budget=12, window=4, sinks=4).select(query, key, 0, 4, 0.25)
    assert idx[0].tolist() == [0, 1, 2, 3] + list(range(42, 50))


def test_pyramid_budgets_fall_with_depth_and_keep_the_total():
    comp = PyramidKV(budget=200, window=20)
    budgets = [comp.layer_budget(4000, layer, 32) for layer in range(32)]
    assert budgets == sorted(budgets, reverse=True) and budgets[0] > 200 > budgets[-1]
    assert abs(sum(budgets) - 200 * 32) <= 32
    assert all(b >= 20 for b in budgets)
    short = [comp.layer_budget(300, layer, 32) for layer in range(32)]
    assert short == [200] * 32, "too short for the pyramid: uniform"


def naive_window_scores(query, key, window, scaling, kernel):
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    length = key.shape[2]
    logits = query[:, :, -window:] @ k.transpose(-1, -2) * scaling
    for i in range(window):
        logits[:, :, i, length - window + i + 1 :] = float("-inf")
    probs = logits.softmax(-1)[..., : length - window].mean(-2)
    pooled = torch.nn.functional.avg_pool1d(probs.flatten(0, 1)[:, None], kernel, 1, kernel // 2).view(probs.shape)
    return pooled.view(query.shape[0], key.shape[1], groups, -1).mean(2)


def test_window_scores_match_naive_gqa_computation():
    query, key = qk()
    got = window_scores(query, key, 8, 0.25, 7)
    torch.testing.assert_close(got, naive_window_scores(query, key, 8, 0.25, 7))


def test_blockwise_h2o_scores_match_full_attention():
    query, key = qk(length=70)
    groups = 2
    full = (query @ key.repeat_interleave(groups, 1).transpose(-1, -2) * 0.25)
    full = full.masked_fill(torch.ones(70, 70, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    expected = full.sum(-2).view(2, 2, groups, 70).sum(2)
    torch.testing.assert_close(accumulated_attention(query, key, 0.25, block=16), expected)


def test_keydiff_keeps_the_keys_least_like_the_mean_key_per_head():
    from chunkkv_cli.compress.keydiff import key_diversity

    length, window = 40, 4
    key = torch.ones(1, 2, length, 8) + 0.01 * torch.randn(1, 2, length, 8, generator=torch.Generator().manual_seed(0))
    odd = {0: [3, 17, 25], 1: [5, 9, 30]}
    for head, positions in odd.items():
        key[0, head, positions] = -key[0, head, positions]  # pointing away from the mean key
    assert key_diversity(key).shape == (1, 2, length)
    query = torch.randn(1, 4, length, 8)  # read by no score: only the keys count
    idx = make_compressor("keydiff", budget=len(odd[0]) + window, window=window).select(query, key, 0, 4, 0.25)
    for head, positions in odd.items():
        assert idx[0, head].tolist() == positions + list(range(length - window, length))
