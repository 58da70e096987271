"""Every family chunkkv compresses, as a tiny random-weight model: methods, equivalence, hybrid layers, .ckv files."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from chunkkv_cli import cache_io
from chunkkv_cli.compress import METHODS, make_compressor
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.families import SLIDING
from chunkkv_cli.generate import (
    SLIDING_FALLBACK, decode, hf_step, kept_lengths, new_target, note_once, prefill, resolve_decoder,
)
from chunkkv_cli.memory import memory_report
from chunkkv_cli.profiles import load_profile
from chunkkv_cli.reuse import compress_prefix, question_tokens
from chunkkv_cli.window_attention import windowed_attention
from tests.families import FAMILY_PROFILES, WINDOW, tiny_family_model, tiny_profile

PROMPT_LEN, NEW_TOKENS = 30, 5  # the prompt runs past the tiny models' 8-token window
LONG_PROMPT = 300  # longer than any dimension of the tiny models (vocabulary 128)
HYBRID = [f for f in FAMILY_PROFILES if tiny_profile(FAMILY_PROFILES[f]).sliding_window]


@pytest.fixture(scope="module", params=list(FAMILY_PROFILES))
def family(request):
    model, reference = tiny_family_model(request.param)
    return request.param, model, reference


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 128, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def generate(model, prompt, compressor, new_tokens=NEW_TOKENS):
    target = new_target(model, compressor)
    pre = prefill(model, prompt, [target])
    kept = kept_lengths(target.cache)
    return decode(model, target.cache, pre.logits, prompt.shape[1], new_tokens, decoder="hf"), kept


def test_every_method_at_ratio_one_reproduces_the_models_own_greedy_tokens(family, prompt):
    """transformers' eager attention (its own windows, soft-caps and sinks) against chunkkv's, method by method."""
    name, model, reference = family
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                      do_sample=False)[:, PROMPT_LEN:]  # fmt: skip
    for method in METHODS:
        tokens, _ = generate(model, prompt, make_compressor(method, ratio=1.0, window=4))
        assert torch.equal(tokens, expected), f"{name}: {method}"


def test_only_full_attention_layers_are_compressed(family, prompt):
    name, model, _ = family
    kinds = tiny_profile(FAMILY_PROFILES[name]).layer_types()
    if name not in HYBRID:
        pytest.skip("no sliding-window layers (every method ran in the test above)")
    for method in ("snapkv", "pyramidkv", "clusterkv", "kvzip"):
        tokens, kept = generate(model, prompt, make_compressor(method, ratio=0.3, window=4), new_tokens=2)
        windows = [n for n, kind in zip(kept, kinds) if kind == SLIDING]
        assert windows == [WINDOW - 1] * len(windows), f"{name}: {method}"
        assert tokens.shape == (1, 2)
    _, kept = generate(model, prompt, make_compressor("snapkv", ratio=0.3, window=4), new_tokens=1)
    assert [n for n, kind in zip(kept, kinds) if kind != SLIDING] == [9] * kinds.count("full_attention")


@pytest.mark.parametrize("method", ["chunkkv", "kvzip"])
def test_ckv_round_trips_and_answers_the_same(family, method, tmp_path):
    name, model, _ = family
    if method == "kvzip" and name not in HYBRID:
        pytest.skip("the scoring pass over full-attention layers alone is tested in test_cache_io")
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    prefix = compress_prefix(model, ids, make_compressor(method, ratio=0.5, window=4), tokenizer=None)
    meta = {"format": cache_io.FORMAT, "format_version": cache_io.FORMAT_VERSION, "layers": len(prefix.keys),
            "prefix_tokens": prefix.prefix_len, "full_kv_bytes": prefix.full_bytes}  # fmt: skip
    cache_io.save(tmp_path / "x.ckv", prefix, meta)
    _, loaded = cache_io.read(tmp_path / "x.ckv")
    cache_io.check_shapes(loaded, model.config, "x.ckv")
    assert loaded.kept_lengths() == prefix.kept_lengths()
    for mine, theirs in zip(prefix.positions, loaded.positions):
        assert torch.equal(mine, theirs)
    question = [7, 30, 99, 4]
    assert torch.equal(question_tokens(model, prefix, question, 4), question_tokens(model, loaded, question, 4))


def test_fullkv_prefix_then_question_equals_the_whole_prompt_through_transformers(family):
    """A stored window (seen length restored) continues exactly as the model would over the whole prompt."""
    _, model, reference = family
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    question = [11, 12, 13, 14, 15]
    whole = torch.tensor([ids + question])
    with torch.no_grad():
        expected = reference.generate(whole, attention_mask=torch.ones_like(whole), max_new_tokens=4, do_sample=False)
    prefix = compress_prefix(model, ids, make_compressor("fullkv"))
    assert torch.equal(question_tokens(model, prefix, question, 4, decoder="hf"), expected[:, whole.shape[1]:])


@pytest.mark.parametrize("softcap, sinks, window", [(None, None, 5), (3.0, None, None), (None, True, 5), (2.0, True, 4)])
def test_windowed_attention_in_blocks_equals_one_block(monkeypatch, softcap, sinks, window):
    import chunkkv_cli.window_attention as wa

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=gen) for h, n in ((4, 9), (2, 20), (2, 20)))
    sink = torch.randn(4, generator=gen) if sinks else None
    whole = windowed_attention(q, k, v, 0.3, window, softcap, sink)
    monkeypatch.setattr(wa, "SCORE_BYTES", 4 * 2 * 4 * 20 * 2)  # two query rows per block
    assert torch.allclose(windowed_attention(q, k, v, 0.3, window, softcap, sink), whole, atol=1e-6)
    rows = torch.arange(11, 20)[:, None]
    allowed = (torch.arange(20)[None] <= rows) & ((torch.arange(20)[None] > rows - window) if window else True)
    logits = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, dim=1)) * 0.3
    logits = torch.tanh(logits / softcap) * softcap if softcap else logits
    logits = logits.masked_fill(~allowed, float("-inf"))
    if sinks:
        logits = torch.cat([logits, sink.view(1, 4, 1, 1).expand(2, 4, 9, 1)], dim=-1)
    probs = logits.softmax(-1)[..., :20]
    expected = torch.einsum("bhqk,bhkd->bqhd", probs, v.repeat_interleave(2, dim=1))
    assert torch.allclose(whole, expected, atol=1e-5)


def test_auto_decoder_falls_back_to_hf_on_sliding_layers_and_fast_is_refused(caplog):
    model, _ = tiny_family_model("gemma3_text")
    target = new_target(model, make_compressor("chunkkv", ratio=0.5))
    prefill(model, torch.randint(0, 128, (1, 20)), [target])
    cuda = torch.device("cuda")
    note_once.cache_clear()
    with caplog.at_level("WARNING", logger="chunkkv"):
        assert resolve_decoder("auto", cuda, None, target.cache) == "hf"
        assert resolve_decoder("auto", cuda, None, target.cache) == "hf"
    assert [r.getMessage() for r in caplog.records] == [f"note: {SLIDING_FALLBACK}"]
    with pytest.raises(ChunkKVError, match="--decoder fast: .*sliding-window layers.*use --decoder hf"):
        resolve_decoder("fast", cuda, None, target.cache)
    full, _ = tiny_family_model("qwen3")
    other = new_target(full, make_compressor("chunkkv", ratio=0.5))
    prefill(full, torch.randint(0, 128, (1, 20)), [other])
    assert resolve_decoder("auto", cuda, None, other.cache) == "compiled"


def test_memory_counts_each_layer_type():
    """Gemma 3 27B at 32k, bf16: 10 full layers at 32,768 (or kept) tokens, 52 sliding ones at 1,023."""
    report = memory_report(load_profile("gemma-3-27b"), "32k", ratio=0.1, dtype="bf16")
    per_token_layer = 2 * 16 * 128 * 2
    assert (report["full_attention_layers"], report["sliding_layers"], report["sliding_window"]) == (10, 52, 1024)
    assert report["gqa_bytes"] == per_token_layer * (10 * 32768 + 52 * 1023)
    assert report["compressed_bytes"] == per_token_layer * (10 * 3277 + 52 * 1023)
    assert report["compressed_peak_bytes"] == report["compressed_bytes"] + per_token_layer * (32768 - 3277)
    every = memory_report(load_profile("mistral-7b-v0.1"), "32k", ratio=0.1, dtype="bf16")
    assert every["gqa_bytes"] == every["compressed_bytes"] == 2 * 8 * 128 * 2 * 32 * 4095
    plain = memory_report(load_profile("qwen3-8b"), "32k", ratio=0.1, dtype="bf16")
    assert plain["sliding_layers"] == 0 and plain["gqa_bytes"] == 2 * 8 * 128 * 2 * 36 * 32768


@pytest.mark.parametrize("model_type, kind", [("t5", "an encoder-decoder"), ("mamba", "a state-space model"),
                                              ("rwkv", "a linear-attention (RNN) model"), ("gpt2", None)])  # fmt: skip
def test_a_model_without_a_compressible_kv_cache_is_one_line_naming_the_families(tmp_path, model_type, kind):
    import json

    from typer.testing import CliRunner

    from chunkkv_cli.cli import app

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
    (tmp_path / "doc.txt").write_text("A short document.")
    result = CliRunner().invoke(app, ["ask", str(tmp_path / "doc.txt"), "Who?", "--model", str(tmp_path / "m")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert (f"'{model_type}' is {kind}" if kind else f"'{model_type}' is not supported") in result.output
    assert "decoder-only attention models: llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, phi3, gemma2" in result.output


def test_a_gguf_file_of_a_state_space_model_is_refused_by_name(tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "ssm.gguf"), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ChunkKVError, match="architecture 'mamba' is a state-space model, with no attention KV cache"):
        load_profile(str(tmp_path / "ssm.gguf"))


def test_a_window_longer_than_the_context_loads_as_full_attention(tmp_path):
    """Phi-3.5's published config: sliding_window 262144, context 131072; its layers must stay compressible."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from chunkkv_cli.model import window_override

    model, _ = tiny_family_model("phi3")
    model.config.sliding_window = 262144
    model.save_pretrained(tmp_path)
    assert window_override(tmp_path) == {"sliding_window": None}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **window_override(tmp_path))
    assert not any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=loaded.config).layers)
    assert load_profile(str(tmp_path)).sliding_window is None
    model.config.sliding_window = 64  # shorter than the context: a real window, kept
    model.save_pretrained(tmp_path)
    assert window_override(tmp_path) == {}


@pytest.mark.parametrize("name", ["gemma2", "gemma3_text", "gpt_oss"])
def test_a_prefill_in_blocks_equals_one_pass_on_hybrid_models(name, prompt):
    """Blocks (issue 18's prefill) over sliding windows, soft-caps and sinks: the same tokens and caches, two targets."""
    model, _ = tiny_family_model(name)
    results = []
    for block in (None, 7):
        targets = [new_target(model, make_compressor(m, ratio=0.3, window=4)) for m in ("snapkv", "fullkv")]
        pre = prefill(model, prompt, targets, block=block)
        kept = [kept_lengths(t.cache) for t in targets]
        results.append((decode(model, targets[0].cache, pre.logits, PROMPT_LEN, 4, decoder="hf"), kept))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


class OpLog(TorchDispatchMode):
    """Every aten op run under it, counted, and the longest dimension of any tensor one took or returned."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.longest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.counts[str(func)] += 1
        shapes = [t.shape for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor) and t.dim()]
        self.longest = max([self.longest, *(max(shape) for shape in shapes)])
        return out


def hf_decode_step_ops(model, prompt, compressor) -> OpLog:
    """The ops of the third hf decode step after prefilling `prompt` with `compressor` (the same token each step)."""
    target = new_target(model, compressor)
    prefill(model, prompt, [target])
    step, token = hf_step(model, target.cache, prompt.shape[1]), torch.tensor([3])
    with torch.inference_mode():
        step(token), step(token)
        with OpLog() as log:
            step(token)
    return log


def test_an_hf_decode_step_on_a_compressed_cache_does_no_more_than_on_the_full_cache(family):
    """The H200 families bench saw the hf decoder slower on chunkkv's cache than on the full one: our part of a
    step must not be the cause. No op may run more often, and none may touch a tensor as long as the prompt
    (a mask or fallback sized by positions rather than by the kept tokens)."""
    name, model, _ = family
    prompt = torch.randint(0, 128, (1, LONG_PROMPT), generator=torch.Generator().manual_seed(6))
    full = hf_decode_step_ops(model, prompt, make_compressor("fullkv"))
    compressed = hf_decode_step_ops(model, prompt, make_compressor("chunkkv", ratio=0.1, window=4))
    assert not compressed.counts - full.counts, f"{name}: ops only the compressed cache runs"
    if name != "mistral_window":  # every layer there keeps its window: nothing is compressed
        assert full.longest > LONG_PROMPT, f"{name}: the full cache's length is visible to the check"
    assert compressed.longest < LONG_PROMPT, f"{name}: a tensor as long as the prompt in a step on the compressed cache"

@pytest.mark.parametrize("name", [f for f in FAMILY_PROFILES if f not in HYBRID])
def test_the_fast_decoder_gives_the_hf_decoders_greedy_tokens(name, prompt):
    model, _ = tiny_family_model(name)
    tokens = {}
    for decoder in ("hf", "fast"):
        target = new_target(model, make_compressor("chunkkv", ratio=0.5))
        pre = prefill(model, prompt, [target])
        tokens[decoder] = decode(model, target.cache, pre.logits, PROMPT_LEN, NEW_TOKENS, decoder=decoder)
    assert torch.equal(tokens["fast"], tokens["hf"])
