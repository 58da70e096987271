"""The method interface: capabilities instead of names, routes instead of module state, strict parameters."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from chunkkv_cli import registry
from chunkkv_cli.compress import METHODS, make_compressor, methods_where
from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.generate import decode, new_target, prefill
from tests.conftest import tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "chunkkv_cli"


def _answer(model, prompt, compressor, new_tokens=6, on_layer=None):
    target = new_target(model, compressor)
    pre = prefill(model, prompt, [target], on_layer)
    return decode(model, target.cache, pre.logits, prompt.shape[1], new_tokens, recall=compressor.decode_route(target.cache))


def test_two_models_in_one_process_interleaved_each_with_its_own_method():
    """Model B's whole run happens inside model A's prefill (and A decodes between B's steps): no shared state."""
    a, b = tiny_model(), tiny_model(num_hidden_layers=3, num_key_value_heads=1)
    prompt = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    chunk = make_compressor("chunkkv", budget=40, window=8)
    cluster = make_compressor("clusterkv", budget=48, sinks=4, tokens_per_cluster=20, full_layers=1)
    alone_a, alone_b = _answer(a, prompt, chunk), _answer(b, prompt, cluster)
    inner = []

    def run_b_inside_a(layer_idx):
        if layer_idx == 1:
            inner.append(_answer(b, prompt, cluster))

    assert torch.equal(_answer(a, prompt, chunk, on_layer=run_b_inside_a), alone_a)
    assert torch.equal(inner[0], alone_b)


def test_unknown_parameter_is_refused_naming_the_parameters_the_method_takes():
    with pytest.raises(ChunkKVError, match=r"snapkv takes no parameter 'chunk_size'; it takes: ratio, budget, window"):
        make_compressor("snapkv", chunk_size=10)


def test_registry_lists_every_method_and_capabilities_drive_the_lists():
    assert list(METHODS) == registry.names()
    assert all(cls.name == name for name, cls in METHODS.items())
    assert set(methods_where(per_step=True)) <= set(methods_where(reusable=False))
    assert "fullkv" not in methods_where(evicts=True)


def _name_tests(path: Path, names: set[str]) -> list[str]:
    """`x == "snapkv"`, `x in ("fullkv", ...)` and the like: comparisons against a method's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            hits = [c.value for c in consts if isinstance(c, ast.Constant) and c.value in names]
            found += [f"{path.name}:{node.lineno} tests {hit!r}" for hit in hits]
    return found


def test_no_file_outside_a_methods_own_module_tests_its_name():
    names = set(registry.names())
    offenders = [hit for path in PACKAGE.rglob("*.py") for hit in _name_tests(path, names - {path.stem})]
    assert offenders == []
