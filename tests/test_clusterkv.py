"""ClusterKV: k-means, cluster selection, and decode-time attention on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.compress.base import gather_tokens
from chunkkv_cli.compress.clusterkv import (
    ClusterState,
    cluster_scores,
    kmeans_cosine,
    members,
    select_tokens,
)
from chunkkv_cli.generate import cache_bytes, decode, new_target, prefill

PROMPT_LEN = 157


def separated(batch=2, heads=2, n_clusters=6, per=30, dim=16, seed=0, shuffle=True):
    """Keys scattered tightly around n_clusters random directions; returns keys and true labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(batch, heads, n_clusters, dim, generator=gen), dim=-1)
    labels = torch.arange(n_clusters).repeat_interleave(per).expand(batch, heads, -1).clone()
    if shuffle:
        labels = labels.gather(-1, torch.rand(batch, heads, labels.shape[-1], generator=gen).argsort(-1))
    keys = centres.gather(2, labels[..., None].expand(-1, -1, -1, dim))
    scale = torch.rand(batch, heads, labels.shape[-1], 1, generator=gen) * 3 + 0.5  # cosine ignores norms
    return (keys + 0.05 * torch.randn(keys.shape, generator=gen)) * scale, labels


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings of (..., n) group the tokens identically, up to renaming."""
    return bool(torch.equal(a[..., :, None] == a[..., None, :], b[..., :, None] == b[..., None, :]))


@pytest.mark.parametrize("shuffle", [False, True])
def test_kmeans_recovers_well_separated_clusters(shuffle):
    keys, labels = separated(shuffle=shuffle)
    centroids, assign = kmeans_cosine(keys, 6, iterations=20)
    assert centroids.shape == (2, 2, 6, 16) and assign.shape == labels.shape
    assert torch.allclose(centroids.norm(dim=-1), torch.ones(2, 2, 6), atol=1e-5)
    assert same_partition(assign, labels)


def test_kmeans_is_deterministic_and_fills_empty_clusters():
    keys = torch.randn(1, 1, 50, 8)
    keys[..., :10, :] = keys[..., :1, :]  # duplicates: evenly spaced init may start two centroids equal
    a = kmeans_cosine(keys, 7, 10)
    b = kmeans_cosine(keys, 7, 10)
    assert torch.equal(a[1], b[1])
    _, seeded = kmeans_cosine(keys, 7, 10, generator=torch.Generator().manual_seed(0))
    assert seeded.shape == (1, 1, 50)


def test_members_is_a_csr_layout():
    assign = torch.tensor([[[2, 0, 2, 1, 0]]])
    order, offsets = members(assign, 4, first=10)
    assert offsets.tolist() == [[[0, 2, 3, 5, 5]]]
    assert order.tolist() == [[[11, 14, 13, 10, 12]]]


def random_clusters(batch=2, q_heads=8, kv_heads=2, n=300, n_clusters=9, dim=16, seed=0, first=16):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, n, dim, generator=gen)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen)
    centroids, assign = kmeans_cosine(keys, n_clusters, 5)
    order, offsets = members(assign, n_clusters, first)
    return query, centroids, assign, order, offsets


@pytest.mark.parametrize("budget", [0, 1, 57, 120, 299, 300, 1000])
def test_selection_takes_top_clusters_whole_and_cuts_the_last_to_the_budget(budget):
    query, centroids, assign, order, offsets = random_clusters()
    idx = select_tokens(query, centroids, order, offsets, budget)
    assert idx.shape == (2, 2, min(budget, 300))
    scores = cluster_scores(query, centroids)
    sizes = offsets.diff(dim=-1)
    for b in range(2):
        for h in range(2):
            chosen = idx[b, h].tolist()
            assert len(set(chosen)) == len(chosen) and all(16 <= t < 316 for t in chosen)
            taken = assign[b, h, torch.tensor(chosen, dtype=torch.long) - 16].tolist() if chosen else []
            ranked = scores[b, h].argsort(descending=True).tolist()
            # clusters appear in descending score order, each contiguous; all but the last complete
            runs = [c for i, c in enumerate(taken) if i == 0 or taken[i - 1] != c]
            assert runs == [c for c in ranked if sizes[b, h, c] > 0][: len(runs)]
            for c in runs[:-1]:
                assert taken.count(c) == sizes[b, h, c]


def test_grouped_query_scores_sum_over_the_group():
    query, centroids, *_ = random_clusters(q_heads=8, kv_heads=2)
    scores = cluster_scores(query, centroids)
    manual = torch.einsum("bgd,bcd->bc", query[:, :4, 0], centroids[:, 0])
    assert torch.allclose(scores[:, 0], manual, atol=1e-5)


# --- on the tiny model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, PROMPT_LEN), generator=gen)


def generate(model, prompt, compressor, new_tokens=12):
    target = new_target(model, compressor)
    pre = prefill(model, prompt, [target])
    state = ClusterState.build(compressor, target.cache)
    tokens = decode(model, target.cache, pre.logits, prompt.shape[1], new_tokens, recall=state)
    return tokens, state, target


@pytest.fixture(scope="module")
def fullkv_tokens(model, prompt):
    target = new_target(model, make_compressor("fullkv"))
    pre = prefill(model, prompt, [target])
    return decode(model, target.cache, pre.logits, PROMPT_LEN, 12)


def test_budget_covering_the_cache_reproduces_fullkv(model, prompt, fullkv_tokens):
    comp = make_compressor("clusterkv", budget=10_000, sinks=4, tokens_per_cluster=20, full_layers=1)
    tokens, state, target = generate(model, prompt, comp)
    assert torch.equal(tokens, fullkv_tokens)
    assert state.layers[0] is None and all(layer is not None for layer in state.layers[1:])
    assert state.layers[1].centroids.shape == (2, 2, 8, 16)  # ceil(153 / 20) clusters per KV head
    assert target.cache.get_seq_length(0) == PROMPT_LEN + 11  # nothing evicted


def test_small_budget_decodes_and_attends_sinks_recent_and_budget(model, prompt):
    comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, full_layers=2, recluster_every=6, new_clusters=2)
    tokens, state, target = generate(model, prompt, comp)
    assert tokens.shape == (2, 12)
    layer = state.layers[2]
    # 11 decode steps appended tokens 157..167; the first 6 of them were clustered into 2 new clusters.
    assert layer.clustered_end == PROMPT_LEN + 6 and layer.centroids.shape[2] == 8 + 2
    assert layer.offsets[..., -1].eq(PROMPT_LEN + 6 - 4).all()
    key = target.cache.layers[2].keys
    query = torch.randn(2, 4, 1, 16)
    idx = state.indices(2, query, key)
    kv_len = key.shape[2]
    assert idx.shape[-1] == 40
    for row in idx.reshape(-1, 40).tolist():
        assert len(set(row)) == 40
        assert set(range(4)) <= set(row)
        assert set(range(layer.clustered_end, kv_len)) <= set(row)
    assert state.indices(1, query, key) is None  # full layers


def test_fast_decoder_with_a_budget_covering_the_cache_reproduces_fullkv(model, prompt, fullkv_tokens):
    comp = make_compressor("clusterkv", budget=10_000, sinks=4, tokens_per_cluster=20, full_layers=1)
    target = new_target(model, comp)
    pre = prefill(model, prompt, [target])
    state = ClusterState.build(comp, target.cache)
    tokens = decode(model, target.cache, pre.logits, PROMPT_LEN, 12, decoder="fast", recall=state)
    assert torch.equal(tokens, fullkv_tokens)


def test_fast_decoder_attends_sinks_chosen_clusters_and_every_new_slot_within_the_budget(model, prompt):
    comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, full_layers=2)
    target = new_target(model, comp)
    prefill(model, prompt, [target])
    state = ClusterState.build(comp, target.cache)
    sinks, room, tail_start = state.static_index(2, PROMPT_LEN + 10)  # ten slots for generated tokens
    assert (sinks, room, tail_start) == (4, 40 - 4 - 10, PROMPT_LEN)  # sinks + chosen + 10 slots: the budget
    assert state.static_index(1, PROMPT_LEN + 10) is None  # full layers


def test_static_attention_reads_sinks_chosen_members_then_the_filled_new_slots_only(model, prompt):
    from chunkkv_cli.compress.base import grouped_decode_attention
    from chunkkv_cli.fast_decode import StaticKV

    comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, full_layers=2)
    target = new_target(model, comp)
    prefill(model, prompt, [target])
    state = ClusterState.build(comp, target.cache)
    static = StaticKV(target.cache, new_tokens=10, recall=state)
    static.filled += 3  # three generated tokens in the buffer; seven slots still unfilled
    keys, values = static.keys[2], static.values[2]
    keys[:, :, PROMPT_LEN + 3 :] = 1e4  # attending an unfilled slot would swamp the result
    query = torch.randn(2, 4, 1, 16)
    got = static.attend(2, query, keys, values, 0.25)
    layer = state.layers[2]
    chosen = select_tokens(query, layer.centroids, layer.order, layer.offsets, 40 - 4 - 10)  # sinks, chosen, 3 new
    index = torch.cat([torch.arange(4).expand(2, 2, 4), chosen], dim=-1)
    picked = [torch.cat([gather_tokens(t, index), t[:, :, PROMPT_LEN : PROMPT_LEN + 3]], dim=2) for t in (keys, values)]
    torch.testing.assert_close(got, grouped_decode_attention(query, *picked, 0.25))


def test_layers_fitted_together_or_alone_get_the_same_clusters_and_keys_join_their_nearest(model, prompt):
    comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, fit_per_cluster=5, full_layers=1)
    target = new_target(model, comp)
    prefill(model, prompt, [target])
    together = ClusterState.build(comp, target.cache, max_stacked=8)
    alone = ClusterState.build(comp, target.cache, max_stacked=1)
    for a, b, layer in zip(together.layers[1:], alone.layers[1:], target.cache.layers[1:]):
        torch.testing.assert_close(a.centroids, b.centroids)
        assert torch.equal(a.order, b.order) and torch.equal(a.offsets, b.offsets)
        sims = F.normalize(layer.keys[:, :, 4:], dim=-1) @ a.centroids.transpose(-1, -2)
        nearest = sims.argmax(-1)
        for cluster in range(a.centroids.shape[2]):  # the members of each cluster are the keys nearest to it
            got = a.order[..., a.offsets[0, 0, cluster] : a.offsets[0, 0, cluster + 1]]
            assert (nearest[0, 0, got[0, 0] - 4] == cluster).all()


def test_offloaded_clusters_answer_like_the_device_ones_and_free_the_device_cache(model, prompt):
    outputs = {}
    for offload in (None, "cpu"):
        comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, full_layers=1, offload=offload)
        target = new_target(model, comp)
        pre = prefill(model, prompt, [target])
        full = cache_bytes(target.cache)
        state = ClusterState.build(comp, target.cache)
        outputs[offload] = decode(model, target.cache, pre.logits, PROMPT_LEN, 8, recall=state)
        if offload:
            assert state.offloaded and state.layers[0] is None and state.layers[1].host[0].shape[2] == PROMPT_LEN - 4
            assert target.cache.layers[0].keys.shape[2] == PROMPT_LEN + 7  # the full layer stays whole
            assert target.cache.layers[1].keys.shape[2] == 4 + 7  # sinks + generated tokens
            assert cache_bytes(target.cache) < full / 2
    assert torch.equal(outputs[None], outputs["cpu"])


def test_offload_needs_the_hf_decoder(model, prompt):
    from chunkkv_cli.errors import ChunkKVError

    comp = make_compressor("clusterkv", budget=40, sinks=4, tokens_per_cluster=20, offload="cpu")
    target = new_target(model, comp)
    pre = prefill(model, prompt, [target])
    state = ClusterState.build(comp, target.cache)
    with pytest.raises(ChunkKVError, match="--decoder hf"):
        decode(model, target.cache, pre.logits, PROMPT_LEN, 4, decoder="fast", recall=state)
    assert decode(model, target.cache, pre.logits, PROMPT_LEN, 4, decoder="auto", recall=state).shape == (2, 4)
    with pytest.raises(ChunkKVError, match="--offload"):
        make_compressor("clusterkv", offload="gpu")


def test_clusterkv_keeps_the_whole_prompt_at_prefill(model, prompt):
    comp = make_compressor("clusterkv", budget=16)
    assert comp.select(torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), 0, 4, 0.25) is None
    assert comp.kept_tokens(5000) == 5000


def test_batch_rows_select_independently(model, prompt):
    comp = make_compressor("clusterkv", budget=30, sinks=2, tokens_per_cluster=15, full_layers=0)
    twin = torch.stack([prompt[0], prompt[0]])
    tokens_twin, _, _ = generate(model, twin, comp, new_tokens=6)
    single, _, _ = generate(model, prompt[:1], comp, new_tokens=6)
    mixed, _, _ = generate(model, prompt, comp, new_tokens=6)
    assert torch.equal(tokens_twin[0], tokens_twin[1]) and torch.equal(tokens_twin[0], single[0])
    assert torch.equal(mixed[0], single[0])


def test_ask_with_clusterkv(monkeypatch, model):
    from chunkkv_cli.pipeline import answer
    from tests.conftest import CharTokenizer

    ids = torch.randint(0, 128, (200,), generator=torch.Generator().manual_seed(3)).tolist()
    comp = make_compressor("clusterkv", budget=48, sinks=4, tokens_per_cluster=20)
    result = answer(model, CharTokenizer(), ids, comp, max_new_tokens=8)
    assert result.new_tokens == 8 and result.kept_tokens == 200


# --- the CLI ------------------------------------------------------------------------------------------

from tests.test_cli_ask import doc, invoke, one_line_error, tiny_loaded  # noqa: E402,F401  (fixtures)


def test_cli_ask_clusterkv_clusters_and_decodes(tiny_loaded, doc, monkeypatch):
    import json

    built = []
    original = ClusterState.build.__func__

    def spy(cls, compressor, cache):
        built.append(compressor)
        return original(cls, compressor, cache)

    monkeypatch.setattr(ClusterState, "build", classmethod(spy))
    result = invoke(doc, "Who keeps the ledger?", "--method", "clusterkv", "--budget", "64", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["method"] == "clusterkv" and report["new_tokens"] == 4
    assert report["kept_tokens"] == report["prompt_tokens"]
    assert len(built) == 1 and built[0].budget == 64


def test_cli_offload_cpu_shrinks_the_device_cache_and_is_clusterkv_only(tiny_loaded, doc):
    import json

    reports = {}
    for extra in ((), ("--offload", "cpu")):
        result = invoke(doc, "Who?", "--method", "clusterkv", "--budget", "64", "--max-new-tokens", "4", "--json", *extra)
        assert result.exit_code == 0, result.output
        reports[extra] = json.loads(result.stdout[result.stdout.index("{"):])
    on_device, offloaded = reports[()], reports[("--offload", "cpu")]
    assert offloaded["answer"] == on_device["answer"]
    # layers 0-1 of the tiny model's 4 stay whole (full_layers=2); layers 2-3 keep only sinks + new tokens
    assert offloaded["kept_kv_bytes"] < 0.6 * on_device["kept_kv_bytes"]
    one_line_error(invoke(doc, "Who?", "--offload", "cpu"), "--offload is for methods that recall tokens at decode time (clusterkv)")
    one_line_error(invoke(doc, "Who?", "--method", "clusterkv", "--offload", "cpu", "--decoder", "fast"), "--decoder hf")


def test_cli_clusterkv_takes_one_question(tiny_loaded, doc, tmp_path):
    (tmp_path / "q.txt").write_text("Who?\nWhy?\n")
    one_line_error(invoke(doc, "--questions", tmp_path / "q.txt", "--method", "clusterkv"), "clusterkv")


def test_cli_compress_refuses_clusterkv(doc):
    from typer.testing import CliRunner

    from chunkkv_cli.cli import app

    result = CliRunner().invoke(app, ["compress", str(doc), "--method", "clusterkv"])
    assert result.exit_code == 2 and "chunkkv ask" in result.output and "Traceback" not in result.output


def test_eval_similarity_leaves_out_clusterkv():
    from chunkkv_cli.commands.eval import parse_methods
    from chunkkv_cli.errors import ChunkKVError

    assert parse_methods("chunkkv,clusterkv", "qa") == ["chunkkv", "clusterkv"]
    assert parse_methods("chunkkv,clusterkv", "similarity") == ["chunkkv"]
    with pytest.raises(ChunkKVError, match="evicts"):
        parse_methods("clusterkv,fullkv", "similarity")
