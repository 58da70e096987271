"""Compression inside a real (tiny) transformers model: equivalence, positions, reuse, caches."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from chunkkv_cli.compress import METHODS, make_compressor
from chunkkv_cli.engine import Target, cache_argument
from chunkkv_cli.generate import cache_bytes, decode, kept_lengths, new_target, prefill

PROMPT_LEN = 157


@pytest.fixture(scope="module")
def prompt():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, PROMPT_LEN), generator=gen)


@pytest.fixture(scope="module")
def reference_tokens(reference_model, prompt):
    with torch.no_grad():
        out = reference_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    return out[:, PROMPT_LEN:]


def run(model, prompt, compressor, reuse_layers=1, new_tokens=12, record=False):
    target = new_target(model, compressor, reuse_layers, record)
    pre = prefill(model, prompt, [target])
    kept = kept_lengths(target.cache)
    tokens = decode(model, target.cache, pre.logits, prompt.shape[1], new_tokens)
    return tokens, kept, target


def test_transformers_cache_layer_api_is_what_the_engine_relies_on(model):
    cache = DynamicCache(config=model.config)
    layer = cache.layers[0]
    assert hasattr(layer, "is_initialized") and not layer.is_initialized
    k = torch.randn(1, 2, 5, 16)
    keys, _ = layer.update(k, k)
    assert torch.equal(keys, k) and layer.keys.shape[-2] == 5
    layer.keys, layer.values = k[:, :, :3], k[:, :, :3]
    assert cache.get_seq_length(0) == 3
    assert layer.get_mask_sizes(1)[0] == 4


@pytest.mark.parametrize("method", list(METHODS))
def test_budget_covering_the_prompt_reproduces_uncompressed_greedy_tokens(model, prompt, reference_tokens, method):
    tokens, kept, _ = run(model, prompt, make_compressor(method, budget=10_000, window=8))
    assert torch.equal(tokens, reference_tokens)
    assert kept == [PROMPT_LEN] * 4


def test_fullkv_reproduces_uncompressed_greedy_tokens(model, prompt, reference_tokens):
    tokens, _, _ = run(model, prompt, make_compressor("fullkv"))
    assert torch.equal(tokens, reference_tokens)


@pytest.mark.parametrize("method", ["chunkkv", "snapkv", "h2o", "streamingllm", "keydiff"])
def test_compressed_cache_holds_exactly_the_budget(model, prompt, method):
    _, kept, target = run(model, prompt, make_compressor(method, budget=40, window=8), new_tokens=1, record=True)
    assert kept == [40] * 4
    for idx in target.kept.values():
        assert idx.shape[-1] == 40


def test_pyramidkv_layers_hold_shrinking_budgets_and_decode(model, prompt):
    tokens, kept, _ = run(model, prompt, make_compressor("pyramidkv", budget=60, window=8))
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert tokens.shape == (2, 12)


def test_ratio_bytes(model, prompt):
    target = new_target(model, make_compressor("chunkkv", ratio=0.1, window=8))
    pre = prefill(model, prompt, [target])
    assert cache_bytes(target.cache) <= 0.12 * pre.full_bytes
    assert pre.full_bytes == 4 * 2 * (2 * 2 * PROMPT_LEN * 16 * 4)


def test_decode_continues_positions_from_the_uncompressed_length(model, prompt):
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            seen.append(kwargs["position_ids"][0, 0].item())
            return self.inner(**kwargs)

    target = new_target(model, make_compressor("chunkkv", budget=30, window=8))
    pre = prefill(model, prompt, [target])
    decode(Spy(model), target.cache, pre.logits, PROMPT_LEN, 4)
    assert seen == [PROMPT_LEN, PROMPT_LEN + 1, PROMPT_LEN + 2]


def test_positions_matter_after_compression(model, prompt):
    """Numbering new tokens from the kept length (transformers' default) would change the output."""
    target = new_target(model, make_compressor("chunkkv", budget=30, window=8))
    pre = prefill(model, prompt, [target])
    token = pre.logits.argmax(-1)[:, None]
    snapshot = [(l.keys.clone(), l.values.clone()) for l in target.cache.layers]
    right = model(input_ids=token, **{cache_argument(model): target.cache}, position_ids=torch.full((2, 1), PROMPT_LEN)).logits
    for layer, (k, v) in zip(target.cache.layers, snapshot):
        layer.keys, layer.values = k, v
    wrong = model(input_ids=token, **{cache_argument(model): target.cache}).logits
    assert not torch.allclose(right, wrong)


@pytest.mark.parametrize("reuse", [2, 3])
def test_reuse_layers_share_indices_within_groups(model, prompt, reuse):
    comp = make_compressor("chunkkv", budget=40, window=8)
    calls = []
    original = comp.select

    def counting_select(query, key, layer_idx, n_layers, scaling):
        calls.append(layer_idx)
        return original(query, key, layer_idx, n_layers, scaling)

    comp.select = counting_select
    _, _, target = run(model, prompt, comp, reuse_layers=reuse, new_tokens=1, record=True)
    assert calls == [layer for layer in range(4) if layer % reuse == 0]
    for layer in range(4):
        leader = layer - layer % reuse
        assert torch.equal(target.kept[layer], target.kept[leader])


def test_without_reuse_every_layer_scores(model, prompt):
    _, _, target = run(model, prompt, make_compressor("chunkkv", budget=40, window=8), new_tokens=1, record=True)
    assert not all(torch.equal(target.kept[0], target.kept[layer]) for layer in range(1, 4))


def test_one_prefill_fills_every_target_like_separate_prefills(model, prompt):
    methods = ["chunkkv", "snapkv", "fullkv"]
    together = [new_target(model, make_compressor(m, budget=50, window=8)) for m in methods]
    prefill(model, prompt, together)
    for method, target in zip(methods, together):
        alone = new_target(model, make_compressor(method, budget=50, window=8))
        prefill(model, prompt, [alone])
        for a, b in zip(target.cache.layers, alone.cache.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_multi_token_append_after_compression_is_causal(model, prompt):
    """Feeding two tokens at once after compression equals feeding them one by one."""
    def fresh():
        target = new_target(model, make_compressor("pyramidkv", budget=60, window=8))
        prefill(model, prompt, [target])
        return target.cache

    extra = torch.tensor([[5, 9], [7, 3]])
    pos = torch.tensor([[PROMPT_LEN, PROMPT_LEN + 1]] * 2)
    both = model(input_ids=extra, **{cache_argument(model): fresh()}, position_ids=pos).logits[:, -1]
    cache = fresh()
    model(input_ids=extra[:, :1], **{cache_argument(model): cache}, position_ids=pos[:, :1])
    second = model(input_ids=extra[:, 1:], **{cache_argument(model): cache}, position_ids=pos[:, 1:]).logits[:, -1]
    torch.testing.assert_close(both, second, rtol=1e-4, atol=1e-4)


def test_kept_target_record_is_cpu_and_sorted(model, prompt):
    _, _, target = run(model, prompt, make_compressor("snapkv", budget=40, window=8), new_tokens=1, record=True)
    idx = target.kept[0]
    assert idx.device.type == "cpu" and isinstance(target, Target)
    assert torch.all(idx[..., 1:] > idx[..., :-1])


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_compress_and_match_generate_when_nothing_is_dropped(family):
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from chunkkv_cli.engine import ATTENTION_NAME

    config_cls = {"mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=128, sliding_window=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION_NAME).eval()
    reference = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    reference.load_state_dict(model.state_dict())
    prompt = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(3))
    expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False)
    tokens, _, _ = run(model, prompt, make_compressor("chunkkv", budget=1000, window=8), new_tokens=6)
    assert torch.equal(tokens, expected[:, 90:])
    _, kept, _ = run(model, prompt, make_compressor("chunkkv", budget=30, window=8), new_tokens=2)
    assert kept == [30] * 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_compress_and_decode(model, prompt, dtype):
    from tests.conftest import tiny_model

    half = tiny_model().to(dtype)
    tokens, kept, target = run(half, prompt, make_compressor("chunkkv", budget=40, window=8), new_tokens=4)
    assert kept == [40] * 4 and tokens.shape == (2, 4)
    assert target.cache.layers[0].keys.dtype == dtype
