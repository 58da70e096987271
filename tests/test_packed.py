"""Per-head lengths (kvzip budget_shape=heads): packed attention, answers, memory, .ckv files."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chunkkv_cli import cache_io
from chunkkv_cli.compress import make_compressor
from chunkkv_cli.engine import bottom_right_causal_mask
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.generate import cache_bytes, decode, kept_lengths, new_target, prefill
from chunkkv_cli.packed import HeadKept, PackedCache, PackedLayer, packed_attention
from chunkkv_cli.reuse import append, compress_prefix, question_tokens, with_question
from chunkkv_cli.route import Route

REQUEST = [5, 6, 7]


def _random_layer(gen, lengths, dim=16, dtype=torch.float32):
    keys, values = (torch.randn(sum(lengths), dim, generator=gen, dtype=dtype) for _ in range(2))
    return PackedLayer(keys, values, lengths)


def _dense_reference(query, layer, tail_k, tail_v, scaling):
    """Per KV head: its packed prefix and the tail concatenated, SDPA with a bottom-right causal mask."""
    q_heads, q_len = query.shape[1], query.shape[2]
    kv_heads = len(layer.lengths)
    group = q_heads // kv_heads
    out = []
    for head in range(kv_heads):
        keys, values = layer.head_prefix(head)
        k = torch.cat([keys, tail_k[0, head]])[None, None]
        v = torch.cat([values, tail_v[0, head]])[None, None]
        mask = bottom_right_causal_mask(q_len, k.shape[2], "cpu")
        q = query[:, head * group : (head + 1) * group]
        out.append(F.scaled_dot_product_attention(q, k.expand(-1, group, -1, -1), v.expand(-1, group, -1, -1),
                                                  attn_mask=mask, scale=scaling))  # fmt: skip
    return torch.cat(out, dim=1).transpose(1, 2)


@pytest.mark.parametrize("q_len, tail_len", [(1, 1), (1, 6), (5, 5), (4, 9)])
def test_packed_attention_equals_dense_attention_over_each_heads_own_tokens(q_len, tail_len):
    gen = torch.Generator().manual_seed(q_len * 10 + tail_len)
    layer = _random_layer(gen, [3, 40, 17])
    tail_k, tail_v = (torch.randn(1, 3, tail_len, 16, generator=gen) for _ in range(2))
    query = torch.randn(1, 6, q_len, 16, generator=gen)
    got = packed_attention(query, layer, tail_k, tail_v, tail_len, 0.3)
    assert got.shape == (1, q_len, 6, 16)
    assert torch.allclose(got, _dense_reference(query, layer, tail_k, tail_v, 0.3), atol=1e-5)


def test_a_wrong_head_length_is_refused():
    with pytest.raises(ChunkKVError, match="per-head lengths"):
        PackedLayer(torch.zeros(10, 16), torch.zeros(10, 16), [4, 5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_triton_kernel_equals_the_torch_path(dtype):
    from chunkkv_cli.packed_kernel import packed_decode_attention

    gen = torch.Generator().manual_seed(3)
    lengths = [1, 300, 2000, 64, 700, 5, 4000, 128]
    layer = _random_layer(gen, lengths, 128, dtype)
    tail_k, tail_v = (torch.randn(1, 8, 40, 128, generator=gen, dtype=dtype) for _ in range(2))
    query = torch.randn(1, 32, 1, 128, generator=gen, dtype=dtype)
    for tail_len in (0, 17):
        expected = packed_attention(query.float(), PackedLayer(layer.prefix_keys.float(), layer.prefix_values.float(), lengths),
                                    tail_k.float(), tail_v.float(), tail_len, 0.1)  # fmt: skip
        cuda = [t.cuda() for t in (query, layer.prefix_keys, layer.prefix_values, layer.offsets, tail_k, tail_v)]
        got = packed_decode_attention(*cuda, torch.tensor([tail_len], dtype=torch.int32, device="cuda"), 0.1, max(lengths))
        assert torch.allclose(got.float().cpu(), expected, atol=2e-2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (240,), generator=torch.Generator().manual_seed(4)).tolist()


def _heads(**params):
    return make_compressor("kvzip", **{"ratio": 0.3, "window": 8, "budget_shape": "heads", **params})


def _full(model, ids):
    full = new_target(model, make_compressor("fullkv"))
    prefill(model, torch.tensor([ids]), [full])
    return full.cache


def _scored(model, ids, comp):
    """A fully prefilled cache of `ids` and the method's per-head selection on it."""
    full = _full(model, ids)
    return full, comp.score_pass(model, full, torch.tensor([ids]), REQUEST)


def test_one_threshold_over_layers_and_heads_keeps_the_budget_sinks_and_window(model, ids):
    comp = _heads(chunk_size=4)
    _, keep = _scored(model, ids, comp)
    lengths = [n for kept in keep for n in kept.lengths]
    assert len(set(lengths)) > 4  # heads of one layer differ, not only layers
    assert abs(sum(lengths) - 2 * 4 * comp.kept_tokens(240)) <= 8 * 4  # a head's last chunk may be cut
    for kept in keep:
        for head in kept.positions.split(kept.lengths):
            assert set(range(4)) | set(range(232, 240)) <= set(head.tolist())
            assert torch.equal(head, head.unique()) and int(head.max()) < 240


class HeadMask(Route):
    """The reference: the full cache, each KV head attending only to its kept prefix tokens (and all later ones)."""

    offloaded = False

    def __init__(self, keep: list[HeadKept], prefix_len: int):
        self.keep, self.prefix_len = keep, prefix_len

    def attend(self, layer_idx, query, key, value, scaling):
        kept = self.keep[layer_idx]
        kv_heads, kv_len, q_len = key.shape[1], key.shape[2], query.shape[2]
        allowed = torch.zeros(kv_heads, kv_len, dtype=torch.bool)
        for head, positions in enumerate(kept.positions.split(kept.lengths)):
            allowed[head, positions] = True
        allowed[:, self.prefix_len :] = True
        mask = allowed[:, None, :] & bottom_right_causal_mask(q_len, kv_len, "cpu")
        mask = mask.repeat_interleave(query.shape[1] // kv_heads, dim=0)[None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous()


@pytest.mark.parametrize("decoder", ["hf", "fast"])
def test_a_greedy_answer_from_the_packed_cache_equals_the_masked_full_cache(model, ids, decoder):
    question = [17, 3, 99, 42, 8]
    full, keep = _scored(model, ids, _heads())
    mask = HeadMask(keep, len(ids))
    expected_logits = append(model, full, question, len(ids), route=mask)
    expected = decode(model, full, expected_logits, len(ids) + len(question), 12, decoder="hf", recall=mask)
    dense, _ = _scored(model, ids, _heads())
    packed = PackedCache.gather(dense, keep)
    logits = append(model, packed, question, len(ids))
    assert torch.allclose(logits, expected_logits, atol=1e-4)
    assert not torch.allclose(logits, append(model, _full(model, ids), question, len(ids)), atol=1e-2)  # it did evict
    got = decode(model, packed, logits, len(ids) + len(question), 12, decoder=decoder)
    assert torch.equal(got, expected)


def test_memory_held_is_what_each_head_keeps(model, ids):
    target = new_target(model, _heads(), record=True)
    prefill(model, torch.tensor([ids]), [target], repeat_prompt=REQUEST)
    assert isinstance(target.cache, PackedCache)
    layers = target.cache.layers
    per_token = 2 * 16 * 4  # keys and values, head_dim 16, fp32
    offsets = sum(layer.offsets.numel() * 4 for layer in layers)
    assert cache_bytes(target.cache) == sum(sum(layer.lengths) for layer in layers) * per_token + offsets
    assert kept_lengths(target.cache) == [sum(layer.lengths) / 2 for layer in layers]
    assert all(target.kept[i].shape == (sum(layers[i].lengths),) for i in range(4))


def test_packed_prefix_round_trips_through_a_ckv_and_answers_the_same(model, ids, tmp_path):
    prefix = compress_prefix(model, ids, _heads())
    assert prefix.head_lengths is not None and prefix.keys[0].dim() == 2
    meta = {"format": cache_io.FORMAT, "format_version": cache_io.FORMAT_VERSION, "layers": 4,
            "prefix_tokens": len(ids), "full_kv_bytes": prefix.full_bytes}  # fmt: skip
    cache_io.save(tmp_path / "h.ckv", prefix, meta)
    read_meta, loaded = cache_io.read(tmp_path / "h.ckv")
    cache_io.check_shapes(loaded, model.config, "h.ckv")
    assert read_meta["format_version"] == 2 and loaded.head_lengths == prefix.head_lengths
    for mine, theirs in zip(prefix.keys + prefix.values + prefix.positions, loaded.keys + loaded.values + loaded.positions):
        assert torch.equal(mine, theirs)
    question = [7, 30, 99, 4]
    assert torch.equal(question_tokens(model, prefix, question, 8), question_tokens(model, loaded, question, 8))


def test_a_version_1_file_still_loads(model, ids, tmp_path):
    prefix = compress_prefix(model, ids, make_compressor("kvzip", ratio=0.3, window=8))
    meta = {"format": cache_io.FORMAT, "format_version": 1, "layers": 4, "prefix_tokens": len(ids)}
    cache_io.save(tmp_path / "old.ckv", prefix, meta)
    read_meta, loaded = cache_io.read(tmp_path / "old.ckv")
    assert read_meta["format_version"] == 1 and loaded.head_lengths is None
    assert torch.equal(question_tokens(model, prefix, [1, 2], 6), question_tokens(model, loaded, [1, 2], 6))


def test_damaged_head_lengths_are_refused_in_one_line(model, ids, tmp_path):
    prefix = compress_prefix(model, ids, _heads())
    prefix.head_lengths[2] = [prefix.head_lengths[2][0] + 1, prefix.head_lengths[2][1]]
    meta = {"format": cache_io.FORMAT, "format_version": 2, "layers": 4, "prefix_tokens": len(ids)}
    cache_io.save(tmp_path / "bad.ckv", prefix, meta)
    with pytest.raises(ChunkKVError, match="layer 2 head lengths .* do not add up"):
        cache_io.read(tmp_path / "bad.ckv")


def test_narrowing_a_packed_prefix_is_refused_in_one_line(model, ids):
    prefix = compress_prefix(model, ids, _heads())
    with pytest.raises(ChunkKVError, match="cannot be narrowed per question"):
        with_question(model, prefix, [1, 2, 3], make_compressor("chunkkv", ratio=0.1))


def test_a_batch_is_refused_in_one_line(model, ids):
    prefix = compress_prefix(model, ids, _heads())
    cache, _, _ = with_question(model, prefix, [1, 2, 3])
    with pytest.raises(ChunkKVError, match="batch 1"):
        cache.layers[0].batch_repeat_interleave(2)


def test_compress_with_per_head_lengths_then_ask_from_the_file(model, tmp_path, monkeypatch):
    from tests.test_cache_io import DOC, cli, json_of, loaded_with, one_line_error, Tokenizer
    from chunkkv_cli.options import ModelSpec

    loaded = loaded_with(model, Tokenizer())
    monkeypatch.setattr(ModelSpec, "load", lambda *args, **kwargs: loaded)
    doc, out = tmp_path / "doc.txt", tmp_path / "doc.ckv"
    doc.write_text(DOC)
    args = ("compress", doc, "-o", out, "--method", "kvzip", "--ratio", "0.3", "--window", "8")
    report = json_of(cli(*args, "--param", "budget_shape=heads", "--json"))
    inspected = json_of(cli("inspect", out, "--json"))
    assert inspected["format_version"] == 2 and inspected["per_head"] is True
    assert inspected["kept_kv_bytes"] == report["kept_kv_bytes"]
    answer = json_of(cli("ask", out, "Who keeps the ledger?", "--max-new-tokens", "4", "--json"))
    assert answer["kept_tokens"] == pytest.approx(report["kept_tokens"]) and answer["kept_kv_bytes"] == report["kept_kv_bytes"]
    one_line_error(cli("ask", out, "Who?", "--ratio", "0.1"), "cannot be narrowed per question")
