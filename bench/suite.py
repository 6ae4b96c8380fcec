"""What a run contains: one `Entry` per engine configuration, grouped for `--only`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Entry:
    """One row of the results.

    Attributes:
        key: results key and row id.
        label: what the table calls it.
        peer: module under `bench.peers` that runs it.
        group: name `--only` selects it by (its key works too).
        model: which prepared input it runs on: int4, fp32, hf, gguf, builder-int4, optimum-fp32,
            int4-l0, int4-sym-lm4,
            or the 1B-class model's 1b-int4, 1b-int4-sym, 1b-int4-sym-lm4, 1b-int4-q4_0,
            1b-genai, 1b-gguf (bench.model_1b).
        baseline: the llorch entry its ratios are taken against (same precision), or None.
        args: extra job arguments for the peer.
    """

    key: str
    label: str
    peer: str
    group: str
    model: str
    baseline: str | None = "llorch-int4"
    args: dict = field(default_factory=dict)


ENTRIES: tuple[Entry, ...] = (
    Entry("llorch-int4", "llorch engine int4 (in-process)", "llorch_engine", "llorch", "int4", None),
    Entry("llorch-fp32", "llorch engine fp32 (in-process)", "llorch_engine", "llorch", "fp32", None),
    Entry("llorch-http-int4", "llorch HTTP int4 (openai client, SSE)", "llorch_http", "http", "int4",
          "llorch-int4", {"mode": "single"}),
    Entry("llorch-http-fp32", "llorch HTTP fp32 (openai client, SSE)", "llorch_http", "http", "fp32",
          "llorch-fp32", {"mode": "single"}),
    # the engine in a process of its own, two HTTP workers in front (issue 18: costs <= 3 %)
    Entry("llorch-http-int4-api-workers", "llorch HTTP int4 --api-workers 2 (engine process)",
          "llorch_http", "api-workers", "int4", "llorch-http-int4",
          {"mode": "single", "serve_args": ["--api-workers", "2"]}),
    Entry("genai-int4", "ORT GenAI on llorch's int4 export", "genai", "genai", "int4"),
    Entry("genai-fp32", "ORT GenAI on llorch's fp32 export", "genai", "genai", "fp32", "llorch-fp32"),
    Entry("genai-builder-int4", "ORT GenAI int4 (its model builder)", "genai", "genai",
          "builder-int4"),
    Entry("llamacpp-q4_1", "llama.cpp Q4_1 GGUF (llama-cpp-python)", "llamacpp", "llamacpp", "gguf"),
    Entry("transformers-fp32", "transformers fp32 (torch CPU)", "torch_hf", "transformers", "hf",
          "llorch-fp32"),
    Entry("optimum-fp32", "optimum ORTModelForCausalLM fp32", "optimum_ort", "optimum",
          "optimum-fp32", "llorch-fp32"),
    Entry("llorch-concurrency", "llorch HTTP int4, N concurrent streams", "llorch_http",
          "concurrency", "int4", None, {"mode": "concurrency"}),
    # the defaults run prefill and batched decode on the W8A8 graph (serve --w8a8 auto);
    # these rows are the int4 graph alone (serve --w8a8 off)
    Entry("llorch-int4-w8a8-off", "llorch engine int4 --w8a8 off (int4 graph only)",
          "llorch_engine", "w8a8", "int4", "llorch-int4", {"w8a8": "off"}),
    Entry("llorch-concurrency-w8a8-off", "llorch HTTP int4 --w8a8 off, N concurrent streams",
          "llorch_http", "w8a8", "int4", None,
          {"mode": "concurrency", "serve_args": ["--w8a8", "off"]}),
    # determinism (issue 15 part 2): serve is batch-invariant by default on the default int4
    # export (every step on its row-invariant W8A8 graph); "before" is the export and
    # defaults it replaced (down_proj at accuracy level 0, a lone decode on the int4 graph),
    # "off" the default export with --no-batch-invariant
    Entry("llorch-int4-before", "llorch engine int4, previous default export (not invariant)",
          "llorch_engine", "determinism", "int4-l0", "llorch-int4"),
    Entry("llorch-int4-invariance-off", "llorch engine int4 --no-batch-invariant",
          "llorch_engine", "determinism", "int4", "llorch-int4", {"batch_invariant": False}),
    Entry("llorch-concurrency-before", "llorch HTTP int4, previous default export, N streams",
          "llorch_http", "determinism", "int4-l0", None, {"mode": "concurrency"}),
    Entry("llorch-concurrency-invariance-off", "llorch HTTP int4 --no-batch-invariant, N streams",
          "llorch_http", "determinism", "int4", None,
          {"mode": "concurrency", "serve_args": ["--no-batch-invariant"]}),
    Entry("llorch-concurrency-default", "llorch HTTP int4 (defaults: batch-invariant), N streams",
          "llorch_http", "determinism", "int4", None, {"mode": "concurrency"}),
    # batch-1 decode on bench.spec_prompts (chat answers that copy their input, and open-ended
    # ones), each engine with and without its prompt-lookup speculation (bench.peers.spec)
    Entry("llorch-spec-off", "llorch engine int4, speculation off", "spec", "speculative",
          "int4", None, {"engine": "llorch", "speculative": False}),
    Entry("llorch-spec-ngram", "llorch engine int4 --speculative ngram", "spec", "speculative",
          "int4", None, {"engine": "llorch", "speculative": True}),
    # the same on ORT GenAI's builder's quantization (--int4-symmetric --lm-head-bits 4: its
    # blocks bit for bit), so llorch and GenAI read the same bytes a step; --w8a8 prefill:
    # decode steps on that row-invariant main graph (the one-stream setting there)
    Entry("llorch-spec-sym-off", "llorch engine int4 --int4-symmetric --lm-head-bits 4 "
          "--w8a8 prefill, speculation off", "spec", "speculative", "int4-sym-lm4", None,
          {"engine": "llorch", "speculative": False, "w8a8": "prefill"}),
    Entry("llorch-spec-sym-ngram", "llorch engine int4 --int4-symmetric --lm-head-bits 4 "
          "--w8a8 prefill --speculative ngram", "spec", "speculative", "int4-sym-lm4", None,
          {"engine": "llorch", "speculative": True, "w8a8": "prefill"}),
    # and with --w8a8 auto (every step, verify calls included, on the W8A8 graph, whose
    # int8 GEMMs verify several positions cheaper than the 4-bit main graph)
    Entry("llorch-spec-sym-auto-off", "llorch engine int4 --int4-symmetric --lm-head-bits 4, "
          "speculation off", "spec", "speculative", "int4-sym-lm4", None,
          {"engine": "llorch", "speculative": False}),
    Entry("llorch-spec-sym-auto-ngram", "llorch engine int4 --int4-symmetric --lm-head-bits 4 "
          "--speculative ngram", "spec", "speculative", "int4-sym-lm4", None,
          {"engine": "llorch", "speculative": True}),
    # the fp32 export as the target, alone and drafted by its int4 export (--speculative draft)
    Entry("llorch-spec-fp32-off", "llorch engine fp32, speculation off", "spec", "speculative",
          "fp32", None, {"engine": "llorch", "speculative": False}),
    Entry("llorch-spec-fp32-draft", "llorch engine fp32 --speculative draft (int4 export drafts)",
          "spec", "speculative", "fp32", None, {"engine": "llorch", "speculative": True,
                                                "draft": "int4"}),
    Entry("llamacpp-spec-off", "llama.cpp Q4_1, speculation off", "spec", "speculative", "gguf",
          None, {"engine": "llamacpp", "speculative": False}),
    Entry("llamacpp-spec-lookup", "llama.cpp Q4_1 + LlamaPromptLookupDecoding", "spec",
          "speculative", "gguf", None, {"engine": "llamacpp", "speculative": True}),
    # ORT GenAI on its own builder's int4 export (the main table's fastest batch-1 peer),
    # plain and with its n-gram speculative decoding (genai_config "speculative")
    Entry("genai-spec-off", "ORT GenAI int4 (its model builder), speculation off", "spec",
          "speculative", "builder-int4", None, {"engine": "genai", "speculative": False}),
    Entry("genai-spec-ngram", "ORT GenAI int4 (its model builder), n-gram speculative", "spec",
          "speculative", "builder-int4", None, {"engine": "genai", "speculative": True}),
    Entry("llorch-server-rss", "llorch serve int4, 8 slots x 4096 tokens", "llorch_http", "rss",
          "int4", None, {"mode": "rss"}),
    # the 1B-class model (Llama-3.2-1B's shapes, random weights; bench.model_1b), with
    # BenchConfig.for_1b's counts
    Entry("llorch-1b-int4", "llorch engine int4", "llorch_engine", "1b", "1b-int4", None),
    Entry("llorch-1b-int4-sym", "llorch engine int4 --int4-symmetric", "llorch_engine", "1b",
          "1b-int4-sym", "llorch-1b-int4"),
    Entry("llorch-1b-int4-sym-lm4", "llorch engine int4 --int4-symmetric --lm-head-bits 4",
          "llorch_engine", "1b", "1b-int4-sym-lm4", "llorch-1b-int4"),
    Entry("llorch-1b-int4-q4_0", "llorch engine int4, exported from the Q4_0 GGUF",
          "llorch_engine", "1b", "1b-int4-q4_0", "llorch-1b-int4"),
    Entry("genai-1b-int4", "ORT GenAI int4 (its model builder)", "genai", "1b", "1b-genai",
          "llorch-1b-int4"),
    Entry("llamacpp-1b-q4_0", "llama.cpp Q4_0 (llama-cpp-python)", "llamacpp", "1b", "1b-gguf",
          "llorch-1b-int4"),
    Entry("llorch-1b-concurrency", "llorch HTTP int4, N concurrent streams", "llorch_http", "1b",
          "1b-int4", None, {"mode": "concurrency"}),
    Entry("llorch-1b-q4_0-concurrency", "llorch HTTP int4 from the Q4_0 GGUF, N concurrent streams",
          "llorch_http", "1b", "1b-int4-q4_0", None, {"mode": "concurrency"}),
    Entry("genai-1b-batch", "ORT GenAI int4, one static batch of N", "genai", "1b", "1b-genai",
          None, {"mode": "batch"}),
    Entry("llamacpp-1b-batch", "llama.cpp Q4_0, N sequences in one llama_batch", "llamacpp", "1b",
          "1b-gguf", None, {"mode": "batch"}),
)

ONE_B_GROUPS = ("1b",)

# not peers: run by the parent process
EXTRA_GROUPS = ("export",)


def is_1b(entry: Entry) -> bool:
    """Whether the entry runs on the 1B-class model (its own counts, table and results file)."""
    return entry.group in ONE_B_GROUPS


def groups() -> list[str]:
    return list(dict.fromkeys([e.group for e in ENTRIES] + list(EXTRA_GROUPS)))


def select(only: Sequence[str] | None) -> tuple[list[Entry], bool]:
    """Entries named by `--only` (groups or keys; None = all) and whether to run the export.

    Raises:
        ValueError: a name that is neither a group nor a key.
    """
    if not only:
        return list(ENTRIES), True
    known = set(groups()) | {e.key for e in ENTRIES}
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ValueError(f"unknown --only name(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(groups())} or an entry key ({', '.join(e.key for e in ENTRIES)})")
    wanted = set(only)
    return [e for e in ENTRIES if e.group in wanted or e.key in wanted], "export" in wanted
