#!/usr/bin/env bash
# Stage what the GPU machine lacks into .gpu/ (ignored by git), to travel one part per call:
#   ort.tar.xz   onnxruntime-gpu 1.31.1 (CUDA 13), CUDA provider pruned to sm_90 (prune_fatbin.py)
#   gguf-*.whl   the gguf reader the exporter needs
#   gguf.xz      the default model's GGUF (SmolLM2-135M-Instruct Q4_1, from `llorch models fetch`)
# packed as one tar, split into 52 MiB parts .gpu/part00.. plus .gpu/SHA256SUMS.
# Usage, from the repo root after `llorch models fetch`:  bash bench/gpu/stage.sh
set -euo pipefail
root="$(git rev-parse --show-toplevel)"; cd "$root"
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
gguf="models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { echo "missing $gguf: run 'llorch models fetch' first" >&2; exit 1; }
rm -rf .gpu && mkdir -p .gpu/build/wheel .gpu/build/payload .gpu/build/ort
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu/build/wheel onnxruntime-gpu==1.31.1 gguf==0.19.0
(cd .gpu/build/ort && unzip -q ../wheel/onnxruntime_gpu-*.whl)
lib=.gpu/build/ort/onnxruntime/capi/libonnxruntime_providers_cuda.so
python3 bench/gpu/prune_fatbin.py "$lib" "$lib.pruned" --keep 90 && mv "$lib.pruned" "$lib"
rm -f .gpu/build/ort/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar cf - -C .gpu/build/ort . | xz -6 -T0 > .gpu/build/payload/ort.tar.xz
cp .gpu/build/wheel/gguf-*.whl .gpu/build/payload/
xz -6 -T0 -c "$gguf" > .gpu/build/payload/gguf.xz
(cd .gpu/build/payload && sha256sum ort.tar.xz gguf-*.whl gguf.xz > ../../SHA256SUMS)
# members in this order: a prefix of the parts already holds onnxruntime (see device_run.sh)
tar cf - -C .gpu/build/payload ort.tar.xz "$(cd .gpu/build/payload && ls gguf-*.whl)" gguf.xz \
  | split -b 52m -d - .gpu/part
rm -rf .gpu/build
ls -la .gpu
