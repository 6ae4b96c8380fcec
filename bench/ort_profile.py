"""Where llorch's time goes inside ONNX Runtime, per op type, for prefill and for decode.

    python -m bench.ort_profile [MODEL_DIR] [--prompt 128] [--steps 64] [--threads 2]

Runs `serve.runtime.open_runtime` (the server's own sessions and IO binding) with ORT's profiler
on, prefills one prompt, decodes `--steps` tokens at batch 1, and prints, per op type, the
time per prefill and per decode step, plus the gap between the whole `model_run` and the
sum of its nodes (ORT's own per-run overhead). `--w8a8` as `llorch serve` takes it (default
auto: the prefill on the export's W8A8 graph, the batch-1 decode on the main graph; off: both
on the main graph). Pair with py-spy for the Python side:
`py-spy record --native -- python -m bench …`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from serve.runtime import W8A8_MODES


def summarize_trace(events: list[dict]) -> dict:
    """{"runs": [us per model_run], "ops": [{op_type: us} per run]} from an ORT profile trace."""
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    per_run: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    starts = [r["ts"] for r in runs]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        i = next((j for j in range(len(runs) - 1, -1, -1) if starts[j] <= e["ts"]), None)
        if i is not None and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
            per_run[i][op] += e["dur"]
    return {"runs": [r["dur"] for r in runs], "ops": [dict(d) for d in per_run]}


def format_breakdown(summary: dict, first: int, last: int, title: str) -> str:
    """Mean µs per run over runs [first, last) by op type, largest first."""
    runs = summary["runs"][first:last]
    if not runs:
        return f"{title}: no runs"
    n = len(runs)
    ops: dict[str, float] = defaultdict(float)
    for d in summary["ops"][first:last]:
        for k, v in d.items():
            ops[k] += v / n
    total = sum(runs) / n
    nodes = sum(ops.values())
    lines = [f"{title}: {total / 1000:.2f} ms per run (mean of {n})",
             f"  {'op type':<36}{'ms':>8}{'%':>7}"]
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {k:<36}{v / 1000:>8.3f}{100 * v / total:>6.1f}%")
    lines.append(f"  {'(between nodes: ORT per-run overhead)':<36}{(total - nodes) / 1000:>8.3f}"
                 f"{100 * (total - nodes) / total:>6.1f}%")
    return "\n".join(lines)


def profile(model_dir: Path, prompt: int, steps: int, threads: int, w8a8: str = "auto"
            ) -> tuple[dict, dict]:
    """(prefill summary, decode summary): runs [warm-up, measured] of the session that
    prefilled, and [warm-up prefill, measured prefill, decode steps…] of the main one."""
    from tokenizers import Tokenizer

    import serve.runtime.shared_kv as rt
    from bench.prompts import build_prompt, corpus_ids
    from serve.runtime import RuntimeOptions, open_runtime

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = build_prompt(corpus_ids(lambda t: tok.encode(t, add_special_tokens=False).ids), prompt)
    with tempfile.TemporaryDirectory() as tmp:
        base = rt.session_options

        def profiled(*args, **kwargs):  # the server's options, plus the profiler
            so = base(*args, **kwargs)
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "ort")
            return so

        rt.session_options = profiled
        try:
            runtime = open_runtime(model_dir, RuntimeOptions(
                threads=threads, max_length=prompt + steps + 8, w8a8=w8a8))
        finally:
            rt.session_options = base
        runtime.prefill(0, ids)  # warm-up: first-run allocations and kernel packing
        runtime.reset(0)
        logits = runtime.prefill(0, ids)
        token = int(logits.argmax())
        for _ in range(steps):
            token = int(runtime.decode([0], [token])[0].argmax())
        main = summarize_trace(json.loads(Path(runtime.session.end_profiling()).read_text()))
        batch = runtime.w8a8_session
        if batch is None:
            return main, main
        return summarize_trace(json.loads(Path(batch.end_profiling()).read_text())), main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ort_profile", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", type=Path, default=None,
                   help="model directory (default: the default model, int4)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--steps", type=int, default=64, help="decode steps (default 64)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--w8a8", default="auto", choices=W8A8_MODES,
                   help="as `llorch serve --w8a8` (default auto: prefill on the W8A8 graph)")
    args = p.parse_args(argv)
    model_dir = args.model_dir
    if model_dir is None:
        from bench.prepare import default_model_paths

        model_dir = default_model_paths()["int4"]
    pre, dec = profile(model_dir, args.prompt, args.steps, args.threads, args.w8a8)
    print(format_breakdown(pre, 1, 2, f"prefill of {args.prompt} tokens (after a warm-up one)"))
    print()
    # the main session's runs: [prefill, prefill,] decode steps; skip the first few steps
    first = len(dec["runs"]) - args.steps + min(4, args.steps // 4)
    print(format_breakdown(dec, first, len(dec["runs"]), "decode step, batch 1"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
