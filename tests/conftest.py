"""Tiny random-weight models so engine tests run in seconds on CPU."""

from __future__ import annotations

import json

import pytest
import torch


def tiny_config(**overrides):
    from transformers import LlamaConfig

    params = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=4096,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def tiny_model(attn_implementation=None, **overrides):
    from transformers import AutoModelForCausalLM

    from chunkkv_cli.engine import ATTENTION_NAME

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(**overrides), attn_implementation=attn_implementation or ATTENTION_NAME
    )
    return model.eval()


@pytest.fixture(scope="session")
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def reference_model(model):
    """The same weights under plain SDPA attention, driven by transformers' own generate()."""
    ref = tiny_model("sdpa")
    ref.load_state_dict(model.state_dict())
    return ref


class CharTokenizer:
    """A byte-level stand-in tokenizer for CLI tests (no chat template, no files)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [b % 128 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


BATCH_ROWS = [
    {"id": "h1", "document": "harbour.txt", "question": "Who keeps the ledger?"},
    {"id": "m1", "document": "mill.txt", "question": "What is ground on Tuesdays?"},
    {"id": "gone", "document": "nowhere.txt", "question": "Anything?"},
    {"id": "h2", "document": "harbour.txt", "question": "Where is the ledger?", "meta": {"gold": "tower"}},
]


def write_batch_jobs(folder, extra_rows=()):
    """Two small documents and a jobs.jsonl asking about them (one job names a missing document)."""
    (folder / "harbour.txt").write_text("The harbour master keeps the blue ledger in the tower. " * 3)
    (folder / "mill.txt").write_text("The miller grinds rye on Tuesdays and oats on Fridays. " * 3)
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [*BATCH_ROWS, *extra_rows]))
    return path
