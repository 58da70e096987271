#!/usr/bin/env bash
# Packs Ray for a `run` on the GPU machine, whose image has no ray (Python 3.12, pandas and pyarrow present) and
# which reaches no package index: a `run` carries at most 64 MiB and the ray wheel is 79 MB, so the bundle leaves
# out what `batch --ray` never imports (rllib, tune, serve, train, llm, the Java jars, the dashboard's web client)
# and strips the binaries' symbol tables: about 18 MB as .tar.xz. Output in .devcarry/ (git-ignored):
#   raysite312.tar.xz  ray 2.60 and its compiled dependencies for CPython 3.12 (extract onto PYTHONPATH)
#   extra312/          requests and its dependencies (pure Python; add only if the image lacks them)
#   tokenizer/         SmolLM2's tokenizer, for random-weight models with a real tokenizer
# Then, with carry [".devcarry"]:
#   mkdir -p /tmp/rs && tar -xJf .devcarry/raysite312.tar.xz -C /tmp/rs && export PYTHONPATH=$PWD:/tmp/rs
#   python -c 'import requests' 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/.devcarry/extra312
#   python benchmarks/ray_batch.py --tokenizer .devcarry/tokenizer --out $OUT/ray_batch_h200.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TOKENIZER=${TOKENIZER:-$(ls -d "${CHUNKKV_CACHE:-$HOME/.cache/chunkkv}"/*-fp16-v2 | head -1)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
target=(--no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
$PY -m pip download -q "${target[@]}" -d "$work/ray" ray==2.60.0 msgpack jsonschema referencing rpds-py attrs \
    jsonschema-specifications protobuf
$PY -m pip download -q "${target[@]}" --implementation py -d "$work/extra" requests urllib3 certifi idna \
    charset-normalizer
mkdir -p "$work/site" .devcarry/extra312 .devcarry/tokenizer
for wheel in "$work"/ray/*.whl; do (cd "$work/site" && unzip -q -o "$wheel"); done
for wheel in "$work"/extra/*.whl; do (cd .devcarry/extra312 && unzip -q -o "$wheel"); done
rm -rf "$work"/site/ray/{rllib,jars,tune,serve,train,llm,dashboard/client}
find "$work/site" -type f \( -name '*.so*' -o -path '*core/src/ray/*' \) -print0 |
    while IFS= read -r -d '' f; do if file "$f" | grep -q ELF; then strip --strip-unneeded "$f"; fi; done
tar -C "$work/site" -cf - . | xz -T0 -9 > .devcarry/raysite312.tar.xz
cp "$TOKENIZER"/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .devcarry/tokenizer/
du -sh .devcarry
