"""Markdown tables from `chunkkv bench --out` JSON files (what the README shows).

    python benchmarks/summarize.py benchmarks/results/*.json
"""

from __future__ import annotations

import json
import sys


def gib(n) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


def compression_share(r: dict) -> float:
    """Compression time over the prefill of the sequences it compressed: with --share-prompt one
    sequence is prefilled and its copies are compressed (clustered) one by one, so the prefill counts batch times."""
    copies = r["batch"] / r.get("prefill_batch", r["batch"])
    return r["compress_s"] / (r["prefill_s"] * copies)


def fmt_row(r: dict) -> str:
    method = r["method"] + (f" reuse {r['reuse_layers']}" if r["method"] not in ("fullkv", "clusterkv") else "")
    method += f" ({r.get('decoder', 'hf')})"
    vs_full = r.get("vs_fullkv") or {}
    vs_none = r.get("vs_no_reuse") or {}
    cells = [
        r["report_model"],
        f"{r['seq'] // 1024}k",
        method,
        str(r["batch"]),
        f"{r['prefill_s'] * 1000:.0f}",
        f"{r['compress_s'] * 1000:.1f} ({compression_share(r):.2%})",
        f"{r['decode_ms_per_token']:.1f}",
        f"{r['floor_ms_per_token']:.1f}" if r.get("floor_ms_per_token") else "",
        f"{r['decode_tokens_per_s']:.0f}",
        gib(r["peak_prefill_bytes"]),
        gib(r["peak_decode_bytes"]),
        f"{r['kv_bytes'] / 2**30:.2f}",
        f"×{vs_full['decode_tokens_per_s']:.2f}" if r["method"] != "fullkv" and vs_full else "",
        f"×{vs_none['prefill']:.4f}" if r["reuse_layers"] > 1 and vs_none else "",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | seq | method | batch | TTFT ms | compression ms (share) | decode ms/step | floor ms/step | tok/s "
    "| peak prefill GiB | peak decode GiB | KV GiB | tok/s vs fullkv | TTFT vs no reuse |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(paths: list[str]) -> None:
    print(HEADER)
    for path in paths:
        report = json.load(open(path))
        for row in report["rows"]:
            if "prefill_s" in row:
                print(fmt_row({**row, "report_model": report["model"]}))
    env = json.load(open(paths[0]))["environment"]
    print(f"\n{env['device']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}")


if __name__ == "__main__":
    main(sys.argv[1:])
