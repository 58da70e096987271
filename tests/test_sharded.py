"""Models whose layers accelerate places on several devices (`--device auto` with several GPUs).

On CPU there is one device: torch maps cpu:1 to cpu, so two CPU "devices" cannot be told apart. What CPU
can check is the path accelerate adds: a model dispatched by a device_map (hooks moving inputs, half the
layers offloaded to disk) answers token for token like the plain model. The split over two real devices
(GPU 0 and the CPU with one GPU; GPU 0 and GPU 1 with two) needs CUDA and is skipped without it.
"""

from __future__ import annotations

import pytest
import torch

from chunkkv_cli.compress import make_compressor
from chunkkv_cli.pipeline import answer
from chunkkv_cli.reuse import answer_question, compress_prefix
from tests.conftest import CharTokenizer, tiny_model

IDS = [(7 * i) % 120 + 3 for i in range(150)]
QUESTION = [11, 12, 13, 14]


def layer_map(first, second) -> dict:
    """The tiny model's modules: embeddings and layers 0-1 on `first`, layers 2-3, norm and lm_head on `second`."""
    return {
        "model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first, "model.layers.1": first,
        "model.layers.2": second, "model.layers.3": second, "model.norm": second, "lm_head": second,
    }  # fmt: skip


def answers(model) -> tuple[str, str]:
    """A question-aware answer (pipeline.answer) and one from a compressed prefix (reuse)."""
    compressor = make_compressor("chunkkv", ratio=0.3, window=8, chunk_size=5)
    tokenizer = CharTokenizer()
    whole = answer(model, tokenizer, IDS + QUESTION, compressor, max_new_tokens=8, reuse_layers=2)
    prefix = compress_prefix(model, IDS, compressor, reuse_layers=2)
    return whole.text, answer_question(model, tokenizer, prefix, QUESTION, max_new_tokens=8).text


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model().save_pretrained(folder)
    return folder


def test_placement_spreads_auto_over_several_gpus_only(monkeypatch):
    from chunkkv_cli import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert model_module.placement("auto") == (torch.device("cuda"), "auto")
    assert model_module.placement("cuda") == (torch.device("cuda"), {"": torch.device("cuda")})
    assert model_module.placement("cuda:1") == (torch.device("cuda:1"), {"": torch.device("cuda:1")})
    assert model_module.placement("cpu") == (torch.device("cpu"), None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert model_module.placement("auto") == (torch.device("cuda"), {"": torch.device("cuda")})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert model_module.placement("auto") == (torch.device("cpu"), None)


def test_a_dispatched_model_answers_like_the_plain_one(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from chunkkv_cli.engine import ATTENTION_NAME

    dispatched = AutoModelForCausalLM.from_pretrained(
        saved, device_map=layer_map("cpu", "disk"), offload_folder=tmp_path, attn_implementation=ATTENTION_NAME
    ).eval()
    assert hasattr(dispatched.model.layers[3], "_hf_hook") and dispatched.model.layers[3].self_attn.q_proj.weight.is_meta
    plain = tiny_model()
    assert answers(dispatched) == answers(plain)


def two_devices() -> tuple:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: two devices to split the layers over (cuda:0 and the CPU, or two GPUs)")
    return (0, 1) if torch.cuda.device_count() > 1 else (0, "cpu")


def split_model():
    """The tiny model with layers 0-1 on GPU 0 and layers 2-3 on GPU 1, or on the CPU with one GPU."""
    from accelerate import dispatch_model

    first, second = two_devices()
    # main_device="cpu" keeps CPU layers computing on the CPU instead of offloaded to the GPU
    split = dispatch_model(tiny_model(), layer_map(first, second), main_device="cpu" if second == "cpu" else None)
    assert len({p.device for p in split.parameters()} - {torch.device("meta")}) == 2
    return split


def test_layers_on_two_devices_answer_like_one_device():
    compressor = make_compressor("chunkkv", ratio=0.3, window=8, chunk_size=5)
    texts = [
        answer(model, CharTokenizer(), IDS + QUESTION, compressor, max_new_tokens=8, reuse_layers=2).text
        for model in (tiny_model(), split_model())
    ]
    assert texts[0] == texts[1]


def test_a_compressed_prefix_on_two_devices_answers_like_one_device():
    assert answers(split_model())[1] == answers(tiny_model())[1]


def test_batch_answers_on_a_split_model_from_a_compressed_document_and_question_aware(tmp_path):
    from dataclasses import replace

    from chunkkv_cli.batch import Settings, run_batch
    from chunkkv_cli.batch_runner import ModelRunner
    from chunkkv_cli.jobs import read_jobs
    from chunkkv_cli.model import Loaded
    from chunkkv_cli.profiles import load_profile

    (tmp_path / "a.md").write_text("The harbour master keeps the blue ledger. " * 8)
    (tmp_path / "jobs.jsonl").write_text('{"document": "a.md", "question": "Who?"}\n')
    jobs = read_jobs(tmp_path / "jobs.jsonl")
    loaded = Loaded(split_model(), CharTokenizer(), replace(load_profile("smollm2-135m"), max_context=600), "split")
    settings = Settings(model="tiny", ratio=0.3, window=8, max_new_tokens=4)
    for mode in (settings, replace(settings, question_aware=True)):
        summary = run_batch(jobs, tmp_path / f"{mode.question_aware}.jsonl", ModelRunner(lambda: loaded, jobs, mode), mode)
        assert summary["answered"] == 1, (tmp_path / f"{mode.question_aware}.jsonl").read_text()


def test_auto_decoder_is_hf_when_the_cache_spans_devices():
    from types import SimpleNamespace

    from chunkkv_cli.errors import ChunkKVError
    from chunkkv_cli.generate import resolve_decoder

    def cache(*devices):
        return SimpleNamespace(layers=[SimpleNamespace(keys=torch.empty(0, device=d)) for d in devices])

    gpu = torch.device("cuda")
    assert resolve_decoder("auto", gpu, cache=cache("meta", "meta")) == "compiled"
    assert resolve_decoder("auto", gpu, cache=cache("meta", "cpu")) == "hf"
    with pytest.raises(ChunkKVError, match="split: use --decoder hf"):
        resolve_decoder("fast", gpu, cache=cache("meta", "cpu"))


def test_load_model_auto_spreads_the_embedded_model_over_two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from chunkkv_cli.model import load_model

    loaded = load_model("smollm2-135m", "auto", "fp32")
    assert {p.device.index for p in loaded.model.parameters()} == {0, 1}
    one = load_model("smollm2-135m", "cuda:0", "fp32")
    compressor = make_compressor("chunkkv", ratio=0.2)
    ids = loaded.tokenizer("The lighthouse keeper wrote in the log every night. " * 40)["input_ids"]
    texts = [answer(m.model, m.tokenizer, ids, compressor, max_new_tokens=12).text for m in (loaded, one)]
    assert texts[0] == texts[1]
