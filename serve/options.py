"""`ServeOptions`: everything `llorch serve` is told, built once at the edge (CLI or tests)."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from serve.parsers import REASONING_PARSERS, TOOL_PARSERS
from serve.runtime.interface import W8A8_MODES

PROVIDERS = ("cpu", "cuda", "coreml", "auto")
# A request still waiting for a slot after this long gets 503: by then the official OpenAI
# clients (600 s default timeout) have given up on it anyway.
DEFAULT_QUEUE_TIMEOUT = 600.0
API_KEY_ENV = "LLORCH_API_KEY"
# --api-workers' ceiling: every worker is a Python process (~100 MiB) feeding one engine
# thread; 4 already took the H200's HTTP path from 3,629 to 4,671 tok/s at 64 streams.
MAX_API_WORKERS = 64


def export_graph(model_dir: Path | str | None) -> dict:
    """The export's llorch.json ``graph`` (empty where there is none or it is unreadable)."""
    try:
        graph = json.loads((Path(model_dir) / "llorch.json").read_text()).get("graph", {})
    except (OSError, ValueError, AttributeError, TypeError):
        graph = {}
    return graph if isinstance(graph, dict) else {}


def _flag(default: Any, help: str, **argparse: Any) -> Any:
    """A `ServeOptions` field that is also the `llorch serve` flag ``--field-name``: its help
    (``%(default)s`` expands) and any other `add_argument` keywords (type, action, …)."""
    return field(default=default, metadata={"help": help, **argparse})


def _origins(value: str) -> tuple[str, ...]:
    return tuple(o.strip() for o in value.split(",") if o.strip())


_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(value: str) -> int:
    """Bytes from ``123``, ``512M``, ``8G`` or ``8GiB`` (binary units).

    Raises:
        ValueError: not a size.
    """
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)])
    except ValueError:
        raise ValueError(f"{value!r} is not a size (e.g. 512M, 8G)") from None
    if not number > 0:
        raise ValueError(f"{value!r}: a size must be > 0")
    return int(number * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class ModelSpec:
    """One model directory to serve and its id (None: derived from the directory's name)."""

    path: Path
    name: str | None = None

    @classmethod
    def parse(cls, text: str | Path) -> ModelSpec:
        """``DIR`` or ``DIR=alias`` (the command line's form)."""
        path, sep, name = str(text).partition("=")
        if sep and not name.strip():
            raise ValueError(f"{text!r}: empty alias after '='")
        return cls(Path(path), name.strip() or None)


@dataclass(frozen=True)
class ServeOptions:
    """Options of one server process, built once at the edge (CLI or tests).

    ``model_dir`` is the exported model directory to serve (the default model), ``more_models``
    the other directories given on the command line (None: only ``--models-dir``'s); every
    other field is a flag of `llorch serve` (``--max-batch`` for ``max_batch``), documented by
    its help below.
    """

    model_dir: Path | None
    more_models: tuple[ModelSpec, ...] = field(default=(), metadata={"flag": False})
    model_name: str | None = _flag(
        None, "with one model directory: its id in /v1/models (default: the directory's name "
        "without a -int4/-fp32 suffix); with several, write DIR=alias")
    models_dir: Path | None = _flag(
        None, "also serve every model directory directly beneath this one (after the DIRs "
        "given; ids from the directory names)", type=Path)
    max_loaded_models: int | None = _flag(
        None, "most models loaded at once; loading another stops the least recently used "
        "idle one (default: no limit)", type=int)
    memory_budget: int | None = _flag(
        None, "bytes the loaded models may take together, their files plus KV cache, e.g. 8G; "
        "least recently used idle models are stopped to stay under it (default: no limit)",
        type=parse_size)
    idle_unload: float | None = _flag(
        None, "stop a model nobody used for this many seconds; its next request loads it "
        "again (default: never)", type=float)
    webui: bool = _flag(True, "the chat page at / (default: on; --no-webui: off)",
                        action=argparse.BooleanOptionalAction)
    host: str = _flag("127.0.0.1", "bind address (default: %(default)s)")
    port: int = _flag(8000, "port (default: %(default)s)", type=int)
    provider: str = _flag(
        "cpu", f"{'|'.join(PROVIDERS)} or an ORT provider name (default: %(default)s); a "
        "provider this onnxruntime lacks is an error; only 'auto' falls back")
    threads: int | None = _flag(
        None, "ORT intra-op threads (default: the CPUs this process may use)", type=int)
    max_length: int | None = _flag(
        None, "context per slot, prompt + completion (default: the export's max length)",
        type=int)
    max_batch: int = _flag(4, "KV slots: sequences decoded together (default: %(default)s)",
                           type=int)
    # 256 on CPU, where a chunk's attention to itself is the quadratic part: 1000 tokens in
    # 0.92-1.00 s at 256 vs 1.05-1.28 s at 512. 2048 on GPUs, where a call of up to a few
    # thousand tokens costs its kernel launches (H200, default model: 3.7 ms at 16 or 512
    # tokens), so 64 chat prompts arriving together go in one step.
    prefill_chunk: int | None = _flag(
        None, "prompt tokens an engine step prefills, across the prompts it prefills "
        "together (padding counted), so a long prompt does not stall the other streams "
        "(default: 256 on CPU, 2048 on GPUs)", type=int)
    api_key: str | None = _flag(
        None, "require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
        f"(visible in ps: prefer --api-key-file or ${API_KEY_ENV})")
    protect_metrics: bool = _flag(
        False, "require the API key on /metrics too (/health stays open)", action="store_true")
    allow_special_in_content: bool = _flag(
        False, "encode special-token text inside message content as the special tokens, as "
        "Hugging Face does (default: as plain text, so a message cannot forge the chat "
        "template's markup)", action="store_true")
    log_level: str = _flag("info", "Python / uvicorn log level (default: %(default)s)",
                           choices=["critical", "error", "warning", "info", "debug"])
    max_body_bytes: int = _flag(8 * 1024 * 1024,
                                "larger request bodies get 413 (default: %(default)s)", type=int)
    max_queue: int = _flag(
        256, "requests that may wait for a slot; more get 429 + Retry-After "
        "(default: %(default)s)", type=int)
    queue_timeout: float | None = _flag(
        DEFAULT_QUEUE_TIMEOUT, "seconds a request may wait for a slot before it gets 503 "
        "(default: %(default)g, the OpenAI clients' own timeout; 0: no limit)", type=float)
    # KV memory is preallocated per slot: this bounds the reusable (and the reported in-use)
    # KV, not the allocation.
    prefix_cache_size: int | None = _flag(
        None, "tokens idle slots keep for reuse by prompts with the same prefix, LRU "
        "(default: all they hold; 0: off)", type=int)
    cors_origins: tuple[str, ...] = _flag(
        (), "comma-separated origins allowed by CORS, or '*' (default: CORS off)",
        type=_origins)
    log_prompts: bool = _flag(
        False, "log each request's prompt text (off: prompts are never logged)",
        action="store_true")
    drain_timeout: float = _flag(
        15.0, "after SIGTERM/SIGINT, seconds running requests get to finish before they end "
        "with an error; new requests get 503 meanwhile (default: %(default)g)", type=float)
    # Exports with a row-invariant W8A8 graph run every step on it (no padding); older ones
    # pad a lone decode to two rows (int4 MatMulNBits at level 0 has a one-row kernel).
    api_workers: int = _flag(
        1, "HTTP worker processes in front of an engine process of its own (bodies, chat "
        "templates, tokenizing, JSON and SSE off the engine's GIL; for many concurrent "
        f"streams on a GPU), 2 to {MAX_API_WORKERS}; more than the CPUs this process may use "
        "is logged as a warning; 1: everything in one process (default)", type=int)
    batch_invariant: bool | None = _flag(
        None, "the same request (prompt, parameters, seed) gives the same tokens whatever else "
        "runs. Default (auto): on where it is free, i.e. the export's W8A8 graph is "
        "row-invariant (llorch.json graph.w8a8_row_invariant: int4 CPU exports since the "
        "accuracy-level-4 down_proj default), every step then runs on it; --batch-invariant "
        "on other exports pads a lone decode to two rows (12-30%% slower for one stream); "
        "--no-batch-invariant: a lone sequence decodes on the int4 graph (closer to fp32: KL "
        "0.0034 vs 0.0053, and faster), its tokens then depending on the batch. Under the "
        "attention pad (the default with --speculative) it is not free: auto is off there (a "
        "decode step of 2+ sequences runs as one unpadded call), --batch-invariant runs such "
        "a step as one padded call a sequence (4 sequences: 25.8 -> 58.8 ms a step)",
        action=argparse.BooleanOptionalAction)
    attention_pad: bool | None = _flag(
        None, "give every GroupQueryAttention call one extra query row, so that a position "
        "computes the same, bit for bit, in a one-token decode step, a verify call "
        "(--speculative) and any prefill chunk (--provider cpu, exports with llorch.json "
        "graph.attention_pad). Default (auto): on with --speculative where the export has it, "
        "so that a lone stream's greedy --speculative output is plain decoding's under this "
        "flag, token for token. Costs a lone decode step attention over two rows (default "
        "model: +1%% at 60 tokens of context, +10%% at 300, +27%% at 1000). A decode step of "
        "2+ sequences cannot take the pad: it runs as one unpadded call (the server is then "
        "not batch-invariant), or with --batch-invariant as one padded call a sequence "
        "(batch-invariant with or without drafts; 4 sequences: 25.8 -> 58.8 ms a step)",
        action=argparse.BooleanOptionalAction)
    w8a8: str = _flag(
        "auto", "runs on the export's W8A8 graph (int8 GEMMs, smoothed activations): all = "
        "prefill + decode steps of 2+ sequences (every step where batch-invariant), prefill, "
        "off; auto = all where the export has one (default: %(default)s; bare --w8a8: all)",
        nargs="?", const="all",
        choices=W8A8_MODES)
    # Prompt-lookup speculative decoding (serve.speculative); vLLM's speculative-config names.
    # Defaults from bench/spec_prompts (README "Speculative decoding"): unigram lookups
    # (min 1) draft twice as often and lose on open-ended answers; K = 5 is where the
    # grounded prompts' gain levels off.
    speculative: str | None = _flag(
        None, "speculative decoding: ngram = drafts looked up in the sequence's own prompt and "
        "output, verified in one call (faster single-stream decode where the output repeats "
        "its input: summaries, rewrites, code edits); draft = drafts from --draft-model "
        "(default: off)", choices=["ngram", "draft"])
    draft_model: Path | None = _flag(
        None, "--speculative draft: the export that drafts (a smaller or lower-precision "
        "export with the target's tokenizer, e.g. the int4 export of an fp32 target), loaded "
        "with the same --provider and --threads, one KV slot per target slot", type=Path)
    num_speculative_tokens: int = _flag(
        5, "--speculative: draft tokens verified per call (default: %(default)s); with "
        "--speculative ngram and the adaptive gate, each sequence's K at its first draft: it "
        "doubles after a draft accepted whole, up to 12 (or K), and halves after a miss, down "
        "to 2", type=int)
    prompt_lookup_max: int = _flag(
        4, "--speculative ngram: longest n-gram looked up, tried first (default: %(default)s)",
        type=int)
    prompt_lookup_min: int = _flag(
        2, "--speculative ngram: shortest n-gram looked up (default: %(default)s)", type=int)
    speculative_disable_by_batch_size: int = _flag(
        1, "--speculative: draft only while at most this many sequences decode (each drafting "
        "sequence costs a verify call of its own; default: %(default)s)", type=int)
    speculative_adaptive: bool = _flag(
        True, "--speculative: a sequence whose recent drafts cost more verify time than they "
        "save (tokens kept per verify against the measured cost of verifying them) stops "
        "drafting for a few steps, then tries again, backing off longer each time; with "
        "--speculative ngram each sequence's K grows and shrinks with its drafts' success "
        "(default: on; --no-speculative-adaptive: draft K tokens whenever a draft is found)",
        action=argparse.BooleanOptionalAction)
    cuda_graph: bool | None = _flag(
        None, "--provider cuda: decode steps as captured CUDA graphs (one per batch size) on "
        "the export's static decode graph. Default (auto): on where the model runs on CUDA and "
        "its export has that graph (llorch export --target cuda); --no-cuda-graph: eager "
        "steps (one ORT run of every kernel a step: 278 vs 746 tok/s for one stream, H100)",
        action=argparse.BooleanOptionalAction)
    # A step then brings token ids to the host instead of batch x vocab fp32 logits (12.6 MB
    # at 64 streams); rows with a grammar, logit_bias, penalties, token masks (allowed_token_ids,
    # min_tokens) or over 20 logprobs still sample on the host. "on" with the CPU provider is how CI runs that path.
    device_sampling: str = _flag(
        "auto", "pick decode tokens on the execution provider, right after the logits: on = "
        "every row, with any provider; auto = greedy rows on CUDA (a 64-row H200 step 1.6 ms vs "
        "3.3 ms with the logits on the host), sampled rows and other providers on the host; "
        "off = on the host (default: %(default)s)", choices=("auto", "on", "off"))
    responses_store_size: int = _flag(
        1000, "Responses API responses (previous_response_id, GET /v1/responses/{id}) and "
        "Messages API threads kept in memory, LRU, per process (default: %(default)s; 0: none)", type=int)
    tool_call_parser: str = _flag(
        "auto", "the tool-call syntax the model writes; auto: detected from the chat template, "
        "'generic' for templates without tool support (default: %(default)s)",
        choices=("auto", *TOOL_PARSERS))
    reasoning_parser: str = _flag(
        "auto", "split <think>...</think> into reasoning_content: think, none, or auto (when "
        "the chat template mentions <think>; default)", choices=("auto", "none", *REASONING_PARSERS))
    # Scale-out on Ray Serve (serve.scale; needs the .[ray] extra).
    replicas: int | None = _flag(
        None, "serve on Ray Serve with this many replicas of this server, behind Ray's HTTP "
        "proxy on --host/--port (needs pip install 'llorch[ray]'; default: one process, no Ray)",
        type=int)
    min_replicas: int | None = _flag(
        None, "autoscaling on Ray Serve: fewest replicas (default 1; 0: none while idle; "
        "with --max-replicas)", type=int)
    max_replicas: int | None = _flag(
        None, "autoscaling on Ray Serve: most replicas (instead of --replicas)", type=int)
    target_ongoing_requests: float | None = _flag(
        None, "autoscaling: requests in flight per replica Ray Serve scales towards "
        "(default: --max-batch)", type=float)
    ray_address: str | None = _flag(
        None, "join this Ray cluster ('auto': the one 'ray start' made on this machine; "
        "default: start a local Ray for --replicas)")
    gpus_per_replica: float | None = _flag(
        None, "GPUs each replica takes, Ray num_gpus (default: 1 with --provider cuda, else 0)",
        type=float)
    routing: str = _flag(
        "prefix", "how Ray Serve picks a replica: prefix = the one that served the same prompt "
        "prefix (its prefix cache) unless its KV slots are all busy, then the least loaded; "
        "least-loaded = Ray's power-of-two choices (default: %(default)s)",
        choices=["prefix", "least-loaded"])
    ingress_replicas: int | None = _flag(
        None, "Ray Serve: replicas of the ingress that reads each request and routes it "
        "(they share the prefix-affinity table; default: --replicas, or --max-replicas)",
        type=int)
    stream_chunk_rate: float | None = _flag(
        None, "Ray Serve: SSE chunks a second each replica aims to send at most; with 4 or "
        "more requests in flight a stream's events wait up to (requests / rate) s, at most "
        "50 ms, and cross Ray as one chunk (never the first token; 0: every event at once; "
        "default: 1000)", type=float)
    engine_process: bool | None = _flag(
        None, "Ray Serve: each replica runs its engine in a child process of its own, the "
        "replica's process doing HTTP, chat templates, tokenizing and SSE (as --api-workers "
        "does for one process: the engine's steps never wait for that work's GIL). Default "
        "(auto): on for --provider cuda replicas (two H200s: one replica 12,100-13,700 tok/s "
        "at 64 streams instead of 7,900-11,000), off on the CPU",
        action=argparse.BooleanOptionalAction)
    ray_ingress: str = _flag(
        "proxy", "how clients reach the replicas on Ray Serve: proxy = Ray's HTTP proxy, then "
        "llorch's ingress (every chunk crosses both); haproxy = Ray's bundled HAProxy straight to "
        "each replica's own HTTP server (a replica that dies mid-stream cuts its streams instead "
        "of ending them with an error event; a local Ray only) (default: %(default)s)",
        choices=["proxy", "haproxy"])

    def __post_init__(self) -> None:
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir))
        elif self.models_dir is None:
            raise ValueError("no model: give a model directory or --models-dir")
        object.__setattr__(self, "more_models", tuple(self.more_models))
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be at least 1, got {self.max_loaded_models}")
        if self.idle_unload is not None and not self.idle_unload > 0:
            raise ValueError(f"idle_unload must be > 0, got {self.idle_unload}")
        object.__setattr__(self, "cors_origins", tuple(self.cors_origins))
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.queue_timeout == 0:  # 0 = no limit
            object.__setattr__(self, "queue_timeout", None)
        if self.queue_timeout is not None and not self.queue_timeout > 0:
            raise ValueError(f"queue_timeout must be > 0 (or 0 for no limit), got {self.queue_timeout}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        if self.protect_metrics and self.api_key is None:
            raise ValueError("--protect-metrics needs an API key (--api-key, --api-key-file or "
                             f"${API_KEY_ENV})")
        if self.prefix_cache_size is not None and self.prefix_cache_size < 0:
            raise ValueError(f"prefix_cache_size must be >= 0, got {self.prefix_cache_size}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if not 1 <= self.api_workers <= MAX_API_WORKERS:
            raise ValueError(f"--api-workers must be between 1 (one process, the default) and "
                             f"{MAX_API_WORKERS}, got {self.api_workers}")
        if self.api_workers > 1 and self.idle_unload is not None:
            raise ValueError("--idle-unload does not go with --api-workers: the engine process keeps the "
                             "model loaded until the server stops")
        if self.api_workers > 1 and self.scale_out:
            raise ValueError("--api-workers and --replicas/--max-replicas do not go together: "
                             "each Ray Serve replica is one process")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {self.responses_store_size}")
        if self.tool_call_parser not in ("auto", *TOOL_PARSERS):
            raise ValueError(f"tool_call_parser must be auto or one of {', '.join(TOOL_PARSERS)}, "
                             f"not {self.tool_call_parser!r}")
        if self.reasoning_parser not in ("auto", "none", *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be auto, none or one of "
                             f"{', '.join(REASONING_PARSERS)}, not {self.reasoning_parser!r}")
        self._check_scale_out()
        self._check_speculative()
        if self.cuda_graph is True and self.provider not in ("cuda", "CUDAExecutionProvider",
                                                              "auto"):
            raise ValueError(f"--cuda-graph needs --provider cuda, not {self.provider}")
        if self.device_sampling not in ("auto", "on", "off"):
            raise ValueError(f"device_sampling must be auto, on or off, not {self.device_sampling!r}")


    def _check_speculative(self) -> None:
        """A sub-flag that the --speculative method in effect does not read would change
        nothing: say so, never ignore it."""
        if self.draft_model is not None:
            object.__setattr__(self, "draft_model", Path(self.draft_model))
        if self.speculative == "draft" and self.draft_model is None:
            raise ValueError("--speculative draft needs --draft-model DIR (the export that drafts)")
        if self.speculative is not None:
            self.speculative_config()  # ValueError on out-of-range values
            if self.batch_invariant is True and not self.attention_pad_in_effect():
                raise ValueError(
                    "--batch-invariant cannot hold with --speculative without the attention pad "
                    "(--no-attention-pad, or an export without llorch.json graph.attention_pad: "
                    "re-export it with this llorch): a verify call computes several positions of "
                    "a sequence at once, in another attention kernel than a one-token step; drop "
                    "one of the two")
        defaults = {f.name: f.default for f in fields(self)}
        needs = {"num_speculative_tokens": None, "speculative_disable_by_batch_size": None,
                 "speculative_adaptive": None,
                 "prompt_lookup_max": "ngram", "prompt_lookup_min": "ngram",
                 "draft_model": "draft"}  # flag -> the method that reads it (None: any)
        groups: dict[str, list[str]] = {}
        for name, method in needs.items():
            unread = self.speculative is None or method not in (None, self.speculative)
            if unread and getattr(self, name) != defaults[name]:
                with_ = "--speculative" + (f" {method}" if method else "")
                groups.setdefault(with_, []).append("--" + name.replace("_", "-"))
        if groups:
            raise ValueError("; ".join(
                f"{', '.join(flags)} only appl{'y' if len(flags) > 1 else 'ies'} with {with_}"
                for with_, flags in groups.items()))
        if self.draft_model is not None and (self.more_models or self.models_dir is not None):
            raise ValueError("--draft-model drafts for one target model: give one model "
                             "directory (no more DIRs, no --models-dir)")

    def attention_pad_in_effect(self) -> bool:
        """Whether the runtime takes the attention pad (`RuntimeOptions.attention_pad`):
        --attention-pad as given, else (auto) with --speculative where the export has it."""
        if self.attention_pad is not None:
            return self.attention_pad
        return self.speculative is not None and bool(export_graph(self.model_dir).get("attention_pad"))

    def speculative_config(self):
        """The engine's `serve.speculative.SpeculativeConfig` (None: --speculative off).

        Raises:
            ValueError: a --num-speculative-tokens / --prompt-lookup-* value out of range.
        """
        if self.speculative is None:
            return None
        from serve.speculative import SpeculativeConfig  # the engine's modules: not for --help

        return SpeculativeConfig(
            num_speculative_tokens=self.num_speculative_tokens,
            prompt_lookup_max=self.prompt_lookup_max, prompt_lookup_min=self.prompt_lookup_min,
            disable_by_batch_size=self.speculative_disable_by_batch_size,
            adaptive=self.speculative_adaptive)

    @property
    def runtime_device_sampling(self) -> bool | None:
        """``device_sampling`` as `RuntimeOptions.device_sampling` takes it (None: auto)."""
        return {"auto": None, "on": True, "off": False}[self.device_sampling]

    @property
    def scale_out(self) -> bool:
        """Serve on Ray Serve (`serve.scale`) rather than in this one process."""
        return self.replicas is not None or self.max_replicas is not None

    @property
    def engine_process_in_effect(self) -> bool:
        """Whether each Ray Serve replica runs its engine in a child process: --engine-process
        as given, else (auto) for CUDA replicas."""
        if self.engine_process is not None:
            return self.engine_process
        return self.scale_out and self.provider in ("cuda", "CUDAExecutionProvider")

    def _check_scale_out(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.replicas is not None and (self.min_replicas or self.max_replicas):
            raise ValueError("give --replicas or --min-replicas/--max-replicas, not both")
        if self.min_replicas is not None and self.max_replicas is None:
            raise ValueError("--min-replicas needs --max-replicas")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas or 1):
            raise ValueError(f"max_replicas must be >= max(1, min_replicas), got {self.max_replicas}")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise ValueError(f"min_replicas must be >= 0, got {self.min_replicas}")
        if self.target_ongoing_requests is not None and not self.target_ongoing_requests > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        if self.gpus_per_replica is not None and self.gpus_per_replica < 0:
            raise ValueError(f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        if self.ingress_replicas is not None and self.ingress_replicas < 1:
            raise ValueError(f"ingress_replicas must be at least 1, got {self.ingress_replicas}")
        if self.stream_chunk_rate is not None and self.stream_chunk_rate < 0:
            raise ValueError(f"stream_chunk_rate must be >= 0, got {self.stream_chunk_rate}")
        if self.idle_unload is not None and self.engine_process_in_effect:
            raise ValueError("--idle-unload does not go with --engine-process (on by default for CUDA "
                             "replicas): each replica's engine process keeps the model loaded until "
                             "the replica stops (give --no-engine-process to unload idle models)")
        if self.ray_ingress == "haproxy":
            if self.ray_address is not None:
                raise ValueError("--ray-ingress haproxy needs a local Ray (Ray Serve reads the "
                                 "switch from every Ray process's environment): drop --ray-address")
            given = [flag for flag, value in (("--ingress-replicas", self.ingress_replicas),
                                              ("--stream-chunk-rate", self.stream_chunk_rate))
                     if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} configures the proxy path, not "
                                 "--ray-ingress haproxy")
        if not self.scale_out:
            if self.ray_ingress != "proxy":
                raise ValueError("--ray-ingress needs --replicas or --max-replicas")
            given = [flag for flag, value in (
                ("--target-ongoing-requests", self.target_ongoing_requests),
                ("--ray-address", self.ray_address),
                ("--gpus-per-replica", self.gpus_per_replica),
                ("--ingress-replicas", self.ingress_replicas),
                ("--stream-chunk-rate", self.stream_chunk_rate),
                ("--engine-process", self.engine_process or None)) if value is not None]
            if given:
                raise ValueError(f"{', '.join(given)} needs --replicas or --max-replicas")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The serve flags: one per `ServeOptions` field (model_dir excluded), as the field says."""
    for f in _flags():
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=f.default, **f.metadata)
    parser.add_argument("--api-key-file", type=Path, default=None,
                        help="read the API key from this file (first line)")


def api_key_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> str | None:
    """The API key: --api-key, else --api-key-file's first line, else $LLORCH_API_KEY.

    Raises:
        ValueError: more than one source given, or the file is unreadable or empty.
    """
    environ = os.environ if environ is None else environ
    flag, path = getattr(args, "api_key", None), getattr(args, "api_key_file", None)
    if flag is not None and path is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read the API key file {path}: {exc}") from None
        if not lines or not lines[0].strip():
            raise ValueError(f"the API key file {path} is empty")
        return lines[0].strip()
    if flag is not None:
        return flag
    return environ.get(API_KEY_ENV) or None


def options_from_args(models: Path | str | list[Path | str], args: argparse.Namespace) -> ServeOptions:
    """`ServeOptions` from the model directories (``DIR`` or ``DIR=alias``; the first is the
    default model) and flags parsed with `add_arguments`.

    Raises:
        ValueError: flags that contradict each other or are out of range.
    """
    specs = [ModelSpec.parse(m) for m in (models if isinstance(models, list) else [models])]
    values = {f.name: getattr(args, f.name) for f in _flags()}
    values["api_key"] = api_key_from(args)
    if len(specs) > 1 and values["model_name"] is not None:
        raise ValueError("--model-name names the only model; with several, write DIR=alias")
    if specs and specs[0].name is not None:
        if values["model_name"] is not None:
            raise ValueError("give --model-name or DIR=alias, not both")
        values["model_name"] = specs[0].name
    return ServeOptions(model_dir=specs[0].path if specs else None, more_models=tuple(specs[1:]),
                        **values)


def _flags() -> list[Field]:
    return [f for f in fields(ServeOptions) if f.name != "model_dir" and f.metadata.get("flag", True)]
