"""Timing harness: prefill (TTFT), compression, decode and memory, with and without layer-wise index reuse."""

from __future__ import annotations

import datetime
import gc
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from chunkkv_cli.compress import METHODS
from chunkkv_cli.generate import cache_bytes, decode, kept_lengths, make_step, new_target, prefill, synchronize
from chunkkv_cli.options import Compression
from chunkkv_cli.pipeline import recall_state
from chunkkv_cli.registry import REFERENCE


@dataclass(frozen=True)
class Case:
    """One row of a bench table."""

    method: str
    reuse_layers: int
    batch: int | str  # an int, or "max": the largest batch that fits
    seq: int
    decoder: str = "hf"

    @property
    def label(self) -> str:
        reuse = f", reuse {self.reuse_layers}" if self.method != REFERENCE else ""
        return f"{self.method}{reuse} ({self.decoder})"


def plan_cases(method: str, seqs: list[int], reuse: list[int], batches: list, decoders=("hf",)) -> list[Case]:
    """For every length, batch and decoder: the fullkv baseline, the no-reuse row, then each reuse row."""
    reuse_rows = [1] + sorted({r for r in reuse if r != 1}) if METHODS[method].caps.evicts else [1]
    cases = []
    for seq in seqs:
        for batch in batches:
            for decoder in decoders:
                cases.append(Case(REFERENCE, 1, batch, seq, decoder))
                if method != REFERENCE:
                    cases += [Case(method, r, batch, seq, decoder) for r in reuse_rows]
    return cases


def environment(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
        "host_cpus": torch.get_num_threads(),
    }


def copy_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Device memory bandwidth in bytes/s, measured: a copy reads and writes `n_bytes` each."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    synchronize(device)
    return 2 * 5 * n_bytes / (time.perf_counter() - start)


class PeakMemory:
    """Peak GPU memory allocated inside a `with` block (None on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)


def random_prompt(model, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    return ids.to(next(model.parameters()).device)


@torch.inference_mode()
def measure_once(model, ids, compressor, reuse_layers: int, decode_tokens: int, replicate: int = 1, decoder="hf") -> dict:
    """One prefill, then `decode_tokens` timed decode steps; `replicate` copies the cache to a larger batch first.

    The decoder's setup (static buffers, CUDA graph capture, compilation) is timed apart from the steps
    and counted in the end-to-end figures. ClusterKV's clustering counts as its compression time.
    """
    device = ids.device
    release_memory(device)
    target = new_target(model, compressor, reuse_layers)
    with PeakMemory(device) as prefill_mem:
        pre = prefill(model, ids, [target])
    if replicate > 1:
        for layer in target.cache.layers:
            layer.batch_repeat_interleave(replicate)
        pre.logits = pre.logits.repeat_interleave(replicate, dim=0)
    recall = recall_state(compressor, target.cache)
    kept = kept_lengths(target.cache)
    with PeakMemory(device) as decode_mem:
        answer, setup_seconds = timed_decode(model, target.cache, pre, ids.shape[1], decode_tokens, decoder, recall)
    answer.kept_per_layer, answer.kept_tokens = kept, sum(kept) / len(kept)
    answer.full_kv_bytes = pre.full_bytes * replicate
    row = row_fields(answer, setup_seconds, ids.shape[0] * replicate, decode_tokens, prefill_mem.peak, decode_mem.peak, recall)
    return {**row, "pass_s": pre.pass_seconds}


def timed_decode(model, cache, pre, prompt_len: int, decode_tokens: int, decoder: str, recall):
    """The measured run as a `result.Answer` (no text: the prompt is random) and the decoder's setup seconds."""
    from chunkkv_cli.result import Answer

    device = pre.logits.device
    kv_bytes = cache_bytes(cache)  # on the device (clusterkv --offload cpu has moved its clustered part)
    compress_s = pre.compress_seconds + (recall.seconds if recall is not None else 0.0)
    synchronize(device)
    start = time.perf_counter()
    step = make_step(model, cache, prompt_len, decode_tokens + 2, decoder, recall)
    step(pre.logits.argmax(-1))  # the first step builds (and on CUDA captures) the decoder
    synchronize(device)
    setup_seconds = time.perf_counter() - start
    tokens = decode(model, None, pre.logits, prompt_len + 1, decode_tokens + 1, step=step)
    synchronize(device)
    decode_seconds = time.perf_counter() - start - setup_seconds
    answer = Answer(text="", prompt_tokens=prompt_len, kept_tokens=0.0, full_kv_bytes=pre.full_bytes,
                    kept_kv_bytes=kv_bytes, prefill_seconds=pre.seconds, compress_seconds=compress_s,
                    decode_seconds=decode_seconds, new_tokens=decode_tokens, token_ids=tokens[0].tolist())  # fmt: skip
    return answer, setup_seconds


def row_fields(answer, setup_seconds: float, batch: int, decode_tokens: int, peak_prefill, peak_decode, recall) -> dict:
    """A bench row's timing and memory fields, from the measured run's `Answer`."""
    e2e = answer.prefill_seconds + setup_seconds + answer.decode_seconds
    full = answer.full_kv_bytes
    return {
        "prefill_s": answer.prefill_seconds,
        "compress_s": answer.compress_seconds,
        "decoder_setup_s": setup_seconds,
        "decode_ms_per_token": 1000 * answer.decode_seconds / decode_tokens,
        "decode_tokens_per_s": batch * decode_tokens / answer.decode_seconds,
        "e2e_s": e2e,
        "e2e_tokens_per_s": batch * decode_tokens / e2e,
        "peak_prefill_bytes": peak_prefill,
        "peak_decode_bytes": peak_decode,
        "kv_bytes": answer.kept_kv_bytes,
        "kv_read_bytes": answer.kept_kv_bytes if recall is None else full * min(1.0, recall.budget / answer.prompt_tokens),
        "full_kv_bytes": full,
    }


def release_memory(device: torch.device) -> None:
    """Free what earlier runs left: a fast decoder's buffers sit in reference cycles until collected."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bandwidth_floor_ms(model, row: dict, bandwidth: float | None) -> float | None:
    """Milliseconds a decode step needs just to read the weights and the attended cache once."""
    if not bandwidth or "kv_read_bytes" not in row:
        return None
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1000 * (weights + row["kv_read_bytes"]) / bandwidth


def median_of(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: (statistics.median(r[k] for r in runs) if runs[0][k] is not None else None) for k in keys}


def measure_case(model, case: Case, compression: Compression, decode_tokens: int, repeats: int, replicate: int = 1) -> dict:
    """Median over `repeats` runs after one warm-up run, of `case.method` at `compression`'s settings."""
    compressor = compression.compressor(case.method)
    batch = 1 if replicate > 1 else case.batch
    ids = random_prompt(model, batch, case.seq)
    first = measure_once(model, ids, compressor, case.reuse_layers, decode_tokens, replicate, case.decoder)
    runs = [
        measure_once(model, ids, compressor, case.reuse_layers, decode_tokens, replicate, case.decoder)
        for _ in range(repeats)
    ]
    result = median_of(runs)
    result["runs"] = {k: [r[k] for r in runs] for k in ("prefill_s", "pass_s", "compress_s", "decoder_setup_s", "decode_ms_per_token")}
    result["first_decoder_setup_s"] = first["decoder_setup_s"]  # the one-time cost (compilation), absent from medians
    result["kept_tokens"] = compressor.kept_tokens(case.seq)
    return result


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def replicated(model, cache, batch: int):
    """A new cache holding `batch` copies of a one-sequence cache."""
    from transformers import DynamicCache

    from chunkkv_cli.engine import store_layer

    copy = DynamicCache(config=model.config)
    for idx, layer in enumerate(cache.layers):
        store_layer(copy, idx, layer.keys.repeat_interleave(batch, 0), layer.values.repeat_interleave(batch, 0))
    return copy


def decode_fits(model, cache, logits, seq: int, batch: int, steps: int, decoder: str = "hf", compressor=None) -> bool:
    """Whether `batch` copies of `cache` can decode `steps` tokens without running out of memory."""
    big = None
    try:
        big = replicated(model, cache, batch)
        recall = recall_state(compressor, big) if compressor is not None else None
        decode(model, big, logits.repeat_interleave(batch, 0), seq, steps + 1, decoder=decoder, recall=recall)
        return True
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        return False
    finally:
        del big
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def find_max_batch(model, case: Case, compression: Compression, steps: int, limit: int) -> int:
    """Largest batch of `case.seq`-token sequences whose caches decode `steps` tokens together.

    One sequence is prefilled (and compressed); its cache is replicated for each candidate batch.
    """
    compressor = compression.compressor(case.method)
    target = new_target(model, compressor, case.reuse_layers)
    pre = prefill(model, random_prompt(model, 1, case.seq), [target])
    try:
        fits = lambda b: decode_fits(model, target.cache, pre.logits, case.seq, b, steps, case.decoder, compressor)  # noqa: E731
        return search_max_batch(fits, limit)
    finally:
        del target
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def search_max_batch(try_batch: Callable[[int], bool], limit: int = 4096) -> int:
    """Largest batch for which `try_batch` succeeds: doubling, then bisection. 0 if even 1 fails."""
    if not try_batch(1):
        return 0
    good, bad = 1, None
    while bad is None and good < limit:
        candidate = min(good * 2, limit)
        if try_batch(candidate):
            good = candidate
        else:
            bad = candidate
    if bad is None:
        return good
    while bad - good > 1:
        middle = (good + bad) // 2
        if try_batch(middle):
            good = middle
        else:
            bad = middle
    return good


def add_ratios(rows: list[dict]) -> None:
    """Each row against the fullkv and no-reuse rows of its length, batch kind and decoder, and against hf."""
    for row in rows:
        group = [r for r in rows if r["seq"] == row["seq"] and r["batch_kind"] == row["batch_kind"]]
        same = [r for r in group if r.get("decoder", "hf") == row.get("decoder", "hf")]
        full = next((r for r in same if r["method"] == REFERENCE), None)
        no_reuse = next((r for r in same if r["method"] == row["method"] and r["reuse_layers"] == 1), None)
        hf_twin = next((r for r in group if r.get("decoder", "hf") == "hf" and r["method"] == row["method"]
                        and r["reuse_layers"] == row["reuse_layers"]), None)
        row["vs_fullkv"] = _ratios(row, full)
        row["vs_no_reuse"] = _ratios(row, no_reuse) if row["method"] != REFERENCE else None
        row["vs_hf_decoder"] = _ratios(row, hf_twin) if row.get("decoder", "hf") != "hf" else None


def _ratios(row: dict, base: dict | None) -> dict | None:
    if base is None:
        return None
    return {
        "prefill": row["prefill_s"] / base["prefill_s"],
        "decode_ms_per_token": row["decode_ms_per_token"] / base["decode_ms_per_token"],
        "decode_tokens_per_s": row["decode_tokens_per_s"] / base["decode_tokens_per_s"],
        "e2e_latency": row["e2e_s"] / base["e2e_s"],
        "e2e_throughput": row["e2e_tokens_per_s"] / base["e2e_tokens_per_s"],
        "kv_bytes": row["kv_bytes"] / base["kv_bytes"],
        "batch": (row["batch"] / base["batch"]) if base["batch"] else None,
    }


def run_bench(
    model,
    cases: list[Case],
    compression: Compression,
    decode_tokens: int,
    repeats: int,
    max_batch_limit: int = 4096,
    on_case: Callable[[Case], None] | None = None,
    share_prompt: bool = False,
) -> list[dict]:
    """Measure every case; rows carry medians and ratios to their fullkv and no-reuse rows.

    share_prompt: fixed batches prefill one sequence and copy its cache to the batch (prefill figures
    are then for one sequence), for decode timing at batches whose prefill would not fit.
    """
    rows, found = [], {}
    device = next(model.parameters()).device
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else None
    for case in cases:
        if on_case is not None:
            on_case(case)
        batch, replicate = case.batch, 1
        if share_prompt and case.batch != "max" and case.batch > 1:
            replicate = case.batch
        if case.batch == "max":
            key = (case.method, case.seq, case.decoder)  # reuse does not change the cache size
            if key not in found:
                found[key] = find_max_batch(model, case, compression, min(decode_tokens, 32), max_batch_limit)
            batch = replicate = found[key]
        row = {"method": case.method, "reuse_layers": case.reuse_layers, "seq": case.seq, "batch": batch,
               "batch_kind": "max" if case.batch == "max" else "fixed", "decoder": case.decoder,
               "prefill_batch": 1 if replicate > 1 else batch}
        if batch:
            row.update(measure_with_fallback(model, case, compression, decode_tokens, repeats, replicate))
            row["batch"] = row.pop("batch_used", batch)
            row["floor_ms_per_token"] = bandwidth_floor_ms(model, row, bandwidth)
        rows.append(row)
    add_ratios([r for r in rows if "prefill_s" in r])
    return rows


def measure_with_fallback(model, case, compression, decode_tokens, repeats, replicate) -> dict:
    """Measure; at a searched batch, step down 5 % at a time if the longer timed decode runs out of memory."""
    while True:
        try:
            result = measure_case(model, case, compression, decode_tokens, repeats, replicate)
            result["batch_used"] = replicate if case.batch == "max" else case.batch
            return result
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err) or replicate <= 1 or case.batch != "max":
                raise
            replicate = max(1, int(replicate * 0.95))
            torch.cuda.empty_cache()


def plot_report(report: dict, path):
    """Compression time, TTFT and end-to-end throughput against reuse group size, one line per prompt length.

    Every y-axis starts at zero, so a 1 % difference looks like one. Returns the (closed) figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "prefill_s" in r and r["batch_kind"] == "fixed" and r.get("decoder", "hf") == "hf"]
    panels = [
        ("compress_s", 1000, "compression time (ms, all layers)"),
        ("prefill_s", 1, "TTFT: prefill incl. compression (s)"),
        ("e2e_tokens_per_s", 1, "throughput: new tokens / end-to-end s"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for seq in sorted({r["seq"] for r in rows}):
        method_rows = sorted((r for r in rows if r["seq"] == seq and r["method"] != REFERENCE), key=lambda r: r["reuse_layers"])
        full = next((r for r in rows if r["seq"] == seq and r["method"] == REFERENCE), None)
        reuse = [r["reuse_layers"] for r in method_rows]
        color = None
        for ax, (key, scale, title) in zip(axes, panels):
            line = ax.plot(reuse, [scale * r[key] for r in method_rows], marker="o", color=color, label=f"{seq} tokens")[0]
            color = line.get_color()
            if full and key != "compress_s":
                ax.axhline(scale * full[key], color=color, linestyle="--", linewidth=1)
            ax.set(title=title, xlabel="reuse layers", xticks=reuse)
    for ax in axes:
        ax.set_ylim(bottom=0)
    axes[0].legend()
    method = report["settings"]["method"]
    fig.suptitle(f"{method} vs fullkv (dashed) · {report['model']} on {report['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig
