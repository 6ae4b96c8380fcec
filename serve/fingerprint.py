"""`system_fingerprint`: which build of the backend answered, as OpenAI sends it.

A client that fixes `seed` can compare fingerprints to know whether the same request may now
give other text. So the hash covers everything that changes the numbers: the model files
(name, size and modification time of each file in the model directory — the weights, graphs
and tokenizer — plus the content of the small JSON files that describe them, which carry the
source's sha256 for llorch exports), the llorch version, the execution provider (``auto``
resolved to the one it picks), and the flags that pick other kernels (`--w8a8`, the
batch-invariance mode in effect, CUDA graphs in effect, `--max-batch`, `--prefill-chunk`; the
last two not where the server is batch-invariant on a row-invariant graph, whose numbers they
do not change; the attention pad in effect; the `--speculative` settings where drafts change
numbers). Not the port, the key or the queue settings: they change no output.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

from serve.options import ServeOptions, export_graph
from serve.runtime.interface import (
    ProviderError,
    cuda_graph_in_effect,
    decodes_apart,
    main_row_invariant,
    w8a8_row_invariant,
)

_DESCRIBING = (".json", ".jinja")  # small files hashed by content
_MAX_HASHED_BYTES = 4 * 1024 * 1024


def llorch_version() -> str:
    """The installed llorch distribution's version ("unknown" when run from a bare tree)."""
    try:
        return importlib.metadata.version("llorch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def batch_invariance(options: ServeOptions) -> str:
    """How a request's numbers relate to its batch, from the flags and the export's llorch.json
    (as `serve.runtime.shared_kv` and `serve.engine` decide it at load): "rows" (every decode
    step on one row-invariant graph, the main one or the W8A8 one: the default on such
    exports, or `--batch-invariant`; with
    the attention pad only `--batch-invariant`, whose steps of 2+ sequences run one call
    each), "rows-batched" (the attention pad with batch invariance on auto, the default with
    `--speculative`: every step on that graph, but a step of 2+ sequences as one unpadded
    call, so not batch-invariant), "padded" (`--batch-invariant` elsewhere: a lone decode
    padded to two rows) or "off"."""
    if options.batch_invariant is False:
        return "off"
    graph = export_graph(options.model_dir)
    rows = ((w8a8_row_invariant(graph, options.w8a8) or main_row_invariant(graph, options.w8a8))
            and provider(options) == "CPUExecutionProvider")  # CUDA picks kernels by batch
    pad = options.attention_pad_in_effect()
    if pad and not decodes_apart(options.batch_invariant, pad):
        return "rows-batched" if rows else "off"
    return "rows" if rows else "padded" if options.batch_invariant else "off"


def provider(options: ServeOptions) -> str:
    """The ONNX Runtime provider ``--provider`` resolves to (`resolve_providers`: ``auto`` is
    CUDA or CoreML where this build has them, else the CPU), so that ``auto`` and the provider
    it picks share a fingerprint; the flag as given where it resolves to nothing (the model
    then fails to load)."""
    from serve.runtime.session import resolve_providers  # imports onnxruntime: only here

    try:
        return resolve_providers(options.provider)[0]
    except ProviderError:
        return options.provider


def cuda_graph(options: ServeOptions) -> bool:
    """Whether decode steps run as captured CUDA graphs, the flag's auto resolved as
    `serve.runtime.open_runtime` resolves it (`cuda_graph_in_effect`)."""
    from serve.runtime.session import on_cuda  # imports onnxruntime: only here

    return cuda_graph_in_effect(options.cuda_graph, on_cuda(options.provider),
                                export_graph(options.model_dir))


def system_fingerprint(options: ServeOptions) -> str:
    """`fp_` + 16 hex digits, stable across restarts of the same files and flags."""
    h = hashlib.sha256()

    def add(*parts: object) -> None:
        h.update(json.dumps(parts, default=str).encode())
        h.update(b"\0")

    add("llorch", llorch_version())
    mode = batch_invariance(options)
    # batch-invariant on a row-invariant graph: the slot count and the prefill budget change
    # no number (README "Determinism"), so they are left out
    sizes = () if mode == "rows" else (options.max_batch, options.prefill_chunk)
    add("options", provider(options), options.w8a8, mode, cuda_graph(options),
        options.device_sampling, *sizes)
    pad = options.attention_pad_in_effect()
    if pad:
        add("attention_pad")
    # verify calls run other kernels than one-token steps, unless the attention pad makes
    # them compute what one-token steps do: then speculation changes no number, except where
    # sequences draft beside others while plain steps of 2+ sequences run unpadded
    # ("rows-batched": a verify call is padded, the batched step it replaces is not)
    beside = mode == "rows-batched" and options.speculative_disable_by_batch_size > 1
    if options.speculative is not None and (not pad or beside):
        add("speculative", options.speculative, options.num_speculative_tokens,
            options.prompt_lookup_max, options.prompt_lookup_min,
            options.speculative_disable_by_batch_size, options.draft_model)
    model_dir = Path(options.model_dir)
    files = sorted(p for p in model_dir.iterdir() if p.is_file()) if model_dir.is_dir() else []
    for path in files:
        stat = path.stat()
        add("file", path.name, stat.st_size, stat.st_mtime_ns)
        if path.suffix in _DESCRIBING and stat.st_size <= _MAX_HASHED_BYTES:
            h.update(path.read_bytes())
    return "fp_" + h.hexdigest()[:16]
