#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, once per device call (see README.md):
# keeps the carried part, unpacks what the parts so far hold, then does what that allows:
#   wheels.tar present      -> installs the server's wheels to /root/site (once)
#   onnxruntime-gpu present -> installs it to /root/site and runs smoke_cuda.py (once)
#   the GGUF present        -> runs bench_cuda.py on the default model, then serve_e2e.py (the
#                              HTTP server + openai client) on its cuda-fp16 export
# Results go to $OUT (smoke.json, results.json, log.txt, serve_e2e.json, server.log, e2e_log.txt).
#
#   bash bench/gpu/device_run.sh              the above
#   bash bench/gpu/device_run.sh bench        the above without serve_e2e.py
#   bash bench/gpu/device_run.sh e2e [ARGS]   only serve_e2e.py (ARGS go to it, e.g. --quick);
#                                             on a warm machine that already has the parts and
#                                             installs it needs no carry (installs what is
#                                             whole but missing first, like every call)
#   bash bench/gpu/device_run.sh scale [ARGS] only scale_e2e.py (`--replicas` on Ray Serve, needs
#                                             a `stage.sh --ray` staging; ARGS go to it)
set -uo pipefail
mode=${1:-all}; [ $# -gt 0 ] && shift
case "$mode" in all|bench|e2e|scale) ;;
  *) echo "usage: $0 [all|bench|e2e [serve_e2e args]|scale [scale_e2e args]]" >&2; exit 2;; esac
home=${GPU_HOME:-/root}  # GPU_HOME: only to rehearse this script elsewhere
stage=$home/stage; site=$home/site; work=$home/work
mkdir -p "$stage"
# a part of another staging (other SHA256SUMS) would make the parts kept here unreadable
if [ -f .gpu/SHA256SUMS ] && ! cmp -s .gpu/SHA256SUMS "$stage/SHA256SUMS"; then rm -f "$stage"/part*; fi
cp .gpu/part* .gpu/SHA256SUMS "$stage"/ 2>/dev/null
repo="$PWD"
cd "$stage"
cat part* 2>/dev/null | tar xf - 2>/dev/null   # a prefix of the parts: what is whole unpacks
ok() { (cd "$stage" && grep -E " $1\$" SHA256SUMS | sha256sum -c --status 2>/dev/null); }
if [ ! -f "$site/.wheels.done" ] && ok wheels.tar; then
  # pure-Python / cp312 wheels into the same target; top-level names never clash with
  # onnxruntime's, and an existing $site/bin (console scripts) is only warned about and kept
  rm -rf wheels && mkdir -p wheels "$site" && tar xf wheels.tar -C wheels \
    && python3 -m pip install -q --no-index --no-deps --target "$site" wheels/*.whl \
    && touch "$site/.wheels.done"
fi
if [ ! -d "$site/ray" ] && ok ray.tar.xz; then   # stage.sh --ray: the unpacked ray wheel
  mkdir -p "$site" && tar xJf ray.tar.xz -C "$site"
fi
if [ ! -d "$site/onnxruntime" ] && ok ort.tar.xz; then
  mkdir -p "$site" && tar xJf ort.tar.xz -C "$site" \
    && python3 -m pip install -q --no-index --no-deps --target "$site" gguf-*.whl
fi
cd "$repo"
nv=$(python3 -c "import nvidia, glob; p = list(nvidia.__path__)[0]; print(':'.join(sorted(glob.glob(p + '/*/lib') + glob.glob(p + '/cu13/lib'))))" 2>/dev/null)
export LD_LIBRARY_PATH="${nv}:${LD_LIBRARY_PATH:-}" PYTHONPATH="$site:$repo" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
ls -la "$stage"
gguf_ready() { ok gguf.xz && { [ -f "$stage/model.gguf" ] || xz -dc "$stage/gguf.xz" > "$stage/model.gguf"; }; }
if [ "$mode" != e2e ] && [ "$mode" != scale ]; then
  if [ -d "$site/onnxruntime" ] && [ ! -f "$stage/smoke.done" ]; then
    python3 bench/gpu/smoke_cuda.py --out "$OUT/smoke.json" 2>&1 | tee "$OUT/smoke.log" | tail -40
    touch "$stage/smoke.done"
  fi
  if gguf_ready; then
    python3 bench/gpu/bench_cuda.py --gguf "$stage/model.gguf" --work "$work" \
      --out "$OUT/results.json" 2>&1 | tee "$OUT/log.txt" | tail -60
  fi
fi
if [ "$mode" != bench ]; then
  script=serve_e2e; [ "$mode" = scale ] && script=scale_e2e
  missing=""
  [ -f "$site/.wheels.done" ] || missing+=" the server's wheels (wheels.tar, part00);"
  [ -d "$site/onnxruntime" ] || missing+=" onnxruntime-gpu (ort.tar.xz);"
  [ "$mode" != scale ] || [ -d "$site/ray" ] || missing+=" ray (ray.tar.xz: stage.sh --ray);"
  gg=()
  if gguf_ready; then gg=(--gguf "$stage/model.gguf"); fi
  [ -f "$work/cuda-fp16/llorch.json" ] || [ ${#gg[@]} -gt 0 ] \
    || missing+=" a cuda-fp16 export or the GGUF (gguf.xz, the last part);"
  if [ -n "$missing" ]; then
    echo "$script.py not run: missing$missing"
  elif [ "$mode" = scale ]; then
    python3 bench/gpu/scale_e2e.py --model-dir "$work/cuda-fp16" ${gg[@]+"${gg[@]}"} \
      --provider cuda --out "$OUT/scale.json" "$@" 2>&1 | tee "$OUT/scale_log.txt" | tail -40
    for f in "$OUT"/*replicas_*.log; do [ -f "$f" ] && tail -c 4000000 "$f" > "$f.t" && mv "$f.t" "$f"; done
  else
    # bench_cuda.py's cuda-fp16 export when present, else serve_e2e.py exports the GGUF there
    python3 bench/gpu/serve_e2e.py --model-dir "$work/cuda-fp16" ${gg[@]+"${gg[@]}"} \
      --provider cuda --out "$OUT/serve_e2e.json" --server-log "$OUT/server.log" "$@" 2>&1 \
      | tee "$OUT/e2e_log.txt" | tail -40
  fi
fi
