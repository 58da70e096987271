"""Bad and unusual inputs through the CLI: one line and an exit code each, and nothing of the user's lost.

To add a case, add a row to CASES: the issue item it covers, the command line (`{w}` is the scratch folder
that `w` fills, `{dead}` the pid of a process that has exited), a fragment the output must contain, the exit
code, and optionally `setup(w)` run first and `check(w)` run after (say, that a file is unchanged).
A non-zero exit must print exactly one line and no traceback. Model loading is patched to the tiny
random-weight model; everything before loading (profiles, config.json checks, outputs) runs for real.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from chunkkv_cli.cli import app
from tests.conftest import CharTokenizer, tiny_config

DOC = "The harbour master keeps the blue ledger. " * 6
NOTES = "my own notes, not batch output"


@dataclass
class Case:
    item: str
    args: str
    expect: str
    code: int = 2
    setup: Callable[[Path], None] | None = None
    check: Callable[[Path], bool] | None = None


def model_folder(path: Path, **overrides) -> Path:
    """A Hugging Face folder with the tiny model's config.json (weights are patched in by `loads`)."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_config(max_position_embeddings=1000, **overrides).to_json_file(path / "config.json")
    (path / "model.safetensors").write_bytes(b"placeholder")
    return path


def write_config(folder: Path, config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)


TINY_PROFILE = """name: tiny
hf_id: test/tiny
family: llama
num_layers: 2
num_attention_heads: 4
num_kv_heads: 2
head_dim: 16
hidden_size: 64
intermediate_size: 128
vocab_size: 128
max_context: 4096
rope_theta: 10000.0
rope_scaling: null
rms_norm_eps: 1.0e-5
attention_bias: false
tie_word_embeddings: false
dtype: fp32
weights: none
description: a tiny random-weight shape for bench
"""


@pytest.fixture
def w(tmp_path, model, monkeypatch):
    """The scratch folder every case's command line refers to as {w}."""
    from chunkkv_cli import model as model_module

    model_module.load_calls = 0

    def from_folder(folder, *args, **kwargs):
        model_module.load_calls += 1
        return model, CharTokenizer()

    monkeypatch.setattr(model_module, "_from_folder", from_folder)
    (tmp_path / "doc.txt").write_text(DOC)
    (tmp_path / "long.txt").write_text("word " * 400)
    (tmp_path / "utf16.txt").write_bytes(DOC.encode("utf-16"))
    (tmp_path / "notes.txt").write_text(NOTES)
    (tmp_path / "notes2.txt").write_text("line one\nline two\n")
    (tmp_path / "latin.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "latin.jsonl").write_bytes('{"context": "caf\xe9"}\n'.encode("latin-1"))
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"id": "j1", "document": "doc.txt", "question": "Who?"}) + "\n")
    (tmp_path / "tiny.yaml").write_text(TINY_PROFILE)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"context": DOC, "question": "Who?", "answers": ["harbour"]}) + "\n")
    (tmp_path / "adir.ckv").mkdir()
    model_folder(tmp_path / "model")
    model_folder(tmp_path / "pickled").joinpath("model.safetensors").unlink()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    write_config(tmp_path / "cfg-list", [1, 2])
    write_config(tmp_path / "cfg-missing", {"model_type": "llama", "num_attention_heads": 4})
    write_config(tmp_path / "cfg-zero-heads", {**tiny_config().to_dict(), "num_attention_heads": 0})
    return tmp_path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def invoke(w: Path, args: str, dead: int = 0):
    argv = [part.format(w=w, dead=dead) for part in shlex.split(args)]
    return CliRunner().invoke(app, argv)


def unchanged(name: str, text: str) -> Callable[[Path], bool]:
    return lambda w: (w / name).read_text() == text


def no_model_loaded(w: Path) -> bool:
    from chunkkv_cli import model as model_module

    return model_module.load_calls == 0


def stale_temp(name: str) -> Callable[[Path], None]:
    return lambda w: (w / f".{name}.{dead_pid()}.x1y2.tmp").write_bytes(b"left by a killed run")


def no_temp_left(w: Path) -> bool:
    return not list(w.glob(".*.tmp"))


def compress_then_break_config(w: Path) -> None:
    model_folder(w / "model2")
    assert invoke(w, "compress {w}/doc.txt -o {w}/doc.ckv --model {w}/model2 --window 8").exit_code == 0
    write_config(w / "model2", {**tiny_config().to_dict(), "num_attention_heads": 0})


def corrupt_settings(w: Path) -> None:
    (w / "ev").mkdir()
    (w / "ev/settings.json").write_text("{broken")


def run_eval_once(w: Path) -> None:
    data = w / "qa.jsonl"
    assert invoke(w, EVAL_QA).exit_code == 0
    data.write_text(json.dumps({"context": DOC, "question": "What colour?", "answers": ["blue"]}) + "\n")


ASK = "ask {w}/doc.txt Who? --model {w}/model --max-new-tokens 2 --window 8"
EVAL_QA = "eval longqa --data {w}/qa.jsonl --model {w}/model --methods fullkv --ratios 0.5 --max-new-tokens 2 --out {w}/ev"
BENCH = "bench --device cpu --model {w}/tiny.yaml --seq 64 --decode-tokens 2 --repeats 1 --reuse-layers 1 --window 8"
BATCH = "batch {w}/jobs.jsonl --model {w}/model --max-new-tokens 2 --window 8"

CASES = [
    # Data loss
    Case("1", BATCH + " -o {w}/notes.txt", "not end like batch output", check=unchanged("notes.txt", NOTES)),
    Case("1", BATCH + " -o {w}/notes2.txt", "notes2.txt:1: not a batch answer record",
         check=unchanged("notes2.txt", "line one\nline two\n")),
    Case("2", BENCH + " --out {w}/results/x.json --json", '"rows"', 0, check=lambda w: (w / "results/x.json").is_file()),
    Case("2", BENCH + " --out {w}/notes.txt/x.json", "is a file, not a folder", check=unchanged("notes.txt", NOTES)),
    # Tracebacks or silent nonsense
    Case("3", ASK.replace("{w}/model", "{w}/cfg-list"), "must be a JSON object of model settings, got list"),
    Case("3", ASK.replace("{w}/model", "{w}/cfg-missing"), "has no 'num_hidden_layers'"),
    Case("3", ASK.replace("{w}/model", "{w}/cfg-zero-heads"), "num_attention_heads must be a positive integer, got 0"),
    Case("3", "ask {w}/doc.ckv Who? --max-new-tokens 2", "num_attention_heads must be a positive integer",
         setup=compress_then_break_config),
    Case("4", "memory --model {w}/latin.yaml", "is not UTF-8 text"),
    Case("4", EVAL_QA.replace("qa.jsonl", "latin.jsonl"), "latin.jsonl is not UTF-8 text"),
    Case("4", BATCH + " -o {w}/latin.yaml", "is not UTF-8, so not batch output"),
    Case("4", ASK.replace("doc.txt", "utf16.txt") + " --json", '"answer"', 0),
    Case("5", EVAL_QA.replace("{w}/ev", "{w}/notes.txt"), "is a file, not a folder", check=unchanged("notes.txt", NOTES)),
    Case("5", EVAL_QA, "settings.json: not valid JSON", setup=corrupt_settings, check=unchanged("ev/settings.json", "{broken")),
    Case("5", EVAL_QA.replace("{w}/ev", "/proc/chunkkv-eval"), "--out: cannot create the folder"),
    Case("6", EVAL_QA, "holds a run with a different data", setup=run_eval_once),
    Case("7", ASK + " --temperature nan", "--temperature must be 0 (greedy) or a positive number, got nan"),
    Case("7", ASK + " --temperature -1", "--temperature must be 0 (greedy) or a positive number"),
    Case("7", ASK + " --top-p 2", "--top-p must be in (0, 1], got 2.0"),
    Case("7", BATCH + " -o {w}/a.jsonl --top-p 0", "--top-p must be in (0, 1]"),
    Case("8", "ask {w}/doc.txt '   ' --model {w}/model", "the question is empty"),
    Case("9", ASK.replace("doc.txt", "long.txt") + " --truncate --json", '"prompt_tokens"', 0),
    Case("10", ASK.replace("{w}/model", "{w}/pickled"), "holds pickle weights (pytorch_model.bin)", check=no_model_loaded),
    Case("11", BENCH + " --decode-tokens 0", "--decode-tokens and --repeats must be at least 1"),
    Case("11", BENCH + " --repeats 0", "--decode-tokens and --repeats must be at least 1"),
    Case("12", ASK + " --method foo", "'foo' is not one of 'chunkkv', 'snapkv'"),
    Case("12", ASK + " --ratio abc", "Invalid value for '--ratio'"),
    Case("12", BENCH + " --repeats two", "Invalid value for '--repeats'"),
    Case("12", "aks {w}/doc.txt Who?", "No such command 'aks'"),
    Case("13", "compress {w}/doc.txt -o {w}/adir.ckv --model {w}/model", "adir.ckv is a directory", check=no_model_loaded),
    Case("13", "compress {w}/doc.txt -o /proc/doc.ckv --model {w}/model", "--output: cannot write in /proc",
         check=no_model_loaded),
    Case("13", BATCH + " -o {w}/adir.ckv", "adir.ckv is a directory", check=no_model_loaded),
    Case("14", "compress {w}/doc.txt -o {w}/doc.ckv --model {w}/model --window 8", "saved", 0,
         setup=stale_temp("doc.ckv"), check=no_temp_left),
    Case("14", BATCH + " -o {w}/answers.jsonl", "1 answered", 0, setup=stale_temp("answers.jsonl"), check=no_temp_left),
    # Confusing
    Case("15", "ask {w}/doc.txt Who? --model llama3-8b", "profile llama3-8b names no local weights",
         check=no_model_loaded),
    Case("15", "compress {w}/doc.txt -o {w}/x.ckv --model llama3-8b", "names no local weights"),
    Case("16", "ask {w}/doc.txt Who? --model meta-llama/Llama-3.1-8B-Instruct", "chunkkv downloads nothing; fetch it once"),
    Case("17", ASK + " --ratio 0.01", "fewer than the 8-token observation window", 0),
    Case("19", "ask -h", "Answer a question about a long document", 0),
    Case("19", "bench --help", "[default: (llama3-8b", 0),
    Case("20", ASK + " --json", '"answer"', 0),
    Case("20", "ask {w}/doc.txt --questions {w}/notes2.txt --model {w}/model --max-new-tokens 2 --window 8 --json",
         '"answer"', 0),
]


@pytest.mark.parametrize("case", CASES, ids=[f"item{c.item}-{i}" for i, c in enumerate(CASES)])
def test_bad_input(w, case):
    if case.setup is not None:
        case.setup(w)
    result = invoke(w, case.args)
    output = result.output
    assert result.exit_code == case.code, output
    assert case.expect in output, output
    assert "Traceback" not in output
    if case.code != 0:
        assert len(output.strip().splitlines()) == 1, output
    if case.check is not None:
        assert case.check(w), output


def test_every_item_of_the_issue_has_a_case_or_a_test():
    """Items 18 (transformers), 22 (plots) and 23 (samples) are tested below, 21 (GGUF dtype) in test_embedded."""
    covered = {int(case.item) for case in CASES} | {18, 21, 22, 23}
    assert covered == set(range(1, 24))


def test_truncate_cuts_the_document_and_keeps_the_question_and_its_ending():
    from chunkkv_cli.documents import fit_to_context

    tokenizer = CharTokenizer()
    ids = fit_to_context(tokenizer, "word " * 400, "Which word?", 300, truncate=True)
    tail = tokenizer("Question: Which word?\nAnswer:")["input_ids"]
    assert len(ids) <= 300 and ids[-len(tail):] == tail


def test_model_forward_takes_the_installed_transformers_cache_argument_without_warning(model):
    import torch

    from chunkkv_cli.compress import make_compressor
    from chunkkv_cli.generate import decode, new_target, prefill

    target = new_target(model, make_compressor("chunkkv", budget=20, window=8))
    ids = torch.randint(0, 128, (1, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pre = prefill(model, ids, [target])
        decode(model, target.cache, pre.logits, 40, 3)


def test_questions_txt_holds_the_jsonl_questions_one_per_line():
    from chunkkv_cli.documents import read_questions

    samples = Path(__file__).resolve().parent.parent / "samples"
    jsonl = [json.loads(line)["question"] for line in (samples / "questions.jsonl").read_text().splitlines()]
    assert read_questions(str(samples / "questions.txt")) == jsonl


def test_bench_plot_axes_start_at_zero(tmp_path):
    pytest.importorskip("matplotlib")
    from chunkkv_cli.bench import plot_report

    def row(method, reuse, scale):
        return {"method": method, "reuse_layers": reuse, "seq": 1024, "batch_kind": "fixed", "prefill_s": 10 * scale,
                "compress_s": 0.5 * scale, "e2e_tokens_per_s": 100 * scale}  # fmt: skip

    report = {"rows": [row("fullkv", 1, 1.0), row("chunkkv", 1, 0.99), row("chunkkv", 2, 0.98)],
              "settings": {"method": "chunkkv"}, "model": "tiny", "environment": {"device": "cpu"}}  # fmt: skip
    figure = plot_report(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").is_file()
    assert [ax.get_ylim()[0] for ax in figure.axes] == [0, 0, 0]


def test_needle_heatmaps_are_one_figure_with_a_panel_per_method(tmp_path):
    pytest.importorskip("matplotlib")
    from chunkkv_cli.eval.plots import needle_heatmaps

    cells = [[1.0, 0.0], [None, 1.0]]
    grid = {"chunkkv": {"0.1": cells, "0.2": cells}, "snapkv": {"0.1": cells, "0.2": cells}, "fullkv": {"1": cells}}
    results = {"model": "tiny", "needle": {"lengths": [1024, 2048], "depths": [0.0, 1.0], "grid": grid}}
    assert needle_heatmaps(results, tmp_path) == [tmp_path / "needle.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["needle.png"]


def test_bench_table_fits_100_columns():
    from rich.console import Console

    from chunkkv_cli.commands.bench import _table

    row = {"method": "streamingllm", "reuse_layers": 2, "decoder": "compiled", "batch": 144, "prefill_s": 11.415,
           "compress_s": 0.0133, "decode_ms_per_token": 24.13, "floor_ms_per_token": 5.56, "decode_tokens_per_s": 1873,
           "peak_prefill_bytes": 19.2 * 2**30, "peak_decode_bytes": 74.9 * 2**30, "kv_bytes": 57.6 * 2**30,
           "vs_fullkv": {"decode_tokens_per_s": 9.67}, "vs_no_reuse": {"prefill": 0.9963}}  # fmt: skip
    assert Console(width=300).measure(_table(32768, "max", [row])).maximum <= 100

