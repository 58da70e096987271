"""NVIDIA kvpress on the same shape, context and ratio as `chunkkv bench`, for a side-by-side decode figure.

kvpress pins transformers < 5.3, so it runs in its own process against its own transformers:

    pip install --no-deps --target /tmp/kvsite kvpress-0.5.5-*.whl transformers-5.2.0-*.whl
    PYTHONPATH=/tmp/kvsite:benchmarks/kvpress_shims:$PWD python benchmarks/kvpress_decode.py --out kvpress.json

`kvpress_shims/` stands in for `datasets`, `cachetools` and `fire`, which kvpress imports at package import
for presses not used here (DuoAttention, LUKV); nothing in this run calls them.
The model is the profile's architecture with random weights (no tokenizer), so the pipeline's
`_forward` is called with token ids directly; its own greedy loop (`generate_answer`) is timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


class IdsTokenizer:
    """The only tokenizer call left in the timed path is decoding the answer ids."""

    model_max_length = 10**9
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids.tolist())


def build_model(profile_name: str, seq: int):
    from transformers import AutoModelForCausalLM

    from chunkkv_cli.profiles import load_profile

    config = load_profile(profile_name).to_hf_config()
    config.max_position_embeddings = seq + 1024
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.generation_config.eos_token_id = [-1]  # random weights: never stop early
    return model.eval()


def time_pipeline(pipe, press, seq: int, new_tokens: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(0, pipe.model.config.vocab_size, (1, seq), generator=gen)
    question = torch.randint(0, pipe.model.config.vocab_size, (1, 16), generator=gen)
    timings = {}
    answer = pipe.generate_answer

    def timed_answer(**kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        text = answer(**kwargs)
        torch.cuda.synchronize()
        timings["decode_s"] = time.perf_counter() - start
        return text

    pipe.generate_answer = timed_answer
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode():
        pipe._forward({"context_ids": context, "questions_ids": [question]}, max_new_tokens=new_tokens, press=press)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    pipe.generate_answer = answer
    return {
        "prefill_s": total - timings["decode_s"],
        "decode_ms_per_token": 1000 * timings["decode_s"] / new_tokens,
        "peak_bytes": torch.cuda.max_memory_allocated(),
    }


def main() -> None:
    import kvpress
    import transformers
    from kvpress import ChunkKVPress, KVPressTextGenerationPipeline, SnapKVPress

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction kept (kvpress's compression_ratio = 1 - ratio)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = build_model(args.model, args.seq)
    pipe = KVPressTextGenerationPipeline(model=model, tokenizer=IdsTokenizer())
    presses = {
        "fullkv": None,
        "chunkkv": ChunkKVPress(SnapKVPress(compression_ratio=1 - args.ratio, window_size=32), chunk_length=10),
    }
    rows = []
    for name, press in presses.items():
        time_pipeline(pipe, press, args.seq, 8)  # warm-up
        runs = [time_pipeline(pipe, press, args.seq, args.decode_tokens) for _ in range(args.repeats)]
        runs.sort(key=lambda r: r["decode_ms_per_token"])
        row = {"method": name, **runs[len(runs) // 2], "runs_ms_per_token": [r["decode_ms_per_token"] for r in runs]}
        rows.append(row)
        print(row, flush=True)
    report = {
        "kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "seq": args.seq,
        "ratio_kept": args.ratio,
        "decode_tokens": args.decode_tokens,
        "press": "ChunkKVPress(SnapKVPress(compression_ratio=1-ratio, window_size=32), chunk_length=10)",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
