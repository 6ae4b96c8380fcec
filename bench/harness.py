"""`python -m bench`: prepare inputs, run every selected peer in a worker process of its own,
write `<out>/<date>-<machine>.json`, `.md` and `.png`.

```
 prepare (default model, GenAI builder dir, optimum dir) ─► prompts (same ids for everyone)
   ─► for each entry: python -m bench.worker job.json result.json   (thread env, own RSS)
   ─► llorch export timings ─► results JSON ─► markdown table + PNG plot
```
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.config import BenchConfig
from bench.machine import code_state, load_average, machine_info
from bench.merge import merge_rounds
from bench.prepare import (
    CACHE,
    default_model_paths,
    ensure_builder_int4,
    ensure_int4_down_proj_level0,
    ensure_int4_symmetric_lm4,
    ensure_optimum_fp32,
)
from bench.proc import busy_cores, cpu_busy_seconds, run_child, thread_env
from bench.prompts import PromptPool, corpus_ids
from bench.suite import ENTRIES, Entry, groups, is_1b, select

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for_quiet(max_cores: float, timeout: float) -> float | None:
    """Wait until the machine's CPU use over 3 s is below `max_cores` CPUs (at most `timeout`
    seconds); returns the last reading."""
    deadline = time.time() + timeout
    while True:
        busy = busy_cores(3.0)
        if busy is None or busy < max_cores or time.time() > deadline:
            return busy
        log(f"   machine busy ({busy:.2f} CPUs in use ≥ {max_cores}): waiting…")
        time.sleep(5)


def prepare_models(entries: list[Entry], cfg: BenchConfig, log_dir: Path) -> tuple[dict, dict]:
    """Paths of every input the selected entries need, and the prepare report."""
    paths: dict[str, Path | None] = dict(default_model_paths())
    prepare: dict = {}
    needed = {e.model for e in entries}
    if "builder-int4" in needed:
        path, reason, secs = ensure_builder_int4(paths["hf"], log_dir / "genai-builder.log",
                                                 cfg.threads)
        paths["builder-int4"] = path
        prepare["genai-builder-int4"] = {"path": str(path) if path else None, "reason": reason,
                                         "build_s": secs}
    if "int4-l0" in needed:
        path, secs = ensure_int4_down_proj_level0(paths["hf"])
        paths["int4-l0"] = path
        prepare["int4-l0"] = {"path": str(path), "export_s": secs}
    if "int4-sym-lm4" in needed:
        path, secs = ensure_int4_symmetric_lm4(paths["hf"])
        paths["int4-sym-lm4"] = path
        prepare["int4-sym-lm4"] = {"path": str(path), "export_s": secs}
    if "optimum-fp32" in needed:
        path, reason, secs = ensure_optimum_fp32(paths["hf"], log_dir / "optimum-export.log",
                                                 cfg.threads)
        paths["optimum-fp32"] = path
        prepare["optimum-fp32"] = {"path": str(path) if path else None, "reason": reason,
                                   "build_s": secs}
    if any(m.startswith("1b-") for m in needed):
        from bench.model_1b import ensure_1b_models
        from export.default_model import models_root

        log("building the 1B-class model and its exports (once; see bench.model_1b)…")
        paths_1b, report_1b = ensure_1b_models(models_root(), paths["hf"], log_dir, cfg.threads)
        paths.update(paths_1b)
        prepare.update(report_1b)
    return paths, prepare


def entry_config(entry: Entry, cfg: BenchConfig) -> BenchConfig:
    """The counts an entry runs with: the 1B-class rows have their own (`for_1b`)."""
    return cfg.for_1b() if is_1b(entry) else cfg


def one_b_figures(entries: list[Entry], paths: dict, cfg: BenchConfig) -> dict:
    """Memory bandwidth and each 1B export's weight bytes per token (the physical limit)."""
    from bench.bandwidth import BandwidthError, measure_bandwidth
    from bench.weight_bytes import weight_bytes

    out: dict = {"weight_bytes": {}}
    try:
        out["bandwidth"] = measure_bandwidth(1024, threads=cfg.threads)
    except BandwidthError as exc:
        out["bandwidth"] = {"status": "error", "reason": str(exc)}
    for e in entries:
        if is_1b(e) and paths.get(e.model) and e.model not in out["weight_bytes"]:
            out["weight_bytes"][e.model] = weight_bytes(Path(paths[e.model]))
    return out


def make_prompts(int4_dir: Path, cfgs: Sequence[BenchConfig]) -> dict:
    """Every prompt the run needs, disjoint (see `bench.prompts`), the same for every peer:
    enough for each of `cfgs` (the run's counts and, with 1B rows, `for_1b`'s).

    prompts[n]: one prompt per run (warm-up + measured) of length n; stream_prompts[r][s]:
    stream s of concurrency round r (warm-up rounds first); rss_prompts: one per slot.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(int4_dir / "tokenizer.json"))
    ids = corpus_ids(lambda text: tok.encode(text, add_special_tokens=False).ids)
    pool = PromptPool(ids)
    lengths = sorted({n for c in cfgs for n in (*c.ttft_lengths, *c.decode_lengths)})
    cfg = cfgs[0]
    stream_prompt = {c.stream_prompt for c in cfgs}
    if len(stream_prompt) > 1:
        raise ValueError(f"configs disagree on the stream prompt length: {stream_prompt}")
    return {
        "prompts": {str(n): pool.take_many(n, max(c.warmup + c.runs(n) for c in cfgs))
                    for n in lengths},
        "stream_prompts": [pool.take_many(cfg.stream_prompt, max(max(c.concurrency) for c in cfgs))
                           for _ in range(max(c.warmup + c.stream_rounds for c in cfgs))],
        "rss_prompts": pool.take_many(cfg.rss_prompt, cfg.rss_slots),
        "corpus_tokens": len(ids),
        "prompt_tokens_used": pool.used,
    }


def run_entry(entry: Entry, cfg: BenchConfig, paths: dict, prepare: dict, prompts: dict,
              work: Path, log_dir: Path, wait_idle: float | None, wait_timeout: float) -> dict:
    model = paths.get(entry.model)
    args = {**entry.args, "model_dir": str(model) if model else "",
            "int4_dir": str(paths.get("int4") or "")}  # its tokenizer, for chat prompts
    reason = prepare.get(entry.model.replace("builder-int4", "genai-builder-int4"), {}).get("reason")
    if model is None:
        args["skip_reason"] = reason or f"{entry.model} input unavailable"
    cfg = entry_config(entry, cfg)
    job = {"key": entry.key, "peer": entry.peer, "args": args, "config": cfg.to_dict(),
           "log_dir": str(log_dir), **prompts}
    job_file, out_file = work / f"{entry.key}.job.json", work / f"{entry.key}.result.json"
    job_file.write_text(json.dumps(job))
    log(f"== {entry.key}: {entry.label}")
    idle = wait_for_quiet(wait_idle, wait_timeout) if wait_idle is not None else None
    load_before = load_average()
    code = code_state(REPO)["sources_sha"]
    busy0 = cpu_busy_seconds()
    res = run_child([sys.executable, "-m", "bench.worker", str(job_file), str(out_file)],
                    timeout=cfg.peer_timeout, env=thread_env(cfg.threads),
                    log=log_dir / f"{entry.key}.log", cwd=REPO)
    busy1 = cpu_busy_seconds()
    if out_file.is_file():
        result = json.loads(out_file.read_text())
    else:
        why = "timed out" if res.timed_out else exit_reason(res.returncode)
        result = {"key": entry.key, "status": "error", "reason": f"{why}; see {log_dir}/{entry.key}.log"}
    if "skip_reason" in args and result.get("status") == "skipped":
        result["reason"] = args["skip_reason"]
    # CPUs' worth of work by *other* processes while this entry ran (machine busy - ours)
    foreign = None
    if busy0 is not None and busy1 is not None and res.wall_s > 0:
        foreign = max(0.0, (busy1 - busy0 - res.cpu_s) / res.wall_s)
    result.update(label=entry.label, group=entry.group, peer=entry.peer, baseline=entry.baseline,
                  model=entry.model,
                  load_before=load_before, load_after=load_average(), busy_before=idle,
                  foreign_cpus=foreign, worker_cpu_s=res.cpu_s, code=code)
    status = result["status"]
    log(f"   {status}" + (f": {result.get('reason')}" if status != "ok" else
                          f" in {result.get('wall_s', 0):.0f} s")
        + (f"; other processes used {foreign:.2f} CPUs meanwhile" if foreign is not None else ""))
    return result


def exit_reason(code: int) -> str:
    if code >= 0:
        return f"worker exited with {code}"
    name = signal.Signals(-code).name
    if name == "SIGILL":  # e.g. a -march=native build using AMX that this VM does not enable
        return ("worker killed by SIGILL: the peer's native code used an instruction this CPU "
                "refuses (rebuild it for this CPU)")
    return f"worker killed by {name}"


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = (f"{results['date'][:10]}-{results['machine']['tag']}"
            + ("-1b" if results.get("only_1b") else "")
            + ("-quick" if results["config"]["quick"] else ""))
    files = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    tmp = files["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(files["json"])
    files["md"].write_text(report.render_markdown(results))
    png = None if results.get("only_1b") else report.plot(results, out_dir / f"{stem}.png")
    if png:
        files["png"] = png
    return files


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke test, not a measurement")
    p.add_argument("--only", default=None,
                   help=f"comma-separated groups ({', '.join(groups())}) or entry keys "
                   f"({', '.join(e.key for e in ENTRIES)}); default: everything")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results directory")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for every engine (default 2)")
    p.add_argument("--wait-idle", type=float, default=None, metavar="CPUS",
                   help="before each entry, wait until the machine uses fewer than CPUS CPUs "
                   "(measured over 3 s), e.g. 0.3")
    p.add_argument("--wait-timeout", type=float, default=600,
                   help="seconds --wait-idle waits at most per entry (then runs anyway)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole entry list this many times, interleaved, and pool the runs "
                   "(evens out a shared host's slow spells; default 1)")
    p.add_argument("--update", type=Path, default=None, metavar="RESULTS.json",
                   help="rerun the --only entries of an earlier run with its counts and replace "
                   "them in that file (each marked with its rerun time); rewrites its .md/.png")
    p.add_argument("--list", action="store_true", help="list the entries and exit")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for e in ENTRIES:
            print(f"{e.key:<22} {e.group:<13} {e.label}")
        print(f"{'export':<22} {'export':<13} llorch export time and peak RSS")
        return 0
    try:
        entries, with_export = select(args.only.split(",") if args.only else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    now = dt.datetime.now().isoformat(timespec="seconds")
    if args.update:
        # rerun some entries of an earlier run (same counts), e.g. ones another process disturbed
        results = json.loads(args.update.read_text())
        cfg = BenchConfig.from_dict(results["config"])
        results.setdefault("reruns", []).append(
            {"date": now, "entries": [e.key for e in entries], "export": with_export,
             "rounds": args.rounds, "code": code_state(REPO)})
        args.out = args.update.parent
    else:
        cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
        if args.threads != cfg.threads:
            from dataclasses import replace

            cfg = replace(cfg, threads=args.threads)
        results = {"date": now, "machine": machine_info(), "config": cfg.to_dict(),
                   "load": {"start": load_average()}, "entries": {}, "rounds": args.rounds,
                   "code": code_state(REPO)}
    CACHE.mkdir(parents=True, exist_ok=True)
    log_dir = CACHE / "logs"
    log_dir.mkdir(exist_ok=True)
    log("preparing models…")
    paths, prepare = prepare_models(entries, cfg, log_dir)
    results.setdefault("prepare", {}).update(prepare)
    results["paths"] = {k: str(v) if v else None for k, v in paths.items()}
    if any(is_1b(e) for e in entries):
        log("== memory bandwidth and weight bytes per token (1B rows)")
        figs, one_b = one_b_figures(entries, paths, cfg), results.setdefault("one_b", {})
        one_b.setdefault("weight_bytes", {}).update(figs["weight_bytes"])
        # every run's triad kept; the limit uses the best (STREAM's convention: the machine's
        # bandwidth is what it reaches when others leave it alone)
        runs = one_b.setdefault("bandwidth_runs", []) + [figs["bandwidth"]]
        one_b["bandwidth_runs"] = runs
        one_b["bandwidth"] = max((r for r in runs if "triad_gbps" in r),
                                 key=lambda r: r["triad_gbps"], default=figs["bandwidth"])
        results["config_1b"] = cfg.for_1b().to_dict()
    if not args.update:  # a 1B-only run writes a results file of its own (…-1b.json)
        results["only_1b"] = bool(entries) and all(is_1b(e) for e in entries)
    cfgs = {json.dumps(c.to_dict(), sort_keys=True): c
            for c in [cfg] + [entry_config(e, cfg) for e in entries]}
    prompts = make_prompts(paths["int4"], list(cfgs.values()))
    results["corpus_tokens"] = prompts.pop("corpus_tokens")
    results["prompt_tokens_used"] = prompts.pop("prompt_tokens_used")
    per_round: dict[str, list[dict]] = {e.key: [] for e in entries}
    with tempfile.TemporaryDirectory(prefix="llorch-bench-") as tmp:
        for r in range(args.rounds):
            if args.rounds > 1:
                log(f"---- round {r + 1} of {args.rounds}")
            for entry in entries:
                per_round[entry.key].append(run_entry(entry, cfg, paths, prepare, prompts,
                                                      Path(tmp), log_dir, args.wait_idle,
                                                      args.wait_timeout))
    for key, rounds in per_round.items():
        result = rounds[0] if len(rounds) == 1 else merge_rounds(rounds)
        if args.update:
            result["rerun"] = now
        results["entries"][key] = result
    if with_export:
        from bench.export_bench import export_figures

        log("== export")
        if args.wait_idle is not None:
            wait_for_quiet(args.wait_idle, args.wait_timeout)
        results["export"] = export_figures({"hf": paths["hf"], "gguf": paths["gguf"]}, CACHE,
                                           repeats=cfg.export_repeats, threads=cfg.threads,
                                           log=log_dir / "export.log")
    results["load"]["end" if not args.update else f"end of rerun {now}"] = load_average()
    results["targets"] = report.targets(results)
    files = write_outputs(results, args.out)
    print(report.render_markdown(results))
    for kind, path in files.items():
        log(f"wrote {kind}: {path}")
    return 0
