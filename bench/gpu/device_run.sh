#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, once per device call (see README.md):
# keeps the carried part, unpacks what the parts so far hold, then does what that allows:
#   onnxruntime-gpu present -> installs it to /root/site and runs smoke_cuda.py (once)
#   the GGUF present        -> runs bench_cuda.py on the default model
# Results go to $OUT (smoke.json, results.json, log.txt).
set -uo pipefail
stage=/root/stage; site=/root/site
mkdir -p "$stage"
cp .gpu/part* .gpu/SHA256SUMS "$stage"/ 2>/dev/null
repo="$PWD"
cd "$stage"
cat part* 2>/dev/null | tar xf - 2>/dev/null   # a prefix of the parts: what is whole unpacks
ok() { (cd "$stage" && grep -E " $1\$" SHA256SUMS | sha256sum -c --status 2>/dev/null); }
if [ ! -d "$site/onnxruntime" ] && ok ort.tar.xz; then
  mkdir -p "$site" && tar xJf ort.tar.xz -C "$site" \
    && python3 -m pip install -q --no-index --no-deps --target "$site" gguf-*.whl
fi
cd "$repo"
nv=$(python3 -c "import nvidia, glob; p = list(nvidia.__path__)[0]; print(':'.join(sorted(glob.glob(p + '/*/lib') + glob.glob(p + '/cu13/lib'))))" 2>/dev/null)
export LD_LIBRARY_PATH="${nv}:${LD_LIBRARY_PATH:-}" PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ls -la "$stage"
if [ -d "$site/onnxruntime" ] && [ ! -f "$stage/smoke.done" ]; then
  python3 bench/gpu/smoke_cuda.py --out "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" | tail -40
  touch "$stage/smoke.done"
fi
if ok gguf.xz; then
  [ -f "$stage/model.gguf" ] || xz -dc "$stage/gguf.xz" > "$stage/model.gguf"
  python3 bench/gpu/bench_cuda.py --gguf "$stage/model.gguf" --work /root/work \
    --out "$OUT/results.json" 2>&1 | tee "$OUT/log.txt" | tail -60
fi
