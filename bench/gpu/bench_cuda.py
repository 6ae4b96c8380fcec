"""The default model on ONNX Runtime's CUDA provider: parity with the CPU fp32 export, then speed.

    python bench/gpu/bench_cuda.py --gguf models/.cache/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --work /tmp/llorch-gpu --out results.json

Stages (the JSON is rewritten after each, so a late failure keeps the earlier numbers):
  exports   cpu fp32 (the reference), cuda fp16, cuda int4, each straight from the GGUF
  reference greedy tokens + first logits of 4 chat prompts on the CPU provider (fp32 export)
  parity    each cuda export through CudaRuntime: same greedy tokens? logits within tolerance?
            the 4 prompts decoded as one batch give the same tokens as alone?
  speed     batch-1 decode tok/s; TTFT for 1000/4000-token prompts (one prefill call, and in
            512-token chunks as the server does); aggregate decode tok/s at 1/8/32/64/128 streams
            (one Runtime.decode call over all streams per step, host argmax included), and
            beside it the token choice on the device (greedy; temperature 0.8 + top-p 0.95
            against the host Sampler with the same settings)
  graph     the same decode numbers with CUDA graph capture (enable_cuda_graph), or its error

``--provider cpu --device cpu`` runs every stage on the CPU (a dry run for CI machines).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from greedy import chat_ids, eos_ids, greedy  # noqa: E402
from staging import run_stage  # noqa: E402

FP16_REL_TOL = 0.02  # |Δ first logits| / max |logit| against the fp32 export


class Report:
    def __init__(self, path: Path | None):
        self.path, self.data = path, {}

    def stage(self, name: str, fn, *args, **kwargs):
        return run_stage(self, name, fn, *args, **kwargs)

    def save(self) -> None:
        if self.path:
            self.path.write_text(json.dumps(self.data, indent=1, default=float))


def environment() -> dict:
    import onnxruntime as ort

    env = {"python": platform.python_version(), "onnxruntime": ort.__version__,
           "providers": ort.get_available_providers(), "host": platform.node()}
    try:
        env["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        env["gpu"] = f"nvidia-smi unavailable: {e}"
    return env


def exports(gguf: Path, work: Path) -> dict:
    from export.api import export_model

    out = {}
    for name, target, precision in (("cpu-fp32", "cpu", "fp32"), ("cuda-fp16", "cuda", "fp16"),
                                    ("cuda-int4", "cuda", "int4")):
        s = export_model(gguf, work / name, precision=precision, target=target, force=True,
                         progress=False)
        out[name] = {"seconds": s.seconds, "mib": s.bytes_written / 2**20}
    return out


def reference(work: Path, n_tokens: int) -> dict:
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(work / "cpu-fp32", RuntimeOptions(provider="cpu", max_length=1024))
    ids = chat_ids(work / "cpu-fp32")
    res = [greedy(rt, p, n_tokens, set(eos_ids(work / "cpu-fp32"))) for p in ids]
    np.save(work / "ref-logits0.npy", np.stack([r[1] for r in res]))
    return {"ids": ids, "tokens": [r[0] for r in res]}


def open_vocab(model: Path) -> int:
    from serve.model_dir import load_model_info

    return load_model_info(model).vocab_size


def runtime(model: Path, args, **kw):
    from serve.model_dir import load_model_info
    from serve.runtime import RuntimeOptions
    from serve.runtime.cuda import CudaRuntime

    return CudaRuntime(load_model_info(model), RuntimeOptions(provider=args.provider, **kw),
                       device=args.device)


def parity(model: Path, ref: dict, work: Path, args, n_tokens: int) -> dict:
    from serve.tokenizer import Tokenizer

    rt = runtime(model, args, max_batch=len(ref["ids"]), max_length=1024)
    eos = set(eos_ids(model))
    res = [greedy(rt, p, n_tokens, eos, slot=j) for j, p in enumerate(ref["ids"])]
    want0 = np.load(work / "ref-logits0.npy")
    got0 = np.stack([r[1] for r in res])
    diff = float(np.abs(got0 - want0).max())
    # the same prompts as one batch: prefill each slot, then decode all together
    batched = [[] for _ in ref["ids"]]
    logits = {}
    for j, p in enumerate(ref["ids"]):
        rt.reset(j)
        logits[j] = rt.prefill(j, p)
    live = list(range(len(ref["ids"])))
    for _ in range(n_tokens):
        toks = [int(np.argmax(logits[j])) for j in live]
        for j, t in zip(live, toks, strict=False):
            batched[j].append(t)
        live_next = [j for j, t in zip(live, toks, strict=False) if t not in eos]
        if not live_next:
            break
        out = rt.decode(live_next, [batched[j][-1] for j in live_next])
        logits = dict(zip(live_next, out, strict=False))
        live = live_next
    tok = Tokenizer.from_dir(model)
    return {
        "greedy_equal_fp32": [r[0] == t for r, t in zip(res, ref["tokens"], strict=False)],
        "first_token_agreement": float(np.mean([r[0][:1] == t[:1] for r, t in
                                                zip(res, ref["tokens"], strict=False)])),
        "logits0_max_abs_diff": diff,
        "logits0_rel_diff": diff / float(np.abs(want0).max()),
        "logits0_within_fp16_tolerance": diff / float(np.abs(want0).max()) <= FP16_REL_TOL,
        "batched_equals_alone": [b == r[0] for b, r in zip(batched, res, strict=False)],
        "answer_0": tok.decode(res[0][0]),
    }


def _attempt(out: dict, key: str, fn) -> None:
    """out[key] = fn(), or the error: one failed measurement must not lose the others."""
    try:
        out[key] = fn()
    except Exception as e:  # noqa: BLE001 - recorded
        out[key] = {"error": f"{type(e).__name__}: {e}"[:600]}


def speed(model: Path, args, *, cuda_graph: bool = False) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {}
    rt = runtime(model, args, max_batch=1, max_length=4608, cuda_graph=cuda_graph)

    def decode_b1() -> dict:
        rt.reset(0)
        logits = rt.prefill(0, list(map(int, rng.integers(100, 40000, 32))))
        for _ in range(16):  # warm-up (and graph capture)
            logits = rt.decode([0], [int(np.argmax(logits))])[0]
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            logits = rt.decode([0], [int(np.argmax(logits))])[0]
        dt = time.perf_counter() - t0
        return {"tok_s": args.decode_steps / dt, "ms_per_token": 1000 * dt / args.decode_steps,
                "steps": args.decode_steps}

    def ttft(n: int, chunk: int | None) -> dict:
        ids = list(map(int, rng.integers(100, 40000, n)))
        step = chunk or n
        times = []
        for _ in range(2):  # the first pass warms up this shape class
            rt.reset(0)
            t0 = time.perf_counter()
            for i in range(0, n, step):
                last = rt.prefill(0, ids[i:i + step])
            np.argmax(last)
            times.append(time.perf_counter() - t0)
        return {"ms": 1000 * times[-1], "prefill_tok_s": n / times[-1], "first_pass_ms":
                1000 * times[0]}

    _attempt(out, "decode_b1", decode_b1)
    if not cuda_graph:
        for n in args.ttft:
            _attempt(out, f"ttft_{n}_one_call", lambda n=n: ttft(n, None))
            _attempt(out, f"ttft_{n}_chunked_512", lambda n=n: ttft(n, 512))
    rt = None  # free the KV buffers before the batched runtimes allocate theirs

    def aggregate(streams: int) -> dict:
        """Decode steps over ``streams`` slots; the token choice four ways: argmax of the logits
        on the host (the engine's greedy path without device sampling: the top-level figures),
        the sampling graph's greedy on the device, the host Sampler (temperature 0.8, top-p
        0.95) and the same settings on the device (`decode_sampled`, a seeded uniform a row)."""
        from serve.runtime import RowDraw
        from serve.sampling import Sampler, SamplingParams

        sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
        prompts = [list(map(int, rng.integers(100, 40000, 64))) for _ in range(streams)]

        def steps(device: bool, choose) -> dict:
            rt = runtime(model, args, max_batch=streams, max_length=512, cuda_graph=cuda_graph,
                         device_sampling=device)
            slots = list(range(streams))
            toks = [int(np.argmax(rt.prefill(s, p))) for s, p in zip(slots, prompts, strict=True)]
            for _ in range(8):  # warm-up (and graph capture)
                toks = choose(rt, slots, toks)
            t0 = time.perf_counter()
            for _ in range(args.agg_steps):
                toks = choose(rt, slots, toks)
            dt = time.perf_counter() - t0
            return {"tok_s": streams * args.agg_steps / dt, "ms_per_step": 1000 * dt / args.agg_steps}

        def host_argmax(rt, slots, toks):
            return [int(t) for t in np.argmax(rt.decode(slots, toks), axis=-1)]

        def device_greedy(rt, slots, toks):
            return [r.token for r in rt.decode_sampled(slots, toks, [RowDraw(greedy=True)] * len(slots))]

        samplers = [Sampler(sampled, seed_offset=j) for j in range(streams)]

        def host_sampled(rt, slots, toks):
            return [s.sample(row).token for s, row in zip(samplers, rt.decode(slots, toks), strict=True)]

        def device_sampled(rt, slots, toks):
            return [r.token for r in rt.decode_sampled(slots, toks, [s.row_draw() for s in samplers])]

        out = steps(False, host_argmax)
        out["logits_bytes_per_step"] = streams * 4 * open_vocab(model)
        for name, device, fn in (("device_greedy", True, device_greedy),
                                 ("host_sampled", False, host_sampled),
                                 ("device_sampled", True, device_sampled)):
            _attempt(out, name, lambda d=device, f=fn: steps(d, f))
        for name in ("device_greedy", "device_sampled"):
            base = out if name == "device_greedy" else out.get("host_sampled", {})
            if "tok_s" in out.get(name, {}) and "tok_s" in base:
                out[f"{name}_over_host"] = out[name]["tok_s"] / base["tok_s"]
        return out

    agg: dict = {}
    for streams in args.streams:
        _attempt(agg, str(streams), lambda s=streams: aggregate(s))
    out["aggregate_decode"] = agg
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llorch-gpu"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--provider", default="cuda")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per parity prompt")
    ap.add_argument("--decode-steps", type=int, default=256)
    ap.add_argument("--agg-steps", type=int, default=128)
    ap.add_argument("--ttft", default="1000,4000")
    ap.add_argument("--streams", default="1,8,32,64,128")
    ap.add_argument("--skip-export", action="store_true")
    args = ap.parse_args()
    args.ttft = [int(x) for x in args.ttft.split(",") if x]
    args.streams = [int(x) for x in args.streams.split(",") if x]
    import onnxruntime as ort

    if args.device == "cuda" and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, where present
        except Exception as e:  # noqa: BLE001 - LD_LIBRARY_PATH may still provide them
            print(f"preload_dlls: {e}", file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out)
    rep.data["command"] = " ".join(sys.argv)
    rep.stage("environment", environment)
    if not args.skip_export:
        rep.stage("exports", exports, args.gguf, args.work)
    ref = rep.stage("reference_cpu_fp32", reference, args.work, args.tokens)
    for name in ("cuda-fp16", "cuda-int4"):
        model = args.work / name
        if ref is not None:
            rep.stage(f"parity/{name}", parity, model, ref, args.work, args, args.tokens)
        rep.stage(f"speed/{name}", speed, model, args)
        rep.stage(f"speed_cuda_graph/{name}", speed, model, args, cuda_graph=True)
    print(json.dumps(rep.data, indent=1, default=float))


if __name__ == "__main__":
    main()
