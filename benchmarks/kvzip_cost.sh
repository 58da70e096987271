#!/usr/bin/env bash
# KVzip's cost on one GPU (llama3-8b shape, random weights, bf16): the pass traced per reach, then `chunkkv bench`
# at the default (reach 0: every piece sees the whole document) and at reach 1024. Results under $1.
set -euo pipefail
out=${1:?usage: benchmarks/kvzip_cost.sh OUT_DIR}
export PYTHONPATH=$PWD
python benchmarks/kvzip_pass_trace.py --model llama3-8b --seq 32768 --reach 0,512,1024,2048 --repeats 3 --out "$out/kvzip_pass_trace_32k.json"
for reach in 0 1024; do
  python -m chunkkv_cli.cli bench --model llama3-8b --seq 8k,32k --method kvzip --ratio 0.1 --reuse-layers 1 \
    --decode-tokens 16 --repeats 3 --decoder fast -p reach=$reach --json --out "$out/kvzip_cost_reach$reach.json" > /dev/null
done
