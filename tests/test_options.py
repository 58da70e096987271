"""The options objects (checked once, torch-free) and the one answer type every path returns."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from chunkkv_cli.errors import ChunkKVError
from chunkkv_cli.options import Compression, Generation, ModelSpec
from tests.conftest import CharTokenizer


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Compression(method="nope"), "unknown method 'nope'"),
        (lambda: Compression(ratio=1.5), "--ratio must be in (0, 1]"),
        (lambda: Compression(budget=0), "--budget must be a positive number"),
        (lambda: Compression(window=0), "--window must be at least 1"),
        (lambda: Compression(reuse_layers=0), "--reuse-layers must be at least 1"),
        (lambda: Generation(max_new_tokens=0), "--max-new-tokens must be at least 1"),
        (lambda: Generation(decoder="turbo"), "--decoder must be one of auto, hf, fast, compiled"),
        (lambda: Compression(method="snapkv", offload="cpu").compressor(), "--offload is for methods"),
        (lambda: Compression(params=("reach",)), "--param takes KEY=VALUE"),
        (lambda: Compression(method="kvzip", params=("reach=far",)).compressor(), "kvzip: reach must be of type int"),
        (lambda: Compression(method="snapkv", params=("reach=9",)).compressor(), "snapkv takes no parameter 'reach'"),
    ],
)
def test_bad_options_fail_in_one_line(make, fragment):
    with pytest.raises(ChunkKVError) as err:
        make()
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_compression_builds_the_method_and_other_methods_at_the_same_settings():
    options = Compression("chunkkv", budget=64, window=8, chunk_size=4, offload="cpu")
    chunk = Compression("chunkkv", budget=64, window=8, chunk_size=4).compressor()
    assert (chunk.name, chunk.budget, chunk.window, chunk.chunk_size) == ("chunkkv", 64, 8, 4)
    assert options.compressor("clusterkv").offload == "cpu" and options.compressor("snapkv").window == 8
    assert ModelSpec().model == "smollm2-135m"


def test_method_parameters_reach_the_method_typed_and_only_that_method():
    options = Compression("kvzip", window=8, params=("reach=64", "heads=each", "uniform_share=0.25", "chunk_size=3"))
    kvzip = options.compressor()
    assert (kvzip.reach, kvzip.heads, kvzip.uniform_share, kvzip.chunk_size, kvzip.window) == (64, "each", 0.25, 3, 8)
    assert options.compressor("chunkkv").window == 8  # another method at the same settings ignores kvzip's own
    assert options.settings()["params"] == {"reach": "64", "heads": "each", "uniform_share": "0.25", "chunk_size": "3"}


def test_options_import_no_torch():
    code = "import sys, chunkkv_cli.options; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_answer_path_returns_one_answer_type(model):
    from chunkkv_cli.compress import make_compressor
    from chunkkv_cli.pipeline import answer
    from chunkkv_cli.result import Answer
    from chunkkv_cli.reuse import answer_question, compress_prefix

    ids = torch.randint(3, 100, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    compressor = make_compressor("snapkv", budget=40, window=8)
    whole = answer(model, CharTokenizer(), ids + [5, 6], compressor, max_new_tokens=4)
    cached = answer_question(model, CharTokenizer(), compress_prefix(model, ids, compressor), [5, 6], max_new_tokens=4)
    for result in (whole, cached):
        assert isinstance(result, Answer) and result.kept_per_layer == [40] * 4 and result.kept_tokens == 40
        assert len(result.token_ids) <= result.new_tokens <= 4
        assert "token_ids" not in result.as_dict() and set(result.as_dict()) >= {"text", "kept_kv_bytes"}
