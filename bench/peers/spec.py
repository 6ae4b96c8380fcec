"""Speculative-decoding rows (`--only speculative`): batch-1 greedy decode speed on the chat
prompts of `bench.spec_prompts`, with and without each engine's prompt-lookup mode.

- llorch: `serve.engine.Engine` in-process (int4, `--w8a8 auto`), `SpeculativeConfig` from
  the serve defaults (`--speculative ngram`) or none; and the fp32 export alone and drafted
  by the int4 export (`--speculative draft --draft-model`).
- llama.cpp: `llama-cpp-python` on the Q4_1 GGUF, with `LlamaPromptLookupDecoding` (its
  prompt-lookup draft model; its defaults, max_ngram_size=2, num_pred_tokens=10) or none.
- ORT GenAI: `onnxruntime-genai` on its own model builder's int4 export (the main table's
  fastest batch-1 peer), plain or with its n-gram speculative decoding (genai_config
  ``speculative``: ``ngram_size`` `GENAI_NGRAM_SIZE`, ``max_draft_tokens`` K = 5 as llorch's;
  GenAI 0.18 drafts from the sequence's own tokens and verifies them in one target call).

Every prompt: the same token ids for both (SmolLM2's chat template, rendered by llorch's
tokenizer), greedy, up to `SPEC_NEW_TOKENS` tokens, stopping at EOS (the answers are the
point: past EOS the model no longer copies its input). Decode tok/s of a prompt set = its
tokens after the first / the time from the first token to the last, summed over the set, so
long answers weigh more; medians of `SPEC_REPEATS` passes over the set.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from bench.config import BenchConfig
from bench.peers.base import Skip, config_of, require
from bench.peers.llamacpp import HINT
from bench.spec_prompts import GROUNDED, OPEN_ENDED, chat_ids

SPEC_NEW_TOKENS = 160
SPEC_REPEATS = 3


def prompt_sets(model_dir: Path, quick: bool) -> dict[str, list[list[int]]]:
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    sets = {"grounded": GROUNDED, "open": OPEN_ENDED}
    return {name: [chat_ids(tok, msg) for _, msg in (ps[:2] if quick else ps)]
            for name, ps in sets.items()}


class LlorchSpec:
    """llorch's engine in-process: plain (``speculative`` False), `--speculative ngram`, or with
    ``draft_dir`` `--speculative draft --draft-model draft_dir` (serve's defaults otherwise,
    `serve.main.open_draft` for the draft runtime); ``spin`` overrides the target's
    `RuntimeOptions.spin` and ``attention_pad`` serve's `--attention-pad` (None: its auto, on
    with speculation where the export has the pad); ``adaptive`` False is
    `--no-speculative-adaptive`; ``w8a8`` serve's `--w8a8`. After `times`, ``cpu_stamps`` holds the process CPU time
    (`time.process_time`, every thread) at each token's arrival."""

    def __init__(self, model_dir: Path, threads: int, speculative: bool,
                 draft_dir: Path | None = None, spin: bool | None = None,
                 attention_pad: bool | None = None, adaptive: bool = True,
                 w8a8: str = "auto") -> None:
        from serve.engine import Engine
        from serve.events import EngineObserver
        from serve.main import open_draft, target_spin
        from serve.options import ServeOptions
        from serve.runtime import RuntimeOptions, open_runtime
        from serve.tokenizer import Tokenizer

        class Counts(EngineObserver):
            drafted = accepted = 0

            def speculated(self, counts: tuple[int, int]) -> None:
                self.drafted += counts[0]
                self.accepted += counts[1]

        self.counts = Counts()
        options = ServeOptions(model_dir=model_dir, threads=threads, max_length=2048,
                               speculative=("draft" if draft_dir else "ngram") if speculative else None,
                               draft_model=draft_dir if speculative else None,
                               attention_pad=attention_pad,
                               speculative_adaptive=adaptive if speculative else True)
        runtime = open_runtime(model_dir, RuntimeOptions(
            threads=threads, max_length=2048, w8a8=w8a8,
            spin=target_spin(options) if spin is None else spin,
            attention_pad=options.attention_pad_in_effect()))
        draft = open_draft(options, runtime) if options.draft_model else None
        tokenizer = Tokenizer.from_dir(model_dir)
        self.eos = frozenset(tokenizer.eos_ids)
        self.engine = Engine(runtime, tokenizer, observer=self.counts,
                             speculative=options.speculative_config(), draft=draft)
        self.engine.start()
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.engine.stop()
        self.loop.close()

    def times(self, ids: list[int], new_tokens: int, temperature: float = 0.0,
              seed: int | None = None) -> list[float]:
        """perf_counter() at each token's arrival (seconds), greedy unless ``temperature``."""
        return self.loop.run_until_complete(self._times(ids, new_tokens, temperature, seed))

    async def _times(self, ids: list[int], new_tokens: int, temperature: float,
                     seed: int | None) -> list[float]:
        from serve.events import GenerationRequest
        from serve.sampling import SamplingParams

        out: list[float] = []
        params = SamplingParams(max_tokens=new_tokens, temperature=temperature, seed=seed)
        self.cpu_stamps = cpu = []
        async for event in self.engine.submit(GenerationRequest(tuple(ids), params)):
            if event.error:
                raise RuntimeError(f"engine error: {event.error}")
            now, now_cpu = time.perf_counter(), time.process_time()
            n = sum(len(c.token_ids) for c in event.choices)
            out += [now] * n
            cpu += [now_cpu] * n
        return out

    def extra(self) -> dict:
        c = self.counts
        return {"drafted": c.drafted, "accepted": c.accepted,
                "acceptance": c.accepted / c.drafted if c.drafted else None}


def interleaved(peers: dict[str, LlorchSpec], sets: dict[str, list[list[int]]], rounds: int,
                new_tokens: int, *, temperature: float = 0.0, seeded: bool = False
                ) -> dict[tuple[str, str], dict[str, float]]:
    """Every prompt of every set through every engine, ``rounds`` times, the engines' order
    reversed every other prompt and round (so they all meet the same machine load), after an
    8-token warm-up of each on the first set's first prompt; ``seeded``: prompt i is sampled
    with seed i (at ``temperature``).

    Returns:
        per (engine name, set name): ``tokens`` after each answer's first, summed; ``wall``
        and ``cpu`` seconds from each answer's first token to its last (perf_counter and
        process CPU time, every thread), summed; ``drafted`` / ``accepted`` draft tokens.
    """
    names = list(peers)
    first = next(iter(sets.values()))[0]
    for p in peers.values():
        p.times(first, 8)  # warm-up
    total = {(k, s): dict.fromkeys(("tokens", "wall", "cpu", "drafted", "accepted"), 0)
             for k in peers for s in sets}
    for rnd in range(rounds):
        for s, prompts in sets.items():
            for i, ids in enumerate(prompts):
                for k in names if (rnd + i) % 2 == 0 else names[::-1]:
                    t = total[k, s]
                    before = peers[k].extra()
                    stamps = peers[k].times(ids, new_tokens, temperature,
                                            seed=i if seeded else None)
                    after = peers[k].extra()
                    t["drafted"] += after["drafted"] - before["drafted"]
                    t["accepted"] += after["accepted"] - before["accepted"]
                    if len(stamps) > 1:
                        t["tokens"] += len(stamps) - 1
                        t["wall"] += stamps[-1] - stamps[0]
                        t["cpu"] += peers[k].cpu_stamps[-1] - peers[k].cpu_stamps[0]
    return total


class LlamaCppSpec:
    def __init__(self, gguf: Path, threads: int, speculative: bool, eos: int) -> None:
        llama_cpp = require("llama_cpp", HINT)
        draft = None
        if speculative:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            draft = LlamaPromptLookupDecoding()
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads,
                                   n_threads_batch=threads, n_batch=512, verbose=False, seed=0,
                                   draft_model=draft)
        self.eos = eos

    def close(self) -> None:
        self.llm.close()

    def times(self, ids: list[int], new_tokens: int) -> list[float]:
        self.llm.reset()
        out: list[float] = []
        for tok in self.llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(time.perf_counter())
            if tok == self.eos or len(out) == new_tokens:
                break
        return out

    def extra(self) -> dict:
        return {}


GENAI_NGRAM_SIZE = 4
GENAI_MAX_DRAFT_TOKENS = 5


class GenAISpec:
    """ORT GenAI's generator on a model directory, greedy, stopping at EOS; ``speculative``:
    its n-gram speculative decoding (the ``speculative`` block of genai_config, set through
    `Config.overlay` so the directory is not edited)."""

    def __init__(self, model_dir: Path, threads: int, speculative: bool,
                 ngram_size: int = GENAI_NGRAM_SIZE,
                 max_draft_tokens: int = GENAI_MAX_DRAFT_TOKENS) -> None:
        import json

        self.og = og = require("onnxruntime_genai", "pip install onnxruntime-genai")
        overlay: dict = {"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
        if speculative:
            overlay["speculative"] = {"ngram_size": ngram_size,
                                      "max_draft_tokens": max_draft_tokens}
        config = og.Config(str(model_dir))
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.speculative = speculative
        self.drafted = self.accepted = 0

    def close(self) -> None:
        del self.model

    def times(self, ids: list[int], new_tokens: int) -> list[float]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new_tokens)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        out: list[float] = []
        while not gen.is_done() and len(out) < new_tokens:
            gen.generate_next_token()
            gen.get_next_tokens()
            out.append(time.perf_counter())
        if self.speculative:
            stats = gen.get_speculative_stats()
            self.drafted += int(stats["draft_tokens_evaluated"])
            self.accepted += int(stats["draft_tokens_accepted"])
        return out

    def extra(self) -> dict:
        if not self.speculative:
            return {}
        return {"drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else None}


def measure(peer, sets: dict[str, list[list[int]]], cfg: BenchConfig) -> dict:
    """Per prompt set: decode tok/s of each pass (summed over its prompts), and the median."""
    new = 16 if cfg.quick else SPEC_NEW_TOKENS
    peer.times(sets["grounded"][0], 8)  # warm-up
    out: dict = {"spec_decode_tps": {}, "spec_tokens": {}}
    for name, prompts in sets.items():
        rates, tokens = [], []
        for _ in range(1 if cfg.quick else SPEC_REPEATS):
            n = t = 0.0
            count = 0
            for ids in prompts:
                stamps = peer.times(ids, new)
                count += len(stamps)
                if len(stamps) > 1:
                    n += len(stamps) - 1
                    t += stamps[-1] - stamps[0]
            rates.append(n / t if t else float("nan"))
            tokens.append(count)
        out["spec_decode_tps"][name] = {"median": statistics.median(rates), "runs": rates}
        out["spec_tokens"][name] = tokens[0]
    return out


def run(job: dict) -> dict:
    cfg = config_of(job)
    args = job["args"]
    if args.get("skip_reason"):
        raise Skip(args["skip_reason"])
    int4 = Path(args["int4_dir"])
    sets = prompt_sets(int4, cfg.quick)
    if args["engine"] == "llorch":
        draft = Path(args["int4_dir"]) if args.get("draft") == "int4" else None
        peer = LlorchSpec(Path(args["model_dir"]), cfg.threads, args["speculative"], draft,
                          w8a8=args.get("w8a8", "auto"))
        from importlib import metadata
        version = metadata.version("llorch")
    elif args["engine"] == "genai":
        model_dir = Path(args["model_dir"])
        if not (model_dir / "genai_config.json").is_file():
            raise Skip(f"no GenAI model directory at {model_dir}")
        peer = GenAISpec(model_dir, cfg.threads, args["speculative"])
        from importlib import metadata
        version = metadata.version("onnxruntime-genai")
    else:
        gguf = Path(args["model_dir"])
        if not gguf.is_file():
            raise Skip(f"no GGUF at {gguf}")
        from serve.tokenizer import Tokenizer
        peer = LlamaCppSpec(gguf, cfg.threads, args["speculative"],
                            min(Tokenizer.from_dir(int4).eos_ids))
        from importlib import metadata
        version = metadata.version("llama-cpp-python")
    try:
        result = measure(peer, sets, cfg)
        result.update(peer.extra())
    finally:
        peer.close()
    return {**result, "version": version}
