"""The engine thread's Python cost per row and token, beside the bare runtime step.

    python -m bench.engine_overhead [--model-dir DIR] [--streams 8 64] [--tokens 128]
        [--repeats 2] [--threads 1] [--out result.json] [--profile-streams 64]

On a GPU the model step is short and the engine's per-row Python work (sampling, detokenizing,
stop matching, events) sets the pace; on a CPU the step of a real model hides it. So by
default this runs a tiny random Llama (2 layers, hidden 64: `tests/conftest.py`'s tiny model)
with SmolLM2's real tokenizer and a 49,152-wide vocabulary (what argmax, sampling and
detokenizing scale with), exported fp32 once into `bench/.cache/engine-overhead/`.

Two measurements per stream count, on the same runtime class and batch:
- `raw`: `Runtime.decode` over `streams` slots + a host `np.argmax(logits, axis=1)`, back to
  back: what a step costs without the engine (ms per step).
- `engine`: `serve.engine.Engine` in this process, `streams` greedy requests of `--tokens`
  tokens (ignore_eos) submitted at once through `Engine.submit`, their events read on an
  asyncio loop as the routes do, the server's Prometheus observer attached: tok/s, ms per decode step, and the time the engine thread
  spends outside `Runtime.decode`/`prefill` during the decode phase per row-token
  (`overhead_us_per_row_token`, wall: includes waiting for the GIL while the event loop
  takes the step's events; `cpu_overhead_us_per_row_token`: the engine thread's own CPU
  time, which a busy machine disturbs far less): the Python cost this bench exists to shrink. The event
  loop's consumer runs in the same process and takes its share of the GIL, as in the server.

`stub`: `Engine._decode` alone over a runtime stub (no model, thread or event loop): the
per-row Python of a step, steady on a busy machine (`stub_step`).

`--profile-streams N` also writes a py-spy-free profile: cProfile of the engine thread over
one run at N streams (top functions by own time, printed and in the JSON).
Run it through the machine's benchmark lock: `flock /work/notes/bench.lock python -m ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache" / "engine-overhead"
# tests/conftest.py TINY_CONFIG: the tiny random Llama the server tests run on
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "float32",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
WORDS = ("the engine thread decodes every running stream once a step and each row pays for "
         "sampling detokenizing stop matching and an event before the next step can start").split()


def tiny_model(tokenizer_from: Path) -> Path:
    """The tiny random Llama with `tokenizer_from`'s tokenizer, exported fp32 (cached)."""
    out = CACHE / "tiny-llama-fp32"
    if (out / "llorch.json").exists():
        return out
    from safetensors.numpy import save_file

    from export.api import export_model
    from export.config import LlamaConfig

    hf = CACHE / "tiny-llama-hf"
    hf.mkdir(parents=True, exist_ok=True)
    tok_cfg = json.loads((tokenizer_from / "config.json").read_text())
    config = {**TINY_CONFIG, "vocab_size": tok_cfg["vocab_size"],
              "bos_token_id": tok_cfg.get("bos_token_id"), "eos_token_id": tok_cfg.get("eos_token_id")}
    cfg = LlamaConfig.from_hf(config)
    rng = np.random.default_rng(0)
    tensors = {name: ((1.0 + 0.1 * rng.standard_normal(shape)) if name.endswith("norm.weight")
                      else 0.08 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in cfg.expected_shapes().items()}
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer_from / f, hf / f)
    export_model(hf, out, precision="fp32", progress=False)
    return out


def prompts(tokenizer, n: int, length: int = 24) -> list[tuple[int, ...]]:
    """`n` distinct prompts of about `length` tokens (no shared prefixes past a word)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), length)]
        out.append(tuple(tokenizer.encode(f"{i} " + " ".join(words))))
    return out


def open_rt(model_dir: Path, streams: int, threads: int):
    from serve.runtime import RuntimeOptions, open_runtime
    return open_runtime(model_dir, RuntimeOptions(max_batch=streams, threads=threads,
                                                  device_sampling=False))


def raw_step(model_dir: Path, tokenizer, streams: int, steps: int, threads: int) -> dict:
    """ms per `Runtime.decode` over `streams` slots + host argmax, after a short prefill."""
    rt = open_rt(model_dir, streams, threads)
    ps = prompts(tokenizer, streams)
    ids = [int(np.argmax(rt.prefill(s, p))) for s, p in enumerate(ps)]
    slots = list(range(streams))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = rt.decode(slots, ids)
        ids = np.argmax(logits, axis=1).tolist()
        times.append(time.perf_counter() - t0)
    times = times[3:]  # ORT warms up on a new batch size
    return {"ms_per_step": round(1e3 * statistics.median(times), 3),
            "us_per_row": round(1e6 * statistics.median(times) / streams, 2)}


class Timed:
    """Wraps a runtime: wall and engine-thread CPU time spent in decode/prefill, and every
    decode call's rows."""

    def __init__(self, rt) -> None:
        self._rt = rt
        # (wall start, wall end, thread CPU start, thread CPU end, rows) of each decode call
        self.calls: list[tuple[float, float, float, float, int]] = []
        self.prefills: list[tuple[float, float, float, float]] = []

    def __getattr__(self, name):
        return getattr(self._rt, name)

    def decode(self, slots, ids):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self._rt.decode(slots, ids)
        self.calls.append((t0, time.perf_counter(), c0, time.thread_time(), len(slots)))
        return out

    def prefill(self, slot, ids):
        t0, c0 = time.perf_counter(), time.thread_time()
        out = self._rt.prefill(slot, ids)
        self.prefills.append((t0, time.perf_counter(), c0, time.thread_time()))
        return out


def engine_run(engine, timed: Timed, ps, tokens: int) -> dict:
    """One timed run: every prompt submitted at once, greedy, `tokens` tokens each."""
    from serve.events import GenerationRequest
    from serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    timed.calls.clear()
    timed.prefills.clear()

    async def one(p) -> int:
        n = 0
        async for event in engine.submit(GenerationRequest(p, params)):
            n += sum(len(c.token_ids) for c in event.choices)
        return n

    async def run() -> list[int]:
        return await asyncio.gather(*(one(p) for p in ps))

    t0 = time.perf_counter()
    counts = asyncio.run(run())
    wall = time.perf_counter() - t0
    calls = timed.calls
    # the decode phase: from the first decode call to the last one's end
    a, b = calls[0][0], calls[-1][1]
    ca, cb = calls[0][2], calls[-1][3]
    in_decode = sum(c[1] - c[0] for c in calls)
    cpu_in_decode = sum(c[3] - c[2] for c in calls)
    inside = [p for p in timed.prefills if p[0] >= a and p[1] <= b]
    in_prefill = sum(p[1] - p[0] for p in inside)
    cpu_in_prefill = sum(p[3] - p[2] for p in inside)
    rows = sum(c[4] for c in calls)
    steps = len(calls)
    return {
        "tok_s": round(sum(counts) / wall, 1), "wall_s": round(wall, 3),
        "short_streams": sum(c < tokens for c in counts),
        "decode_steps": steps, "ms_per_step": round(1e3 * (b - a) / steps, 3),
        "runtime_ms_per_step": round(1e3 * in_decode / steps, 3),
        "overhead_us_per_row_token": round(1e6 * (b - a - in_decode - in_prefill) / rows, 2),
        # the engine thread's own CPU outside the runtime: no waits for the GIL or the CPU
        # (robust on a busy machine), no event-loop work
        "cpu_overhead_us_per_row_token": round(
            1e6 * (cb - ca - cpu_in_decode - cpu_in_prefill) / rows, 2),
    }


def engine_bench(model_dir: Path, tokenizer, streams: int, tokens: int, repeats: int,
                 threads: int, profile: bool, metrics: bool = True) -> dict:
    from serve.engine import Engine

    timed = Timed(open_rt(model_dir, streams, threads))
    observer = None
    if metrics:  # the server's Prometheus hooks, as `serve.main` wires them
        from serve.metrics import Metrics
        observer = Metrics().observer("bench")
    engine = Engine(timed, tokenizer, prefix_cache_tokens=0, observer=observer)
    engine.start()
    try:
        engine_run(engine, timed, prompts(tokenizer, streams), min(tokens, 16))  # warm-up
        runs = [engine_run(engine, timed, prompts(tokenizer, streams), tokens)
                for _ in range(repeats)]
        best = sorted(runs, key=lambda r: r["overhead_us_per_row_token"])[len(runs) // 2]
        out = {**best, "all_tok_s": [r["tok_s"] for r in runs],
               "all_overhead_us": [r["overhead_us_per_row_token"] for r in runs],
               "all_cpu_overhead_us": [r["cpu_overhead_us_per_row_token"] for r in runs]}
        if profile:
            out["profile"] = profiled_run(engine, timed, prompts(tokenizer, streams), tokens)
        return out
    finally:
        engine.stop()


def profiled_run(engine, timed: Timed, ps, tokens: int, top: int = 25) -> list[str]:
    """cProfile of the engine thread over one run: the top functions by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    # the engine thread is blocked on its inbox between runs: profile it from its next step
    started = threading.Event()
    original = engine._step

    def step() -> None:
        if not started.is_set():
            started.set()
            prof.enable()
        original()

    engine._step = step
    try:
        engine_run(engine, timed, ps, tokens)
    finally:
        prof.disable()  # called on this thread: only stops what this thread enabled
        engine._step = original
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return [line for line in buf.getvalue().splitlines() if line.strip()]


def stub_step(tokenizer, streams: int, steps: int, vocab: int = 49152) -> dict:
    """The engine thread's Python for one decode step of `streams` greedy rows, with no model,
    no thread and no event loop: `Engine._decode` over a runtime stub whose logits pick the
    tokens of English prose (real detokenizing), minus the stub's own time. Deterministic
    enough for a busy machine; leaves out the event-loop hand-over the `engine` run includes."""
    from types import SimpleNamespace

    from serve.engine import Engine
    from serve.events import GenerationRequest
    from serve.sampling import SamplingParams
    from serve.sequence import Choice, Job

    text = tokenizer.encode(" ".join(WORDS) * 20, add_special_tokens=False)
    base = np.random.default_rng(0).standard_normal((streams, vocab)).astype(np.float32)

    class Stub:
        info = SimpleNamespace(max_length=10**7, vocab_size=vocab)
        n_slots = streams
        device_sampling = False
        batch_invariant = True
        step = 0

        def decode(self, slots, ids):
            out = base.copy()
            out[np.arange(len(slots)), [text[(self.step + j) % len(text)] for j in range(len(slots))]] = 100.0
            self.step += 1
            return out

        def length(self, slot):
            return 0

    stub = Stub()
    engine = Engine(stub, tokenizer, prefix_cache_tokens=0)
    params = SamplingParams(max_tokens=10**7, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        job = Job(GenerationRequest(tuple(text[:20]), params), lambda event: None, 10**7)
        c = Choice(job, 0, tokenizer)
        c.slot, c.next_token, job.admitted = i, text[0], True
        job.running.append(c)
        job.slotted.append(c)
        engine._running.append(c)
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            stub.decode(range(streams), None)
        t_stub = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            engine._decode()
        best.append((time.perf_counter() - t0 - t_stub) / (steps * streams))
    return {"us_per_row_token": round(1e6 * min(best), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", type=Path, help="an export (default: the tiny random Llama)")
    ap.add_argument("--tokenizer-from", type=Path,
                    default=Path(os.environ.get("LLORCH_MODELS", "models")) / "smollm2-135m-instruct",
                    help="HF dir whose tokenizer and vocabulary the tiny model takes")
    ap.add_argument("--streams", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    ap.add_argument("--raw-steps", type=int, default=40)
    ap.add_argument("--profile-streams", type=int, help="cProfile the engine thread at N streams")
    ap.add_argument("--no-metrics", action="store_true",
                    help="no Prometheus observer on the engine (the server always has one)")
    ap.add_argument("--stub-steps", type=int, default=100,
                    help="steps of the no-model `stub` measurement (0: none)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    from serve.tokenizer import Tokenizer

    model_dir = args.model_dir or tiny_model(args.tokenizer_from)
    tokenizer = Tokenizer.from_dir(model_dir)
    result: dict = {"model_dir": str(model_dir), "tokens": args.tokens, "threads": args.threads,
                    "metrics": not args.no_metrics, "streams": {}}
    for n in args.streams:
        if args.stub_steps:
            stub = stub_step(tokenizer, n, args.stub_steps)
            result.setdefault("stub", {})[str(n)] = stub
            print(f"{n:4d} streams: stub (Engine._decode, no model/thread/loop) "
                  f"{stub['us_per_row_token']:.1f} us/row-token", flush=True)
        raw = raw_step(model_dir, tokenizer, n, args.raw_steps, args.threads)
        eng = engine_bench(model_dir, tokenizer, n, args.tokens, args.repeats, args.threads,
                           profile=n == args.profile_streams, metrics=not args.no_metrics)
        result["streams"][str(n)] = {"raw": raw, "engine": eng}
        prof = eng.pop("profile", None)
        print(f"{n:4d} streams: raw {raw['ms_per_step']:.2f} ms/step | engine {eng['tok_s']:.0f} tok/s, "
              f"{eng['ms_per_step']:.2f} ms/step ({eng['runtime_ms_per_step']:.2f} in the runtime), "
              f"overhead {eng['overhead_us_per_row_token']:.1f} us/row-token wall "
              f"(runs {eng['all_overhead_us']}), {eng['cpu_overhead_us_per_row_token']:.1f} CPU "
              f"(runs {eng['all_cpu_overhead_us']})", flush=True)
        if prof:
            eng["profile"] = prof
            print("\n".join(prof), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
