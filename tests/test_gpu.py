"""CUDA-only checks (skipped without a GPU): graphed selection and the engine on the device."""

from __future__ import annotations

import pytest
import torch

from chunkkv_cli.compress import METHODS, make_compressor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GRAPHED = [name for name, cls in METHODS.items() if cls.graphable]


@pytest.mark.parametrize("method", GRAPHED)
@pytest.mark.parametrize("length", [515, 2048])
def test_graph_replay_selects_what_eager_selects(method, length, monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    comp = make_compressor(method, ratio=0.1, window=16)
    for layer in range(3):  # first call captures, later calls replay with new inputs
        query = torch.randn(2, 8, length, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        key = torch.randn(2, 2, length, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        graphed = comp.select(query, key, layer, 3, 0.125)
        monkeypatch.setenv("CHUNKKV_NO_CUDA_GRAPHS", "1")
        eager = comp.select(query, key, layer, 3, 0.125)
        monkeypatch.delenv("CHUNKKV_NO_CUDA_GRAPHS")
        assert torch.equal(graphed, eager)


def test_uncompressed_logits_match_plain_sdpa_on_cuda():
    """CUDA kernels differ between the two paths, so compare logits, not near-tied greedy tokens."""
    from tests.conftest import tiny_model

    from chunkkv_cli.generate import new_target, prefill

    model = tiny_model().cuda()
    ref = tiny_model("sdpa").cuda()
    prompt = torch.randint(0, 128, (2, 300), device="cuda")
    with torch.no_grad():
        expected = ref(prompt).logits[:, -1].float()
    target = new_target(model, make_compressor("chunkkv", budget=10_000))
    pre = prefill(model, prompt, [target])
    torch.testing.assert_close(pre.logits, expected, rtol=1e-3, atol=1e-3)


def test_fast_decoder_graph_replay_matches_eager_steps_and_hf():
    from tests.conftest import tiny_model

    from chunkkv_cli.fast_decode import FastDecoder
    from chunkkv_cli.generate import hf_step, new_target, prefill

    model = tiny_model().cuda()
    prompt = torch.randint(0, 128, (2, 300), device="cuda")
    caches = []
    for _ in range(3):
        target = new_target(model, make_compressor("pyramidkv", budget=64, window=8))
        prefill(model, prompt, [target])
        caches.append(target.cache)
    graphed = FastDecoder(model, caches[0], 300, 8, use_graph=True).step
    eager = FastDecoder(model, caches[1], 300, 8, use_graph=False).step
    reference = hf_step(model, caches[2], 300)
    token = torch.tensor([3, 5], device="cuda")
    for _ in range(6):
        a, b, c = graphed(token).clone(), eager(token), reference(token)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)
        token = c.argmax(-1)


def test_compiled_decoder_matches_the_eager_fast_decoder():
    from tests.conftest import tiny_model

    from chunkkv_cli.fast_decode import FastDecoder
    from chunkkv_cli.generate import new_target, prefill

    model = tiny_model().cuda()
    prompt = torch.randint(0, 128, (2, 300), device="cuda")
    steps = []
    for compile in (False, True):
        target = new_target(model, make_compressor("chunkkv", budget=64, window=8))
        prefill(model, prompt, [target])
        steps.append(FastDecoder(model, target.cache, 300, 8, compile=compile).step)
    token = torch.tensor([3, 5], device="cuda")
    for _ in range(6):
        a, b = steps[0](token).clone(), steps[1](token)
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)
        token = a.argmax(-1)


def test_clusterkv_fast_decoder_with_triton_kernels_matches_the_pytorch_selection(monkeypatch):
    """Graph-replayed steps through the ranking and ranked-attention kernels vs the same steps in PyTorch ops."""
    from tests.conftest import tiny_model

    from chunkkv_cli.compress.clusterkv import ClusterState
    from chunkkv_cli.fast_decode import FastDecoder
    from chunkkv_cli.generate import new_target, prefill

    model = tiny_model().cuda()
    prompt = torch.randint(0, 128, (2, 400), device="cuda")
    comp = make_compressor("clusterkv", budget=96, sinks=4, tokens_per_cluster=20, full_layers=1)
    caches = []
    for _ in range(2):
        target = new_target(model, comp)
        prefill(model, prompt, [target])
        caches.append(target.cache)
    state = ClusterState.build(comp, caches[0])  # one set of clusters: only the per-step path differs
    kernels = FastDecoder(model, caches[0], 400, 8, use_graph=True, recall=state).step
    torch_ops = FastDecoder(model, caches[1], 400, 8, use_graph=False, recall=state).step
    token = torch.tensor([3, 5], device="cuda")
    for _ in range(6):
        got = kernels(token).clone()
        monkeypatch.setenv("CHUNKKV_NO_TRITON", "1")
        expected = torch_ops(token)
        monkeypatch.delenv("CHUNKKV_NO_TRITON")
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
        token = expected.argmax(-1)


def test_clusterkv_step_selection_with_the_kernel_matches_pytorch_before_and_after_reclustering(monkeypatch):
    from types import SimpleNamespace

    from chunkkv_cli.compress.clusterkv import ClusterState

    comp = make_compressor("clusterkv", budget=300, sinks=4, tokens_per_cluster=20, full_layers=0,
                           recluster_every=16, new_clusters=2)  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = torch.randn(2, 2, 1030, 64, device="cuda", generator=gen)
    state = ClusterState.build(comp, SimpleNamespace(layers=[SimpleNamespace(keys=keys[:, :, :1000], values=None)]))
    query = torch.randn(2, 8, 1, 64, device="cuda", generator=gen)

    def both(key):
        got = state.indices(0, query, key)
        monkeypatch.setenv("CHUNKKV_NO_TRITON", "1")
        expected = state.indices(0, query, key)
        monkeypatch.delenv("CHUNKKV_NO_TRITON")
        return got, expected

    assert torch.equal(*both(keys[:, :, :1010]))
    state.indices(0, query, keys)  # 30 generated tokens: the first 16 become 2 new clusters
    assert state.layers[0].clustered_end == 1016
    got, expected = both(keys)
    assert got.shape[-1] == 300 and torch.equal(got, expected)
