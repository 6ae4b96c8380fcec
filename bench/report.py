"""Results → markdown tables, the issue's targets with their measured ratios, and a PNG plot.

Ratios are "llorch's advantage": how many times better the llorch row a result is compared
with is (>1× = llorch better). Throughput: llorch / peer; times and memory: peer / llorch.
"""

from __future__ import annotations

import math
from pathlib import Path

from bench.stats import advantage

LLORCH_PEERS = ("llorch_engine", "llorch_http")


def _median(block: dict | None, key: str) -> float | None:
    if not block or key not in block:
        return None
    v = block[key]["median"]
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_rate(r: float | None) -> str:
    return "–" if r is None else f"{r:.1f}"


def fmt_mb(m: float | None) -> str:
    return "–" if m is None else f"{m:.0f} MB"


def fmt_ratio(r: float | None) -> str:
    return "" if r is None else f" ({r:.2f}×)"


def ok_entries(results: dict, *, one_b: bool = False) -> dict[str, dict]:
    """The entries that ran, of the default model (or, `one_b`, of the 1B-class model)."""
    return {k: e for k, e in results.get("entries", {}).items()
            if e.get("status") == "ok" and (e.get("group") == "1b") == one_b}


# single-stream 1B row → the entry holding the same engine's 16-stream figure
ONE_B_STREAMS = {"llorch-1b-int4": "llorch-1b-concurrency", "genai-1b-int4": "genai-1b-batch",
                 "llorch-1b-int4-q4_0": "llorch-1b-q4_0-concurrency",
                 "llamacpp-1b-q4_0": "llamacpp-1b-batch"}


def one_b_rows(results: dict) -> list[dict]:
    """Per engine of the 1B-class model: weight bytes per token, the physical limit at the
    measured triad bandwidth, decode / TTFT / RSS and the concurrent-stream figure."""
    one_b = results.get("one_b", {})
    bw = one_b.get("bandwidth", {}).get("triad_gbps")
    entries = ok_entries(results, one_b=True)
    cfg = results.get("config_1b") or results["config"]
    n_dec, n_ttft = str(cfg["decode_lengths"][0]), str(cfg["ttft_lengths"][-1])
    rows = []
    for key, e in entries.items():
        if not e.get("decode_tps") and not e.get("ttft_s"):
            continue
        wb = one_b.get("weight_bytes", {}).get(e.get("model", ""), {}).get("total")
        limit = bw * 1e9 / wb if bw and wb else None
        dec = _median(e.get("decode_tps"), n_dec)
        streams = entries.get(ONE_B_STREAMS.get(key, ""), {}).get("concurrency", {})
        n_streams, agg, dec_n = None, None, None
        if streams:
            n_streams = max(streams, key=int)
            agg = _median(streams[n_streams], "aggregate_tps")
            # decode phase only: static batches time it directly; llorch's continuous batch
            # as streams x the median stream's decode rate (first to last token)
            dec_n = (_median(streams[n_streams], "decode_only_tps")
                     or (streams[n_streams].get("stream_decode_tps_median") or 0) * int(n_streams)
                     or None)
        rows.append({"key": key, "label": e["label"] + (" †" if e.get("rerun") else ""),
                     "weight_bytes": wb, "limit_tps": limit,
                     "decode_tps": dec, "pct_of_limit": 100 * dec / limit if dec and limit else None,
                     "streams": n_streams, "aggregate_tps": agg, "streams_decode_tps": dec_n,
                     "ttft_s": _median(e.get("ttft_s"), n_ttft), "ttft_tokens": n_ttft,
                     "peak_rss_mb": e.get("peak_rss_mb"), "foreign_cpus": e.get("foreign_cpus")})
    return rows


def one_b_section(results: dict) -> str:
    one_b = results.get("one_b", {})
    bw = one_b.get("bandwidth", {})
    rows = one_b_rows(results)
    if not rows:
        return ""
    head = ["engine", "weights read / token", "limit tok/s", "decode tok/s, batch 1",
            "% of limit", "decode tok/s, N streams", "aggregate tok/s incl. prefill",
            f"TTFT {rows[0]['ttft_tokens']} tok",
            "peak RSS", "other CPU use"]
    body = [[r["label"], fmt_mb(r["weight_bytes"] / 1e6 if r["weight_bytes"] else None),
             fmt_rate(r["limit_tps"]), fmt_rate(r["decode_tps"]),
             "–" if r["pct_of_limit"] is None else f"{r['pct_of_limit']:.0f}%",
             fmt_rate(r["streams_decode_tps"]) + (f" ({r['streams']})" if r["streams"] else ""),
             fmt_rate(r["aggregate_tps"]),
             fmt_seconds(r["ttft_s"]), fmt_mb(r["peak_rss_mb"]),
             "–" if r["foreign_cpus"] is None else f"{r['foreign_cpus']:.2f}"] for r in rows]
    bw_line = (f"Memory bandwidth (STREAM triad, C via ctypes, {bw.get('threads')} threads, 3 × "
               f"{bw.get('bytes_per_array', 0) / 1e6:.0f} MB, best of {bw.get('repeats')}): "
               f"**{bw['triad_gbps']:.1f} GB/s** (read-only sum: {bw['read_gbps']:.1f} GB/s"
               + (f"; {bw['note']}" if bw.get("note") else "") + ")."
               if "triad_gbps" in bw else f"Memory bandwidth: not measured ({bw.get('reason')}).")
    parts = [
        "## 1B-class model (Llama-3.2-1B's shapes)",
        "",
        "A Llama with Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads / 8 KV heads, "
        "intermediate 8192, rope θ 500000 with llama3 scaling, tied embeddings) and SmolLM2's "
        "tokenizer and vocabulary (49152), random weights (seed 0, std 0.02; `bench.model_1b`). "
        "Speed is independent of weight values for a dense model: every weight is read and "
        "multiplied each token whatever it holds.",
        "",
        bw_line,
        "**Limit** = triad bandwidth ÷ weight bytes one batch-1 decode step reads, counted "
        "from each export's own files (`bench.weight_bytes`): every matmul input in full "
        "(packed int4/int8 weights, scales, zero points, zero-point corrections, float "
        "matrices; the tied lm_head in full), one row of lookup tables (embedding, rotary), "
        "norms in full; KV-cache reads not included. Decode after a 128-token prompt. "
        "N streams (N in parentheses): decode tok/s = the decode phase's tokens ÷ its time "
        "(static batches: after the first step; llorch: N × the median stream's rate from its "
        "first to its last token, which overlaps other streams' prefills); aggregate = all "
        "streams' tokens ÷ wall time, prefill included (llorch: HTTP, "
        "continuous batching, `--max-batch` = streams; GenAI: one static batch of that many "
        "prompts, started and finished together; llama.cpp: that many sequences in one "
        "`llama_batch` per step, unified KV cache).",
        "",
        _table(head, body),
    ]
    wb = one_b.get("weight_bytes", {})
    if wb:
        parts += ["", "Weight bytes per token by kind (MB, 10⁶ bytes):", ""]
        for model, w in wb.items():
            kinds = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(w.get("by_dtype", {}).items()))
            parts.append(f"- `{model}` ({Path(w['file']).name}): {w['total'] / 1e6:.1f} = {kinds}; "
                         f"lookups {w['parts'].get('lookup', 0) / 1e3:.1f} kB")
    return "\n".join(parts)


def single_stream_table(results: dict) -> str:
    entries = ok_entries(results)
    cfg = results["config"]
    ttft_n = [str(n) for n in cfg["ttft_lengths"]]
    dec_n = [str(n) for n in cfg["decode_lengths"]]
    head = (["engine"] + [f"TTFT {n}" for n in ttft_n] + [f"decode tok/s ({n}-tok prompt)" for n in dec_n]
            + ["peak RSS", "other CPU use"])
    rows = []
    for e in entries.values():
        if not e.get("ttft_s") and not e.get("decode_tps"):
            continue
        base = entries.get(e.get("baseline") or "")
        cells = [e["label"] + (" †" if e.get("rerun") else "")]
        for n in ttft_n:
            v = _median(e.get("ttft_s"), n)
            r = advantage(_median(base.get("ttft_s"), n), v, higher_is_better=False) if base else None
            cells.append(fmt_seconds(v) + fmt_ratio(r))
        for n in dec_n:
            v = _median(e.get("decode_tps"), n)
            r = advantage(_median(base.get("decode_tps"), n), v, higher_is_better=True) if base else None
            cells.append(fmt_rate(v) + fmt_ratio(r))
        rss = e.get("peak_rss_mb")
        r = advantage(base.get("peak_rss_mb"), rss, higher_is_better=False) if base else None
        cells.append(fmt_mb(rss) + fmt_ratio(r))
        cells.append(_load(e))
        rows.append(cells)
    return _table(head, rows)


def _load(e: dict) -> str:
    """CPUs' worth of work other processes did while the row ran (see harness.run_entry)."""
    f = e.get("foreign_cpus")
    return "–" if f is None else f"{f:.2f}"


def concurrency_table(results: dict, key: str = "llorch-concurrency") -> str:
    e = ok_entries(results).get(key)
    if not e:
        return ""
    conc = e["concurrency"]
    single = _median(conc.get("1", {}), "aggregate_tps") if "1" in conc else None
    head = ["streams", "aggregate tok/s", "× 1 stream", "per-stream tok/s", "ITL p50", "ITL p95",
            "TTFT p50", "TTFT p95", "server peak RSS"]
    rows = []
    for n, c in sorted(conc.items(), key=lambda kv: int(kv[0])):
        agg = _median(c, "aggregate_tps")
        rows.append([n, fmt_rate(agg), f"{agg / single:.2f}×" if single and agg else "–",
                     fmt_rate(c.get("stream_decode_tps_median")),
                     f"{c['itl_p50_ms']:.1f} ms", f"{c['itl_p95_ms']:.1f} ms",
                     fmt_seconds(c.get("ttft_p50_s")), fmt_seconds(c.get("ttft_p95_s")),
                     fmt_mb(e.get("server_peak_rss_mb", {}).get(n))])
    return _table(head, rows)


def memory_table(results: dict) -> str:
    rows = []
    rss = ok_entries(results).get("llorch-server-rss", {}).get("server_rss")
    if rss:
        rows.append([f"`llorch serve` int4, {rss['slots']} slots × {rss['max_length']} tokens: "
                     f"peak RSS ({rss['slots']} streams of {rss['prompt']} + {rss['new_tokens']} tokens)",
                     fmt_mb(rss["peak_rss_mb"])])
        rows.append(["  … idle after load", fmt_mb(rss["idle_rss_mb"])])
        rows.append(["  … KV reserved (virtual, touched on use)", fmt_mb(rss["kv_reserved_mb"])])
        rows.append(["  … KV touched by this run", fmt_mb(rss["kv_touched_mb"])])
        if "rss_per_slot_mb" in rss:
            rows.append([f"  … RSS added per slot ({rss['tokens_held']} tokens held in all)",
                         fmt_mb(rss["rss_per_slot_mb"])])
            rows.append(["  … RSS added per 1k tokens held", fmt_mb(rss["rss_per_1k_tokens_mb"])])
        rows.append(["  … model.onnx + .data on disk (mmap)", fmt_mb(rss["model_data_mb"])])
    for name, x in results.get("export", {}).items():
        if x.get("status") != "ok":
            rows.append([f"`llorch export` {name}", x.get("reason", x.get("status", ""))])
            continue
        rows.append([f"`llorch export` {name} → int4: time", fmt_seconds(x["wall_s"]["median"])])
        rows.append([f"`llorch export` {name} → int4: peak RSS", fmt_mb(x["peak_rss_mb"]["median"])])
    for name, p in results.get("prepare", {}).items():
        if p.get("build_s"):
            rows.append([f"(peer) {name} build time, this run", fmt_seconds(p["build_s"])])
    return _table(["figure", "value"], rows) if rows else ""


def targets(results: dict) -> list[dict]:
    """The issue's targets with the ratio measured in this run ("met" is None when unmeasured)."""
    entries = ok_entries(results)
    peers = {k: e for k, e in entries.items() if e.get("peer") not in LLORCH_PEERS}
    ours = entries.get("llorch-int4")
    out = []

    def best(metric: str, n: str, *, higher: bool) -> tuple[str | None, float | None]:
        vals = [(k, _median(e.get(metric), n)) for k, e in peers.items()]
        vals = [(k, v) for k, v in vals if v is not None]
        if not vals:
            return None, None
        return (max if higher else min)(vals, key=lambda kv: kv[1])

    for n in results["config"]["decode_lengths"]:
        n = str(n)
        peer, v = best("decode_tps", n, higher=True)
        mine = _median(ours.get("decode_tps"), n) if ours else None
        ratio = mine / v if mine and v else None
        out.append({"target": f"int4 batch-1 decode ({n}-token prompt) ≥ 1.5× the best peer",
                    "measured": ratio, "goal": 1.5, "met": None if ratio is None else ratio >= 1.5,
                    "detail": f"llorch {fmt_rate(mine)} tok/s vs {peer} {fmt_rate(v)} tok/s"})
    for n in ("1000",):
        peer, v = best("ttft_s", n, higher=False)
        mine = _median(ours.get("ttft_s"), n) if ours else None
        ratio = mine / v if mine and v else None
        out.append({"target": f"TTFT of a {n}-token prompt ≤ 0.5× the best peer",
                    "measured": ratio, "goal": 0.5, "met": None if ratio is None else ratio <= 0.5,
                    "detail": f"llorch {fmt_seconds(mine)} vs {peer} {fmt_seconds(v)}"})
    conc = entries.get("llorch-concurrency", {}).get("concurrency", {})
    a1, a16 = _median(conc.get("1"), "aggregate_tps"), _median(conc.get("16"), "aggregate_tps")
    ratio = a16 / a1 if a1 and a16 else None
    out.append({"target": "aggregate tokens/s at 16 streams ≥ 4× single-stream (HTTP)",
                "measured": ratio, "goal": 4.0, "met": None if ratio is None else ratio >= 4,
                "detail": f"{fmt_rate(a16)} vs {fmt_rate(a1)} tok/s"})
    http = entries.get("llorch-http-int4")
    for n in results["config"]["decode_lengths"][:1]:
        n = str(n)
        h = _median(http.get("decode_tps"), n) if http else None
        mine = _median(ours.get("decode_tps"), n) if ours else None
        ratio = h / mine if h and mine else None
        out.append({"target": f"HTTP streaming decode within 5% of in-process ({n}-token prompt)",
                    "measured": ratio, "goal": 0.95, "met": None if ratio is None else ratio >= 0.95,
                    "detail": f"HTTP {fmt_rate(h)} vs in-process {fmt_rate(mine)} tok/s"})
    split = entries.get("llorch-http-int4-api-workers")
    for n in results["config"]["decode_lengths"][:1]:
        n = str(n)
        s = _median(split.get("decode_tps"), n) if split else None
        h = _median(http.get("decode_tps"), n) if http else None
        ratio = s / h if s and h else None
        out.append({"target": f"--api-workers 2 costs single-stream HTTP decode ≤ 3% ({n}-token prompt)",
                    "measured": ratio, "goal": 0.97, "met": None if ratio is None else ratio >= 0.97,
                    "detail": f"split {fmt_rate(s)} vs one process {fmt_rate(h)} tok/s"})
    rss = entries.get("llorch-server-rss", {}).get("server_rss")
    out.append({"target": "server peak RSS, default model, 8 slots × 4096 tokens: reported",
                "measured": rss["peak_rss_mb"] if rss else None, "goal": None,
                "met": None, "detail": (f"{fmt_mb(rss['peak_rss_mb'])} (KV reserved "
                                        f"{fmt_mb(rss['kv_reserved_mb'])}, touched "
                                        f"{fmt_mb(rss['kv_touched_mb'])})") if rss else "not measured"})
    return out


def targets_table(rows: list[dict]) -> str:
    body = []
    for t in rows:
        m = t["measured"]
        shown = "–" if m is None else (fmt_mb(m) if t["goal"] is None else f"{m:.2f}×")
        met = {True: "met", False: "**not met**", None: "–"}[t["met"]]
        body.append([t["target"], shown, met, t["detail"]])
    return _table(["target", "measured", "", "detail"], body)


def skipped_list(results: dict) -> str:
    lines = []
    for key, e in results.get("entries", {}).items():
        if e.get("status") != "ok":
            lines.append(f"- `{key}` **{e.get('status')}**: {e.get('reason', '')}")
    return "\n".join(lines)


SPEC_OURS, SPEC_OFF = "llorch-spec-ngram", "llorch-spec-off"


def speculative_table(results: dict) -> str:
    """Rows of the `speculative` group: decode tok/s per prompt set, and llorch
    --speculative ngram's advantage over each row (>1× = llorch faster)."""
    entries = {k: e for k, e in ok_entries(results).items() if e.get("spec_decode_tps")}
    if not entries:
        return ""
    ours = entries.get(SPEC_OURS, {}).get("spec_decode_tps", {})
    rows = []
    for key, e in entries.items():
        cells = [e["label"]]
        for name in ("grounded", "open"):
            v = _median(e["spec_decode_tps"], name)
            r = None if key == SPEC_OURS else advantage(_median(ours, name), v, higher_is_better=True)
            cells.append(fmt_rate(v) + fmt_ratio(r))
        acc = e.get("acceptance")
        cells.append("–" if acc is None else f"{acc:.0%} of {e['drafted']}")
        rows.append(cells)
    return _table(["engine", "decode tok/s, input-grounded", "decode tok/s, open-ended",
                   "drafts accepted"], rows)


def render_markdown(results: dict) -> str:
    if results.get("only_1b"):
        return render_1b_markdown(results)
    m = results["machine"]
    load = results.get("load", {})
    parts = [
        f"# llorch benchmarks — {results['date'][:10]}, {m['tag']}",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs ({', '.join(m['simd'])}), {m['memory_gb']} GB; "
        f"{results['config']['threads']} threads for every engine; SmolLM2-135M-Instruct; greedy, "
        f"EOS ignored; medians after {results['config']['warmup']} warm-up run(s)."
        + (" **--quick: tiny counts, not a measurement.**" if results["config"].get("quick") else ""),
        f"Load average (1/5/15 min) at start {_fmt_load(load.get('start'))}, "
        f"at end {_fmt_load(load.get('end'))}. \"Other CPU use\": CPUs' worth of work done by "
        "other processes while the row ran (machine busy time minus the row's own); above "
        "~0.1 the row shared the cores and reads slow.",
        "",
        *([f"{results['rounds']} rounds: every entry ran once per round, rounds interleaved in "
           "time; each figure pools the runs of all rounds.", ""]
          if results.get("rounds", 1) > 1 else []),
        *([_code_warning(results), ""] if _code_warning(results) else []),
        *(["Reran later (same counts; marked † below): " + "; ".join(
            f"{', '.join(r['entries']) + (' + export' if r.get('export') else '')} at {r['date']}"
            + (f" ({r['rounds']} rounds)" if r.get("rounds", 1) > 1 else "")
            for r in results["reruns"]) + ".", ""] if results.get("reruns") else []),
        "## Single stream",
        "",
        "Ratios in parentheses: llorch's advantage over the row (>1× = llorch better), against "
        "llorch in-process of the same precision (int4 rows vs llorch int4, fp32 rows vs "
        "llorch fp32; HTTP rows: the in-process engine).",
        "",
        single_stream_table(results),
    ]
    conc = concurrency_table(results)
    if conc:
        cfg = results["config"]
        parts += ["", "## Concurrent streams (HTTP, `--max-batch` = streams)", "",
                  f"Each stream: a distinct {cfg['stream_prompt']}-token prompt, "
                  f"{cfg['stream_tokens']} new tokens; all streams start together. ITL = gaps "
                  "between a stream's chunks, pooled over streams and rounds.", "", conc]
    int4_only = concurrency_table(results, "llorch-concurrency-w8a8-off")
    if int4_only:
        parts += ["", "### The same with `--w8a8 off` (every run on the int4 graph)",
                  "", int4_only]
    spec = speculative_table(results)
    if spec:
        parts += ["", "## Speculative decoding (batch 1)", "",
                  "Greedy chat answers to `bench/spec_prompts.py`, up to 160 tokens, stopping "
                  "at EOS: 6 input-grounded prompts (rewrite, code edit, quote, summarize) and 3 "
                  "open-ended ones (drafts mostly miss). Ratios: `llorch --speculative ngram`'s "
                  "advantage over the row.", "", spec]
    mem = memory_table(results)
    if mem:
        parts += ["", "## Memory and export", "", mem]
    one_b = one_b_section(results)
    if one_b:
        parts += ["", one_b]
    parts += ["", "## Targets (issue 5)", "", targets_table(targets(results))]
    skipped = skipped_list(results)
    if skipped:
        parts += ["", "## Skipped or failed", "", skipped]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    parts += ["", f"Versions: {versions}.", ""]
    return "\n".join(parts)


def render_1b_markdown(results: dict) -> str:
    """A run of the 1B-class rows alone (`--only 1b`)."""
    m = results["machine"]
    load = results.get("load", {})
    parts = [
        f"# llorch benchmarks, 1B-class model — {results['date'][:10]}, {m['tag']}",
        "",
        f"{m['cpu']}, {m['cpus']} CPUs ({', '.join(m['simd'])}), {m['memory_gb']} GB; "
        f"{results['config']['threads']} threads for every engine; greedy, EOS ignored; medians "
        f"after {results['config']['warmup']} warm-up run(s)."
        + (" **--quick: tiny counts, not a measurement.**" if results["config"].get("quick") else ""),
        f"Load average (1/5/15 min) at start {_fmt_load(load.get('start'))}, "
        f"at end {_fmt_load(load.get('end'))}. \"Other CPU use\": CPUs' worth of work done by "
        "other processes while the row ran; above ~0.1 the row shared the cores and reads slow.",
        "",
        *([_code_warning(results), ""] if _code_warning(results) else []),
        *(["Reran later (same counts; marked † below): " + "; ".join(
            f"{', '.join(r['entries'])} at {r['date']}" for r in results["reruns"]) + ".", ""]
          if results.get("reruns") else []),
        one_b_section(results),
    ]
    skipped = skipped_list(results)
    if skipped:
        parts += ["", "## Skipped or failed", "", skipped]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    parts += ["", f"Versions: {versions}.", ""]
    return "\n".join(parts)


def _code_warning(results: dict) -> str:
    """A note when llorch's sources changed between the entries of this run."""
    shas = {e.get("code") for e in results.get("entries", {}).values()
            if e.get("peer") in LLORCH_PEERS and e.get("code")}
    if len(shas) < 2:
        return ""
    return (f"**Note:** llorch's sources changed during this run (at least {len(shas)} different "
            "versions of export/, serve/, llorch/ ran: see each entry's `code` in the JSON).")


def _fmt_load(la) -> str:
    return "–" if not la else "/".join(f"{x:.2f}" for x in la)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> Path | None:
    """Throughput vs concurrency (left) and TTFT vs prompt length (right); None without data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = ok_entries(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    conc = entries.get("llorch-concurrency", {}).get("concurrency", {})
    if conc:
        ns = sorted(int(n) for n in conc)
        left.plot(ns, [conc[str(n)]["aggregate_tps"]["median"] for n in ns], "o-",
                  label="llorch HTTP int4, aggregate", color="C0", linewidth=2)
        left.set_xscale("log", base=2)
        left.set_xticks(ns, [str(n) for n in ns])
    n0 = str(results["config"]["decode_lengths"][0])
    for i, (key, e) in enumerate(entries.items()):
        v = _median(e.get("decode_tps"), n0)
        if v is not None:
            left.axhline(v, linestyle="--", linewidth=1, color=f"C{(i + 1) % 10}",
                         label=f"{key}, batch 1")
    left.set_xlabel("concurrent streams")
    left.set_ylabel("tokens/s")
    left.set_title(f"Throughput vs concurrency (dashed: batch-1 decode, {n0}-token prompt)")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=7)
    drew = bool(conc)
    for i, (key, e) in enumerate(entries.items()):
        t = e.get("ttft_s") or {}
        if not t:
            continue
        ns = sorted(int(n) for n in t)
        right.plot(ns, [t[str(n)]["median"] for n in ns], "o-", label=key,
                   color=f"C{(i + 1) % 10}", linewidth=2 if key == "llorch-int4" else 1)
        drew = True
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("time to first token (s)")
    right.set_title("TTFT vs prompt length")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(f"llorch vs peers — SmolLM2-135M-Instruct, {results['machine']['tag']}, "
                 f"{results['date'][:10]}")
    fig.tight_layout()
    if not drew:
        plt.close(fig)
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
