"""KVzip: reconstruction scores, chunked selection, budget shapes, and the pass inside prefill."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.kvzip import attend_cpu, full_scores, local_scores, repeat_pieces
from chunkkv_cli.engine import bottom_right_causal_mask
from chunkkv_cli.generate import decode, kept_lengths, new_target, prefill

PROMPT_LEN = 157


def _reference(query, key, doc_len, scaling):
    """Softmax probabilities of every piece query over everything, (b, kv_heads, group, n, kv_len), causal."""
    n = query.shape[2]
    mask = bottom_right_causal_mask(n, key.shape[2], "cpu")
    wide_k = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    probs = ((query @ wide_k.transpose(-1, -2)) * scaling).masked_fill(~mask, float("-inf")).softmax(-1)
    return probs.view(query.shape[0], key.shape[1], -1, n, key.shape[2])


def test_the_pass_attention_is_exact_and_full_scores_are_the_best_weight_per_document_token():
    gen = torch.Generator().manual_seed(0)
    doc_len, n, scaling = 50, 13, 0.25
    query = torch.randn(2, 4, n, 16, generator=gen)
    key, value = (torch.randn(2, 2, doc_len + n, 16, generator=gen) for _ in range(2))
    out = attend_cpu(query, key, value, scaling)
    wide_k, wide_v = (t.repeat_interleave(2, dim=1) for t in (key, value))
    mask = bottom_right_causal_mask(n, doc_len + n, "cpu")
    expected = F.scaled_dot_product_attention(query, wide_k, wide_v, attn_mask=mask, scale=scaling)
    assert torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
    manual = _reference(query, key, doc_len, scaling)[..., :doc_len].amax(dim=(2, 3))
    assert torch.allclose(full_scores(query, key, doc_len, scaling, block=4), manual, atol=1e-6)


def test_local_scores_normalise_over_the_sinks_the_stretch_and_the_piece():
    gen = torch.Generator().manual_seed(2)
    doc_len, n, scaling, sinks, span = 60, 9, 0.3, 3, (20, 35)
    query = torch.randn(1, 6, n, 16, generator=gen)
    key = torch.randn(1, 2, doc_len + n, 16, generator=gen)
    keep = torch.cat([torch.arange(sinks), torch.arange(*span), torch.arange(doc_len, doc_len + n)])
    local = key[:, :, keep]
    manual = _reference(query, local, local.shape[2] - n, scaling)[..., sinks : sinks + 15].amax(dim=(2, 3))
    got = local_scores(query, key, doc_len, span, sinks, scaling, block=4)
    assert got.shape == (1, 2, 15) and torch.allclose(got, manual, atol=1e-6)


def test_repeat_pieces_cover_the_prompt_with_the_request_and_an_overlap():
    ids = torch.arange(100)[None]
    pieces = list(repeat_pieces(ids, [900, 901], 40))
    assert [(start, end) for _, start, end in pieces] == [(0, 40), (40, 80), (80, 100)]
    pieces = [p for p, _, _ in pieces]
    assert [p.shape[1] for p in pieces] == [42, 50, 30]
    assert pieces[1][0, :2].tolist() == [900, 901] and pieces[1][0, 2].item() == 32
    assert torch.equal(torch.cat([pieces[0][:, 2:], pieces[1][:, 10:], pieces[2][:, 10:]], dim=1), ids)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def _run(model, prompt, **params):
    target = new_target(model, make_compressor("kvzip", **params), record=True)
    pre = prefill(model, prompt, [target], repeat_prompt=[5, 6, 7])
    return target, pre


@pytest.mark.parametrize("heads", ["shared", "each"])
def test_uniform_budget_keeps_exactly_the_budget_with_sinks_and_window(model, prompt, heads):
    target, _ = _run(model, prompt, budget=40, window=8, sinks=4, heads=heads, budget_shape="uniform", repeat_chunk=64)
    assert kept_lengths(target.cache) == [40] * 4
    for idx in target.kept.values():
        rows = idx.reshape(-1, 40)
        for row in rows.tolist():
            assert len(set(row)) == 40 and set(range(4)) <= set(row) and set(range(PROMPT_LEN - 8, PROMPT_LEN)) <= set(row)


def test_adaptive_budget_moves_tokens_between_layers_and_keeps_the_total(model, prompt):
    target, _ = _run(model, prompt, budget=40, window=8, budget_shape="adaptive", repeat_chunk=64, chunk_size=4)
    kept = kept_lengths(target.cache)
    assert len(set(kept)) > 1
    assert abs(sum(kept) - 4 * 40) <= 4 * 4  # the last chunk in a layer may be cut


def test_budget_covering_the_prompt_answers_like_the_full_cache(model, prompt):
    full = new_target(model, make_compressor("fullkv"))
    pre = prefill(model, prompt, [full])
    expected = decode(model, full.cache, pre.logits, PROMPT_LEN, 8)
    target, pre = _run(model, prompt, budget=10_000)
    assert torch.equal(decode(model, target.cache, pre.logits, PROMPT_LEN, 8), expected)


def test_the_pass_leaves_only_document_tokens_in_the_cache(model, prompt):
    target, pre = _run(model, prompt, ratio=0.5, budget_shape="uniform")
    assert kept_lengths(target.cache) == [round(0.5 * PROMPT_LEN)] * 4
    assert all(int(idx.max()) < PROMPT_LEN for idx in target.kept.values())
    assert pre.compress_seconds > 0


@pytest.mark.parametrize("normalize", ["local", "full"])
def test_both_normalisations_score_every_document_token(model, prompt, normalize):
    from chunkkv_cli.compress.kvzip import reconstruction_scores

    comp = make_compressor("kvzip", normalize=normalize, repeat_chunk=50, block=16, reach=0)
    target = new_target(model, make_compressor("fullkv"))
    prefill(model, prompt, [target])
    scores = reconstruction_scores(model, target.cache, prompt, [5, 6], comp)
    assert len(scores) == 4 and scores[0].shape == (1, 2, PROMPT_LEN)
    assert all(bool((s > 0).all()) and bool((s <= 1).all()) for s in scores)
    assert kept_lengths(target.cache) == [PROMPT_LEN] * 4  # the pieces' own K/V is gone again


def test_a_piece_with_reach_attends_to_the_sinks_and_its_neighbourhood_only():
    from chunkkv_cli.compress.kvzip import ReconstructionRoute

    doc = torch.arange(300.0).view(1, 1, 300, 1)
    layer = type("Layer", (), {"keys": doc, "values": doc})()
    route = ReconstructionRoute(type("Cache", (), {"layers": [layer]})(), 300, make_compressor("kvzip", reach=20))
    route.span = (100, 150)
    assert route.visible(doc).flatten().tolist() == [0, 1, 2, 3] + list(range(80, 170))
    route.span = (0, 50)
    assert route.visible(doc).flatten().tolist() == list(range(70))
    route.comp = make_compressor("kvzip", reach=0)
    assert route.visible(doc) is doc


def test_reach_beyond_the_document_scores_as_the_whole_document(model, prompt):
    from chunkkv_cli.compress.kvzip import reconstruction_scores

    target = new_target(model, make_compressor("fullkv"))
    prefill(model, prompt, [target])
    whole, near, wide = (reconstruction_scores(model, target.cache, prompt, [5, 6], make_compressor("kvzip", reach=r, repeat_chunk=50))
                         for r in (0, 10, PROMPT_LEN))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(whole, wide))
    assert not all(torch.allclose(a, b) for a, b in zip(whole, near))  # later layers see less of the document
    assert all(bool((s > 0).all()) for s in near)


@pytest.mark.parametrize("bad", [{"heads": "some"}, {"budget_shape": "pyramid"}, {"repeat_chunk": 0}, {"normalize": "x"},
                                 {"reach": -1}, {"reach": 100, "normalize": "full"}])
def test_bad_parameters_fail_in_one_line(bad):
    from chunkkv_cli.errors import ChunkKVError

    with pytest.raises(ChunkKVError, match="kvzip"):
        make_compressor("kvzip", **bad)


def test_a_stored_cache_narrowed_by_the_question_keeps_its_share_and_the_question(model):
    from chunkkv_cli.reuse import compress_prefix, with_question
    from chunkkv_cli.generate import kept_lengths as lengths

    ids = torch.randint(0, 128, (120,), generator=torch.Generator().manual_seed(4)).tolist()
    prefix = compress_prefix(model, ids, make_compressor("kvzip", ratio=0.5, budget_shape="uniform"))
    narrow = make_compressor("chunkkv", ratio=0.2, window=8)
    cache, logits, start = with_question(model, prefix, [1, 2, 3, 4], narrow)
    assert lengths(cache) == [round(0.2 * 120) + 4] * 4 and start == 124
    same, _, _ = with_question(model, prefix, [1, 2, 3, 4], make_compressor("chunkkv", ratio=0.9))
    assert lengths(same) == [60 + 4] * 4  # asking for more than is stored keeps what is stored


def test_narrowing_refuses_a_method_that_needs_every_query(model):
    from chunkkv_cli.errors import ChunkKVError
    from chunkkv_cli.reuse import Narrowing

    with pytest.raises(ChunkKVError, match="h2o cannot narrow"):
        Narrowing(make_compressor("h2o"), None, 10)


def test_a_document_shorter_than_sinks_window_and_a_chunk_is_kept_whole_with_a_note(model):
    from chunkkv_cli.commands.options import small_budget_warning

    comp = make_compressor("kvzip", ratio=0.1, window=8, sinks=4, chunk_size=5)
    short = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(9))
    target = new_target(model, comp)
    prefill(model, short, [target])
    assert kept_lengths(target.cache) == [16] * 4
    assert "kept whole" in small_budget_warning(comp, 16)
    assert small_budget_warning(comp, 4000) is None
