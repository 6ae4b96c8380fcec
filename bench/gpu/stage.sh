#!/usr/bin/env bash
# Stage what the GPU machine lacks into .gpu/ (ignored by git), to travel one part per call:
#   wheels.tar   cp312 manylinux/any wheels the HTTP server and serve_e2e.py need beyond what the
#                device has (starlette, uvicorn, pydantic, openai, ...: $WHEELS below, the versions
#                of the dev venv); first in the tar, so it is whole in part00
#   ort.tar.xz   onnxruntime-gpu 1.31.1 (CUDA 13), CUDA provider pruned to sm_90 (prune_fatbin.py)
#   gguf-*.whl   the gguf reader the exporter needs
#   gguf.xz      the default model's GGUF (SmolLM2-135M-Instruct Q4_1, from `llorch models fetch`)
#   ray.tar.xz   only with --ray: ray 2.60.0 (the cp312 wheel unpacked, xz'd); its other
#                dependencies (ray[serve]'s, minus what the device has and Ray does not need at
#                run time: numpy, virtualenv, py-spy, ...) go into wheels.tar
# packed as one tar, split into at most $PART_MIB MiB parts .gpu/part00.. (as few as the payload
# needs, sized evenly) plus .gpu/SHA256SUMS.
# Usage, from the repo root after `llorch models fetch`:  bash bench/gpu/stage.sh [--ray]
# (GGUF=path: another copy of the GGUF, e.g. /work/main/models/.cache/...)
set -euo pipefail
root="$(git rev-parse --show-toplevel)"; cd "$root"
ex="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$ex")"
grep -qxF '/.gpu/' "$ex" 2>/dev/null || echo '/.gpu/' >> "$ex"
gguf="${GGUF:-models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf}"
ray=0; [ "${1:-}" = --ray ] && ray=1
[ -f "$gguf" ] || { echo "missing $gguf: run 'llorch models fetch' first" >&2; exit 1; }
# the server's and serve_e2e.py's dependencies (openai 3.x talks through httpx2/httpcore2/truststore;
# llguidance, a manylinux_2_31 wheel, for structured outputs since #11)
WHEELS="starlette==1.10.0 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 anyio==4.16.0 sniffio==1.3.1
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 httpx==0.28.1
  httpcore==1.0.9 certifi==2026.10.19.post1 idna==3.20 jiter==0.19.0 pydantic==2.14.4
  pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  prometheus-client==0.26.0 jinja2==3.1.6 markupsafe==3.0.4 tqdm==4.70.1 llguidance==1.9.1"
PART_MIB=${PART_MIB:-56}
rm -rf .gpu && mkdir -p .gpu/build/wheel .gpu/build/wheels .gpu/build/payload .gpu/build/ort
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu/build/wheel onnxruntime-gpu==1.31.1 gguf==0.19.0
# shellcheck disable=SC2086  # one requirement a word
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .gpu/build/wheels $WHEELS
n=$(ls .gpu/build/wheels/*.whl | wc -l); want=$(echo $WHEELS | wc -w)
[ "$n" -eq "$want" ] || { echo "got $n wheels for $want requirements" >&2; exit 1; }
if [ "$ray" = 1 ]; then
  # ray[serve] with its dependencies; a dependency already among $WHEELS keeps $WHEELS' version
  # (one version of each, or `pip install` stops), the ones Ray needs only for runtime_env /
  # profiling, and numpy (the device's own is used), stay behind
  mkdir -p .gpu/build/ray .gpu/build/raydeps
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d .gpu/build/raydeps 'ray[serve]==2.60.0'
  norm() { basename "$1" | cut -d- -f1 | tr 'A-Z-.' 'a-z__'; }
  have=" $(for w in .gpu/build/wheels/*.whl; do norm "$w"; done | tr '\n' ' ') "
  for w in .gpu/build/raydeps/*.whl; do
    n=$(norm "$w")
    case " numpy virtualenv py_spy distlib python_discovery platformdirs ray " in *" $n "*) continue;; esac
    case "$have" in *" $n "*) continue;; esac
    cp "$w" .gpu/build/wheels/
  done
  (cd .gpu/build/ray && unzip -q ../raydeps/ray-2.60.0-*.whl)
  tar cf - -C .gpu/build/ray . | xz -6 -T0 > .gpu/build/payload/ray.tar.xz
fi
tar cf .gpu/build/payload/wheels.tar -C .gpu/build/wheels .
(cd .gpu/build/ort && unzip -q ../wheel/onnxruntime_gpu-*.whl)
lib=.gpu/build/ort/onnxruntime/capi/libonnxruntime_providers_cuda.so
python3 bench/gpu/prune_fatbin.py "$lib" "$lib.pruned" --keep 90 && mv "$lib.pruned" "$lib"
rm -f .gpu/build/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar cf - -C .gpu/build/ort . | xz -6 -T0 > .gpu/build/payload/ort.tar.xz
cp .gpu/build/wheel/gguf-*.whl .gpu/build/payload/
xz -6 -T0 -c "$gguf" > .gpu/build/payload/gguf.xz
# members in this order: a prefix of the parts already holds the wheels, then Ray, then
# onnxruntime (see device_run.sh); as few parts of at most $PART_MIB MiB as the payload needs,
# of even size
members=(wheels.tar); [ "$ray" = 1 ] && members+=(ray.tar.xz)
members+=(ort.tar.xz "$(cd .gpu/build/payload && ls gguf-*.whl)" gguf.xz)
(cd .gpu/build/payload && sha256sum "${members[@]}" > ../../SHA256SUMS)
tar cf .gpu/build/payload.tar -C .gpu/build/payload "${members[@]}"
total=$(stat -c %s .gpu/build/payload.tar); cap=$((PART_MIB * 1048576))
parts=$(( (total + cap - 1) / cap )); size=$(( (total + parts - 1) / parts ))
split -b "$size" -d .gpu/build/payload.tar .gpu/part
python3 - .gpu/build/payload.tar "$size" <<'PY'
import sys, tarfile
size = int(sys.argv[2])
for m in tarfile.open(sys.argv[1]):  # the first part by which each member is whole
    end = m.offset_data + m.size
    print(f"{m.name:28s} {m.size / 2**20:7.1f} MiB  whole from part{(end - 1) // size:02d}")
PY
rm -rf .gpu/build
ls -la .gpu
