"""Which attention kernel GroupQueryAttention runs, and what a batch-1 step costs with each
(issue 18: batch-1 decode; `diag_ramp.py` found cuDNN's SDPA + a reduction kernel per layer).

For each value of the CUDA provider option ``sdpa_kernel`` (ORT's attention-backend bit mask;
unset = ORT's choice) a `CudaRuntime` with CUDA graphs decodes one sequence (40 prompt
tokens): the median captured step (µs, `decode_sampled`, greedy on the device) over 300
steps, the greedy tokens of the first 32 steps (they should not change), and the kernels of
one step (count, µs, the attention ones by name: `diag_ramp._trace`).

    python bench/gpu/diag_attention.py --model-dir /root/work/cuda-fp16 --out attn.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def variant(model_dir: str, sdpa: str | None) -> dict:
    import serve.runtime.cuda as cuda_mod
    from bench.gpu.diag_ramp import _summary, _trace
    from serve.runtime import RowDraw, RuntimeOptions, open_runtime

    real = cuda_mod.cuda_provider_options

    def options(**kw):
        opts = real(**kw)
        if sdpa is not None:
            opts["sdpa_kernel"] = sdpa
        return opts

    cuda_mod.cuda_provider_options = options
    try:
        rt = open_runtime(model_dir, RuntimeOptions(provider="cuda", max_batch=8,
                                                    max_length=4608, cuda_graph=True))
    finally:
        cuda_mod.cuda_provider_options = real
    rt.prefill(0, list(range(100, 140)))
    tok, tokens, times = 5, [], []
    for i in range(332):
        t0 = time.perf_counter()
        tok = rt.decode_sampled([0], [tok], [RowDraw(greedy=True)])[0].token
        times.append(time.perf_counter() - t0)
        if i < 32:
            tokens.append(tok)
    state = {"tok": tok}

    def step():
        state["tok"] = rt.decode_sampled([0], [state["tok"]], [RowDraw(greedy=True)])[0].token

    summary = _summary(_trace(step, 20), 20)
    attn = [k for k in summary["by_kernel"] if any(w in k["name"].lower() for w in
                                                    ("sdpa", "flash", "attention", "fmha",
                                                     "softmax", "reduction", "lean", "xqa"))]
    return {"sdpa_kernel": sdpa, "step_us_median": round(1e6 * statistics.median(times[32:]), 1),
            "tokens": tokens, "kernels_per_step": summary["kernels_per_call"],
            "kernel_us_per_step": summary["kernel_us_per_call"], "attention_kernels": attn}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--values", nargs="+", default=["default", "1", "2", "4", "8", "16"])
    ap.add_argument("--one", help="run this value alone and print its JSON (a child process: "
                    "ORT keeps its attention options per process)")
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(variant(a.model_dir, None if a.one == "default" else a.one)))
        return
    import subprocess

    res = []
    for v in a.values:
        p = subprocess.run([sys.executable, __file__, "--model-dir", a.model_dir, "--one", v],
                           capture_output=True, text=True, timeout=300)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        r = json.loads(line[-1][7:]) if line else {"sdpa_kernel": v,
                                                    "error": p.stderr[-600:]}
        res.append(r)
        print(json.dumps({k: r.get(k) for k in ("sdpa_kernel", "step_us_median",
                                                   "kernels_per_step", "kernel_us_per_step",
                                                   "error")}),
              [(k["name"][:60], k["per_call"], k["us_per_call"]) for k in r.get("attention_kernels", [])],
              flush=True)
        if a.out:
            a.out.write_text(json.dumps(res, indent=1))
    base = res[0].get("tokens")
    print("same tokens as default:", [r.get("tokens") == base for r in res])


if __name__ == "__main__":
    main()
