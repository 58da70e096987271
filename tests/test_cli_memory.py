"""`chunkkv memory` and `chunkkv profiles` through the CLI: JSON numbers and clean one-line errors."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from chunkkv_cli import __version__
from chunkkv_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def memory_json(*args: str) -> dict:
    result = invoke("memory", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"chunkkv {__version__}"


def test_memory_json_llama3_8b_2048():
    report = memory_json("--model", "llama3-8b", "--seq", "2048")
    assert report["paper_bytes"] == 1_073_741_824
    assert report["gqa_bytes"] == 268_435_456
    assert report["kept_tokens"] == 205
    assert report["compressed_bytes"] == 205 * 131072
    assert report["weight_bytes"] == 2 * 8_030_261_248
    assert (report["model"], report["seq"], report["batch"], report["ratio"], report["dtype"]) == (
        "llama3-8b", 2048, 1, 0.1, "fp16",
    )  # fmt: skip
    for key in ("max_batch_full", "max_batch_compressed", "max_seq_full", "max_seq_compressed"):
        assert isinstance(report[key], int) and report[key] > 0
    assert report["max_batch_compressed"] > report["max_batch_full"]
    assert report["max_seq_compressed"] > report["max_seq_full"]


def test_memory_json_32k_is_16_gib_and_4_gib():
    report = memory_json("--seq", "32k")  # default model llama3-8b
    assert report["model"] == "llama3-8b"
    assert report["paper_bytes"] == 16 * 2**30 and report["gqa_bytes"] == 4 * 2**30


def test_memory_json_budget_batch_dtype_gpu_mem():
    report = memory_json(
        "-m", "qwen2.5-7b", "--seq", "32k", "--budget", "1024", "--batch", "8", "--dtype", "bf16", "--gpu-mem", "141GB"
    )
    assert report["budget"] == 1024 and report["ratio"] is None and report["kept_tokens"] == 1024
    assert report["gqa_bytes"] == 2 * 8 * 32768 * 28 * 4 * 128 * 2
    assert report["gpu_mem_bytes"] == 141 * 10**9


def test_memory_table_shows_both_formulas_and_the_reason():
    result = invoke("memory", "--model", "llama3-8b", "--seq", "32k")
    assert result.exit_code == 0, result.output
    assert "17,179,869,184" in result.stdout and "16.00 GiB" in result.stdout
    assert "4,294,967,296" in result.stdout and "4.00 GiB" in result.stdout
    assert "grouped-query attention" in result.stdout
    assert "beyond llama3-8b's 8,192-token context" in result.stdout


def test_memory_measure_calls_the_model_module(monkeypatch):
    import chunkkv_cli.model

    calls = []

    def fake_measure(profile, seq, batch, dtype, ratio=None, budget=None):
        calls.append((profile.name, seq, batch, dtype, ratio, budget))
        return {"device": "cpu", "seq": seq, "full_bytes": 10, "compressed_bytes": 1, "note": "fake"}

    monkeypatch.setattr(chunkkv_cli.model, "measure_kv_bytes", fake_measure)
    report = memory_json("--model", "smollm2-135m", "--seq", "1k", "--measure")
    assert calls == [("smollm2-135m", 1024, 1, "fp16", 0.1, None)]
    assert report["measured"]["full_bytes"] == 10


def test_profiles_json_and_table():
    result = invoke("profiles", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["llama3-8b"]["param_count"] == 8_030_261_248
    assert rows["smollm2-135m"]["weights"] == "embedded"
    table = invoke("profiles")
    assert table.exit_code == 0 and "qwen2.5-7b" in table.stdout and "70.55 B" in table.stdout


def test_memory_help_has_examples():
    result = invoke("memory", "--help")
    assert result.exit_code == 0
    assert "chunkkv memory --model llama3-8b --seq 2048" in result.stdout


def assert_clean_error(result, *fragments: str):
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for fragment in fragments:
        assert fragment in lines[0], output


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--model", "nope"], ["unknown model 'nope'", "llama3-8b", "smollm2-135m"]),
        (["--seq", "3x"], ["--seq", "'3x'", "32k"]),
        (["--seq", "0"], ["--seq", "'0'"]),
        (["--ratio", "0"], ["--ratio must be in (0, 1]"]),
        (["--ratio", "1.5"], ["--ratio must be in (0, 1]", "1.5"]),
        (["--budget", "0"], ["--budget"]),
        (["--batch", "0"], ["--batch must be a positive", "0"]),
        (["--batch", "-1"], ["--batch must be a positive", "-1"]),
        (["--gpu-mem", "lots"], ["--gpu-mem", "'lots'", "80GB"]),
    ],
)
def test_memory_bad_input_is_a_one_line_error(args, fragments):
    assert_clean_error(invoke("memory", *args), *fragments)


def test_memory_invalid_yaml_profile(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    assert_clean_error(invoke("memory", "--model", str(path)), "invalid YAML", str(path))


def test_memory_yaml_profile_with_missing_field(tmp_path):
    path = tmp_path / "partial.yaml"
    path.write_text("name: partial\nnum_layers: 2\n")
    assert_clean_error(invoke("memory", "--model", str(path)), "missing fields", "hf_id", str(path))


def test_memory_command_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from chunkkv_cli.cli import app; "
        "r = CliRunner().invoke(app, ['memory', '--json']); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
