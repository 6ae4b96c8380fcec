"""Where device sampling's time goes: `python bench/gpu/diag_sampling.py EXPORT OUT.json [cuda|cpu]`.

Per batch size (1, 8, 64 rows on CUDA, with and without CUDA graphs; 2 rows on the CPU provider
as a dry run), the mean ms of: a decode step with the host's argmax over the returned logits,
`decode_sampled` greedy and sampled (temperature 0.8, top-p 0.95), and the token-choice session
alone on a device logits value. Also writes ORT profiles of the greedy and sampled graphs' session
creation (node placement) beside OUT.json. Results: `bench/results/2026-11-30-h200-device-sampling-diag.json`.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serve.model_dir import load_model_info
from serve.runtime import RowDraw, RuntimeOptions
from serve.runtime.cuda import CudaRuntime
from serve.runtime.device_sampling import sampling_model


def timed(fn, toks: list[int], n: int = 64) -> float:
    """Mean ms of ``fn(toks) -> toks`` over ``n`` calls after 8 warm-up calls."""
    for _ in range(8):
        toks = fn(toks)
    t0 = time.perf_counter()
    for _ in range(n):
        toks = fn(toks)
    return round(1000 * (time.perf_counter() - t0) / n, 3)


def measure(rt: CudaRuntime, b: int, sampled: RowDraw, vocab: int, dev: str) -> dict:
    """The timings of one runtime over ``b`` slots (see the module docstring)."""
    slots = list(range(b))
    rng = np.random.default_rng(0)
    toks = [int(np.argmax(rt.prefill(s, list(map(int, rng.integers(100, 4000, 32)))))) for s in slots]
    logits = np.random.default_rng(1).standard_normal((b, 1, vocab)).astype(np.float32)
    lg = ort.OrtValue.ortvalue_from_numpy(logits, dev, 0)
    ds = rt._sampler
    r = {
        "host_argmax_ms": timed(lambda t: [int(x) for x in np.argmax(rt.decode(slots, t), -1)], toks),
        "device_greedy_ms": timed(
            lambda t: [x.token for x in rt.decode_sampled(slots, t, [RowDraw(greedy=True)] * b)], toks),
        "device_sampled_ms": timed(lambda t: [x.token for x in rt.decode_sampled(slots, t, [sampled] * b)],
                                   toks),
        "sampler_greedy_alone_ms": timed(
            lambda t: [x.token for x in ds.sample(lg, [RowDraw(greedy=True)] * b)], toks),
        "sampler_sampled_alone_ms": timed(lambda t: [x.token for x in ds.sample(lg, [sampled] * b)], toks),
    }
    return r


def main() -> None:
    model, out = Path(sys.argv[1]), Path(sys.argv[2])
    prov = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    dev = "cuda" if prov == "cuda" else "cpu"
    eps = ["CUDAExecutionProvider", "CPUExecutionProvider"] if prov == "cuda" else ["CPUExecutionProvider"]
    info = load_model_info(model)
    res: dict = {}
    for kind in ("greedy", "sample"):
        so = ort.SessionOptions()
        so.log_severity_level = 0
        so.enable_profiling = True
        so.profile_file_prefix = str(out.parent / f"prof_{kind}")
        s = ort.InferenceSession(sampling_model(info.vocab_size, kind).SerializeToString(), so, providers=eps)
        res[f"{kind}_providers"] = s.get_providers()
    sampled = RowDraw(greedy=False, top_p=0.95, inv_temperature=1.25, u=0.5)
    for cg in (True, False) if prov == "cuda" else (False,):
        for b in (1, 8, 64) if prov == "cuda" else (2,):
            rt = CudaRuntime(info, RuntimeOptions(provider=prov, max_batch=b, max_length=512, cuda_graph=cg,
                                                  device_sampling=True), device=dev)
            r = measure(rt, b, sampled, info.vocab_size, dev)
            res[f"cg{int(cg)}_b{b}"] = r
            print(f"cg={cg} b={b}", r, flush=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
