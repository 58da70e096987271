"""The `fast` decoder (static buffers; CUDA graph on GPU, eager here) against the `hf` decoder."""

from __future__ import annotations

import pytest
import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.fast_decode import StaticKV
from chunkkv_cli.generate import decode, new_target, prefill

PROMPT_LEN = 131


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


def greedy(model, prompt, method, decoder, budget=40, new_tokens=16):
    target = new_target(model, make_compressor(method, budget=budget, window=8))
    pre = prefill(model, prompt, [target])
    return decode(model, target.cache, pre.logits, PROMPT_LEN, new_tokens, decoder=decoder)


@pytest.mark.parametrize("method", ["chunkkv", "snapkv", "pyramidkv", "h2o", "streamingllm", "fullkv"])
def test_fast_and_hf_decoders_produce_identical_greedy_tokens(model, prompt, method):
    assert torch.equal(greedy(model, prompt, method, "fast"), greedy(model, prompt, method, "hf"))


def test_fast_decoder_matches_uncompressed_generate(model, reference_model, prompt):
    expected = reference_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    assert torch.equal(greedy(model, prompt, "fullkv", "fast"), expected[:, PROMPT_LEN:])


def test_static_buffers_hold_each_layers_kept_tokens_and_grow_in_place(model, prompt):
    target = new_target(model, make_compressor("pyramidkv", budget=60, window=8))
    prefill(model, prompt, [target])
    lengths = [layer.keys.shape[-2] for layer in target.cache.layers]
    kept_keys = [layer.keys for layer in target.cache.layers]
    static = StaticKV(target.cache, new_tokens=5)
    handed_over = [t for layer in target.cache.layers for t in (layer.keys, layer.values)]
    assert all(t.shape[-2] == 0 and t.untyped_storage().nbytes() == 0 for t in handed_over), "source memory released"
    assert static.write_pos.tolist() == lengths
    assert static.filled.tolist() == [[n, n] for n in lengths]
    first = static.keys[0]
    for layer, n in zip(range(len(lengths)), lengths):
        assert torch.equal(static.keys[layer][:, :, :n], kept_keys[layer])
    static.open_next_slot()
    static.update(torch.ones(2, 2, 1, 16), torch.ones(2, 2, 1, 16), 0)
    static.advance()
    assert static.keys[0] is first and torch.all(first[:, :, lengths[0]] == 1)
    assert static.filled.tolist() == [[n + 1, n + 1] for n in lengths]


def test_unknown_decoder_is_rejected(model, prompt):
    from chunkkv_cli.errors import ChunkKVError

    with pytest.raises(ChunkKVError, match="--decoder"):
        greedy(model, prompt, "chunkkv", "turbo")


def compiled_misses(shape: dict, prompt, cache_dir, monkeypatch) -> tuple[torch.Tensor, tuple[int, int]]:
    """Greedy tokens of the compiled decoder on a model of `shape`, and how many graphs Dynamo traced and Inductor built."""
    from torch._dynamo.utils import counters

    from tests.conftest import tiny_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    before = counters["stats"]["unique_graphs"], counters["inductor"]["fxgraph_cache_miss"]
    tokens = greedy(tiny_model(**shape), prompt[:1], "chunkkv", "compiled", new_tokens=4)
    after = counters["stats"]["unique_graphs"], counters["inductor"]["fxgraph_cache_miss"]
    return tokens, (after[0] - before[0], after[1] - before[1])


@pytest.mark.slow  # compiles on the CPU (tens of seconds)
def test_compiled_decoder_equals_fast_and_compiles_once_whatever_the_depth(prompt, tmp_path, monkeypatch):
    from tests.conftest import tiny_model

    shapes = {"shallow": dict(num_hidden_layers=2), "deep": dict(num_hidden_layers=6, hidden_size=80)}  # no graph shared
    builds = {}
    for name, shape in shapes.items():
        tokens, builds[name] = compiled_misses(shape, prompt, tmp_path / name, monkeypatch)
        assert torch.equal(tokens, greedy(tiny_model(**shape), prompt[:1], "chunkkv", "fast", new_tokens=4))
    (traced_deep, built_deep), (traced_shallow, built_shallow) = builds["deep"], builds["shallow"]
    assert 0 < built_deep == built_shallow  # a graph holding a layer's own cache or index would be built per layer
    assert traced_deep <= traced_shallow + 1  # a guard on layer_idx would trace each of the 4 more layers again


def test_decode_steps_run_q_k_v_and_gate_up_as_one_product_each_and_leave_the_model_as_it_was(model, prompt):
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    originals = [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj]
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in originals]
    try:
        target = new_target(model, make_compressor("chunkkv", budget=40, window=8))
        pre = prefill(model, prompt, [target])
        prefill_calls = len(calls)
        decode(model, target.cache, pre.logits, PROMPT_LEN, 4, decoder="fast")
    finally:
        for hook in hooks:
            hook.remove()
    assert prefill_calls == 5 and len(calls) == 5, "decode steps ran the stacked products, not the model's own"
    assert [attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj] == originals
    storage = {m.weight.untyped_storage().data_ptr() for m in originals[:3]}
    assert len(storage) == 1, "q, k and v weights are views of one stacked matrix (no second copy)"
    model(prompt[:, :5]).logits.sum().backward()  # the stacked weights were not made in inference mode
    assert attention.k_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_a_stacked_sibling_never_returns_a_slice_of_another_input(model):
    from chunkkv_cli.fused_projections import stacked_projections

    attention = model.model.layers[0].self_attn
    x, y = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    k_weight = attention.k_proj.weight
    with torch.no_grad(), stacked_projections(model):
        alone = attention.k_proj(x)  # called before q: its own product
        attention.q_proj(x)
        other = attention.k_proj(y)  # q ran on x, not y
        attention.q_proj(x)
        handed = attention.k_proj(x)
    for got, inp in ((alone, x), (other, y), (handed, x)):
        torch.testing.assert_close(got, torch.nn.functional.linear(inp, k_weight))


def test_auto_compiles_on_a_gpu_and_keeps_hf_on_the_cpu():
    from chunkkv_cli.generate import resolve_decoder

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_decoder("auto", gpu) == "compiled"
    assert resolve_decoder("auto", cpu) == "hf"
    assert resolve_decoder("fast", gpu) == "fast"


def test_a_failed_compile_decodes_uncompiled_with_a_note_when_auto_chose_it(model, prompt, monkeypatch, caplog):
    from chunkkv_cli import fast_decode
    from chunkkv_cli.fast_decode import FastDecoder

    def broken(model):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fast_decode, "compiled_regions", broken)
    expected = greedy(model, prompt, "chunkkv", "fast")
    for fall_back in (True, False):
        target = new_target(model, make_compressor("chunkkv", budget=40, window=8))
        pre = prefill(model, prompt, [target])
        step = FastDecoder(model, target.cache, PROMPT_LEN, 16, compile=True, fall_back=fall_back).step
        if not fall_back:
            with pytest.raises(RuntimeError, match="no compiler"):
                decode(model, None, pre.logits, PROMPT_LEN, 16, step=step)
            continue
        with caplog.at_level("WARNING", logger="chunkkv"):
            assert torch.equal(decode(model, None, pre.logits, PROMPT_LEN, 16, step=step), expected)
        assert "compiling the decode step failed (RuntimeError)" in caplog.text


def test_the_one_time_compile_is_announced_before_and_timed_after_once_per_batch_size(model, prompt, monkeypatch, caplog):
    from chunkkv_cli import compiled
    from chunkkv_cli.fast_decode import FastDecoder

    monkeypatch.setattr(FastDecoder, "_build", lambda self: None)  # the wiring, not Inductor, is under test
    monkeypatch.setattr(compiled, "_built", compiled.weakref.WeakKeyDictionary())
    monkeypatch.setenv("CHUNKKV_CACHE", "/nonexistent/chunkkv-cache")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    lines = []
    for batch in (2, 2, 1):
        target = new_target(model, make_compressor("chunkkv", budget=40, window=8))
        prefill(model, prompt[:batch], [target])
        decoder = FastDecoder(model, target.cache, PROMPT_LEN, 4, use_graph=False, compile=True)
        caplog.clear()
        with caplog.at_level("WARNING", logger="chunkkv"):
            decoder._prepare()
        lines.append([r.getMessage() for r in caplog.records])
    first, again, other_batch = lines
    assert len(first) == 2 and first[0].startswith("note: compiling the decode step") and "/nonexistent/chunkkv-cache" in first[0]
    assert first[1].startswith("note: decode step compiled in")
    assert again == [] and len(other_batch) == 2  # a new batch size compiles again

    def broken(self):
        if self.compile:
            raise RuntimeError("no compiler here")

    monkeypatch.setattr(FastDecoder, "_build", broken)
    monkeypatch.setattr(compiled, "_built", compiled.weakref.WeakKeyDictionary())
    target = new_target(model, make_compressor("chunkkv", budget=40, window=8))
    prefill(model, prompt, [target])
    FastDecoder(model, target.cache, PROMPT_LEN, 4, use_graph=False, compile=True, fall_back=True)._prepare()
    assert not compiled.is_built(model, 2)  # a failed compile is not taken for a built one


def test_compiled_kernels_go_under_chunkkvs_cache_folder_unless_inductors_is_named(monkeypatch, tmp_path):
    from chunkkv_cli.compiled import use_persistent_cache

    monkeypatch.delenv("CHUNKKV_CACHE", raising=False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert use_persistent_cache() == tmp_path / "xdg" / "chunkkv" / "inductor"  # where the GGUF conversions go too
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_persistent_cache() == tmp_path / "mine"
