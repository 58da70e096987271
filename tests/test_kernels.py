"""The Triton kernels against PyTorch references.

They run on a CUDA GPU, or on the CPU through Triton's interpreter:
    TRITON_INTERPRET=1 pytest tests/test_kernels.py   (needs `pip install triton`)
Without either they are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from chunkkv_cli import decode_kernel

if decode_kernel.triton is None:
    pytest.skip("Triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

from chunkkv_cli.compress.base import gather_tokens, grouped_decode_attention  # noqa: E402
from chunkkv_cli.compress.clusterkv import kmeans_cosine, members, select_tokens  # noqa: E402
from chunkkv_cli.cluster_kernels import cluster_attention, select_clusters  # noqa: E402

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)


@pytest.mark.parametrize("batch,q_heads,kv_heads,capacity", [(1, 32, 8, 3300), (3, 28, 4, 700), (2, 8, 8, 64), (5, 9, 3, 2000)])
def test_split_kv_kernel_matches_masked_reference(batch, q_heads, kv_heads, capacity):
    gen = torch.Generator().manual_seed(1)
    d = 128 if kv_heads != 3 else 64
    q, k, v = randn(batch, q_heads, 1, d, gen=gen), randn(batch, kv_heads, capacity, d, gen=gen), randn(batch, kv_heads, capacity, d, gen=gen)
    lengths = torch.randint(1, capacity + 1, (batch,), generator=gen, dtype=torch.int32).to(DEVICE)
    lengths[0] = capacity  # one sequence uses every slot, others stop mid-block
    mask = torch.arange(capacity, device=DEVICE)[None, :] < lengths[:, None]
    k.masked_fill_(~mask[:, None, :, None], 100.0)  # attending an unfilled slot would swamp the result
    expected = grouped_decode_attention(q.float(), k.float(), v.float(), 0.1, mask)
    got = decode_kernel.decode_attention(q, k, v, lengths, 0.1)
    assert got.shape == (batch, 1, q_heads, d)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "batch,q_heads,kv_heads,d,room,n_clusters,sinks",
    [(2, 8, 2, 64, 150, 37, 5), (3, 9, 3, 32, 0, 37, 5), (1, 4, 4, 16, 1, 37, 5), (2, 8, 2, 64, 200, 5, 0)],
)
def test_cluster_attention_reads_sinks_chosen_members_then_the_filled_tail(batch, q_heads, kv_heads, d, room, n_clusters, sinks):
    gen = torch.Generator().manual_seed(0)
    clustered_len = 500
    centroids, order, offsets = clustered(batch, kv_heads, clustered_len, n_clusters, d, gen, sinks)
    centroids = centroids.to(DTYPE)  # as ClusterState keeps them (bf16 on a GPU)
    tail_start = sinks + clustered_len
    capacity = tail_start + 40
    query = torch.randn(batch, q_heads, 1, d, generator=gen).to(DTYPE).float()  # the kernel's query, exactly
    k, v = randn(batch, kv_heads, capacity, d, gen=gen), randn(batch, kv_heads, capacity, d, gen=gen)
    filled = torch.tensor([capacity, tail_start + 5, tail_start][:batch], dtype=torch.int32, device=DEVICE)
    unfilled = torch.arange(capacity, device=DEVICE)[None, :] >= filled[:, None]
    k.masked_fill_(unfilled[:, None, :, None], 100.0)  # attending an unfilled slot would swamp the result
    lengths = filled + (sinks + room - tail_start)
    got = cluster_attention(query.to(DEVICE, DTYPE), k, v, *(t.to(DEVICE) for t in (centroids, order, offsets)),
                            lengths, sinks, room, tail_start, 0.2)  # fmt: skip
    with pytest.raises(ValueError, match="exceeds"):
        cluster_attention(query.to(DEVICE, DTYPE), k, v, *(t.to(DEVICE) for t in (centroids, order, offsets)),
                          lengths, sinks, clustered_len + 1, tail_start, 0.2)  # fmt: skip
    chosen = select_tokens(query, centroids, order, offsets, room).to(DEVICE)
    index = torch.cat([torch.arange(sinks, device=DEVICE).expand(batch, kv_heads, sinks), chosen], dim=-1)
    for seq in range(batch):
        picked = [torch.cat([gather_tokens(t[seq : seq + 1], index[seq : seq + 1]),
                             t[seq : seq + 1, :, tail_start : int(filled[seq])]], dim=2) for t in (k, v)]  # fmt: skip
        expected = grouped_decode_attention(query[seq : seq + 1].to(DEVICE), picked[0].float(), picked[1].float(), 0.2)
        torch.testing.assert_close(got[seq : seq + 1].float(), expected, rtol=2e-2, atol=2e-2)


def clustered(batch, kv_heads, n, n_clusters, d, gen, sinks):
    """Unit centroids and the CSR members of n keys, with a few clusters left empty and one large."""
    assign = torch.randint(0, n_clusters - 3, (batch, kv_heads, n), generator=gen)
    assign[..., : n // 3] = 0  # a cluster longer than one copy block
    centroids = F.normalize(torch.randn(batch, kv_heads, n_clusters, d, generator=gen), dim=-1)
    order, offsets = members(assign, n_clusters, sinks)
    return centroids, order, offsets


@pytest.mark.parametrize("room", [0, 1, 100, 400, 500])
def test_cluster_selection_kernel_matches_select_tokens(room):
    gen = torch.Generator().manual_seed(1)
    batch, q_heads, kv_heads, d, sinks = 2, 12, 3, 32, 5
    centroids, order, offsets = clustered(batch, kv_heads, 500, 37, d, gen, sinks)
    query = torch.randn(batch, q_heads, 1, d, generator=gen)
    got = select_clusters(*(t.to(DEVICE) for t in (query, centroids, order, offsets)), sinks, room).cpu()
    assert got.shape == (batch, kv_heads, sinks + room)
    assert got[..., :sinks].eq(torch.arange(sinks)).all()
    assert torch.equal(got[..., sinks:], select_tokens(query, centroids, order, offsets, room))


def test_cluster_selection_kernel_on_kmeans_clusters_of_real_shape():
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(1, 2, 2000, 64, generator=gen)
    centroids, assign = kmeans_cosine(keys, 25, iterations=5)
    order, offsets = members(assign, 25, 16)
    query = torch.randn(1, 8, 1, 64, generator=gen)
    got = select_clusters(*(t.to(DEVICE) for t in (query, centroids, order, offsets)), 16, 1000).cpu()
    assert torch.equal(got[..., 16:], select_tokens(query, centroids, order, offsets, 1000))


def test_cluster_kernels_with_nothing_clustered_attend_the_sinks_and_the_tail():
    gen = torch.Generator().manual_seed(4)
    q, k, v = randn(2, 4, 1, 16, gen=gen), randn(2, 2, 12, 16, gen=gen), randn(2, 2, 12, 16, gen=gen)
    centroids, order = torch.zeros(2, 2, 0, 16, device=DEVICE), torch.zeros(2, 2, 0, dtype=torch.long, device=DEVICE)
    offsets = torch.zeros(2, 2, 1, dtype=torch.long, device=DEVICE)
    assert select_clusters(q, centroids, order, offsets, 5, 0).cpu().eq(torch.arange(5)).all()
    lengths = torch.tensor([12, 9], dtype=torch.int32, device=DEVICE)  # 5 sinks, then the tail from slot 5
    got = cluster_attention(q, k, v, centroids, order, offsets, lengths, 5, 0, 5, 0.25)
    for seq, n in enumerate((12, 9)):
        expected = grouped_decode_attention(q[seq : seq + 1].float(), k[seq : seq + 1, :, :n].float(), v[seq : seq + 1, :, :n].float(), 0.25)
        torch.testing.assert_close(got[seq : seq + 1].float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n,n_clusters", [(1000, 37), (129, 130), (64, 1)])
def test_nearest_centroid_kernel_finds_the_most_similar_centroid(n, n_clusters):
    from chunkkv_cli.cluster_kernels import _nearest

    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 3, n, 64, generator=gen) * 5
    centroids = F.normalize(torch.randn(2, 3, n_clusters, 64, generator=gen), dim=-1)
    best, index = (t.cpu() for t in _nearest(keys.to(DEVICE, DTYPE), centroids.to(DEVICE, DTYPE)))
    cosine = F.normalize(keys, dim=-1) @ centroids.transpose(-1, -2)
    assert index.dtype == torch.long and index.shape == (2, 3, n)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(best, cosine.amax(-1), rtol=tol, atol=tol)
    torch.testing.assert_close(cosine.gather(-1, index[..., None]).squeeze(-1), cosine.amax(-1), rtol=tol, atol=tol)
    if DTYPE == torch.float32:
        assert torch.equal(index, cosine.argmax(-1))


def test_kmeans_through_the_kernel_matches_kmeans_in_torch(monkeypatch):
    from chunkkv_cli import cluster_kernels
    from tests.test_clusterkv import same_partition, separated

    keys, labels = separated(batch=1, heads=2, n_clusters=12, per=50, dim=32)
    keys = keys.to(DEVICE, DTYPE)
    monkeypatch.setattr(cluster_kernels, "available", lambda device, head_dim: False)
    reference = kmeans_cosine(keys, 12, iterations=6)
    monkeypatch.setattr(cluster_kernels, "available", lambda device, head_dim: True)
    centroids, assign = kmeans_cosine(keys, 12, iterations=6)
    assert same_partition(assign.cpu(), labels)
    assert torch.equal(assign, reference[1])
    torch.testing.assert_close(centroids, reference[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kv_heads,group,doc_len,n", [(2, 4, 300, 70), (3, 3, 129, 64), (1, 1, 64, 5)])
def test_best_weights_kernel_matches_the_softmax_maximum(kv_heads, group, doc_len, n):
    from chunkkv_cli.kvzip_kernels import best_weights

    gen = torch.Generator().manual_seed(5)
    folded, keys = randn(2, kv_heads, group * n, 64, gen=gen), randn(2, kv_heads, doc_len + n, 64, gen=gen)
    logits = (folded.float() @ keys.float().transpose(-1, -2)) * 0.125
    lse = logits.logsumexp(dim=-1)
    expected = (logits - lse[..., None]).exp()[..., :doc_len].amax(dim=2)
    got = best_weights(folded, keys[:, :, :doc_len], lse, 0.125)
    assert torch.allclose(got, expected, atol=2e-3, rtol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="flash attention runs on CUDA only")
def test_gpu_reconstruction_pass_matches_the_cpu_reference():
    from chunkkv_cli import kvzip_kernels
    from chunkkv_cli.compress import kvzip

    gen = torch.Generator().manual_seed(6)
    query, key, value = randn(1, 8, 96, 128, gen=gen), randn(1, 2, 400, 128, gen=gen), randn(1, 2, 400, 128, gen=gen)
    doc_k, doc_v, own_k, own_v = key[:, :, :304], value[:, :, :304], key[:, :, 304:], value[:, :, 304:]
    out, own_lse, lse = kvzip_kernels.attend(query, doc_k, doc_v, own_k, own_v, 0.088)
    full = kvzip_kernels.best_weights(query.reshape(1, 2, 4 * 96, 128), doc_k, lse, 0.088)
    local = kvzip_kernels.local_scores(query, doc_k, own_lse, (100, 228), 4, 0.088)
    q, k, v = (t.float().cpu() for t in (query, key, value))
    assert torch.allclose(out.float().cpu(), kvzip.attend_cpu(q, k, v, 0.088), atol=2e-2)
    assert torch.allclose(full.cpu(), kvzip.full_scores(q, k, 304, 0.088, 32), atol=2e-3, rtol=3e-2)
    assert torch.allclose(local.cpu(), kvzip.local_scores(q, k, 304, (100, 228), 4, 0.088, 32), atol=2e-3, rtol=3e-2)


def test_one_launch_slot_write_equals_index_copy():
    gen = torch.Generator().manual_seed(4)
    keys, values = (torch.randn(3, 2, 50, 64, generator=gen).half().to(DEVICE) for _ in "kv")
    new_k, new_v = (torch.randn(3, 2, 1, 64, generator=gen).half().to(DEVICE) for _ in "kv")
    slot = torch.tensor(17, device=DEVICE)
    expected_k, expected_v = keys.clone().index_copy_(2, slot.view(1), new_k), values.clone().index_copy_(2, slot.view(1), new_v)
    decode_kernel.write_slot(new_k, new_v, keys, values, slot)
    assert torch.equal(keys, expected_k) and torch.equal(values, expected_v)
