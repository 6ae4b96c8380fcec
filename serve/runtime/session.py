"""ONNX Runtime plumbing shared by the runtimes: providers, session options, the W8A8 session."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort

from serve.model_dir import ModelInfo
from serve.runtime.interface import ProviderError

log = logging.getLogger("llorch.runtime")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int8)": np.int8}


def resolve_providers(provider: str) -> list[str]:
    """ORT provider list for --provider; never a silent CPU fallback unless 'auto'.

    Args:
        provider: `cpu`, `cuda`, `coreml`, `auto` or a full ORT provider name.
    Returns:
        Provider names, the one asked for first and `CPUExecutionProvider` last.
    Raises:
        ProviderError: the name is unknown, or this onnxruntime build lacks the provider.
    """
    available = ort.get_available_providers()
    if provider == "auto":
        for p in ("CUDAExecutionProvider", "CoreMLExecutionProvider"):
            if p in available:
                return [p, "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    if provider in PROVIDERS:
        wanted = PROVIDERS[provider]
    elif provider.endswith("ExecutionProvider"):
        wanted = provider
    else:
        raise ProviderError(f"unknown provider {provider!r} (choose cpu, cuda, coreml or auto)")
    if wanted not in available:
        raise ProviderError(
            f"--provider {provider}: {wanted} is not available in this onnxruntime "
            f"{ort.__version__} build (available: {', '.join(available)})"
            + ("; install onnxruntime-gpu for CUDA" if provider == "cuda" else "")
        )
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


def on_cuda(provider: str) -> bool:
    """Whether --provider resolves to CUDA; an unavailable one is False (the runtime that
    opens it then raises ProviderError with the full message)."""
    try:
        return resolve_providers(provider)[0] == "CUDAExecutionProvider"
    except ProviderError:
        return False


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    """Sequential execution on ``threads`` intra-op threads (None: `default_threads()`);
    ``spin`` False: idle intra-op threads block at once instead of spinning for the next op
    (two sessions that take turns on the same cores, e.g. a draft model and its target)."""
    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def kv_dtype(session: ort.InferenceSession, info: ModelInfo) -> type:
    """The numpy dtype of the graph's KV cache (its first past-key input): float32, float16 or
    int8 (`llorch export --kv-dtype`)."""
    inputs = {i.name: i for i in session.get_inputs()}
    return _ORT_TYPES.get(inputs[info.past_key % 0].type, np.float32)


def w8a8_unused(mode: str, reason: str) -> None:
    """An explicit --w8a8 that cannot apply says why; auto stays quiet."""
    if mode != "auto":
        log.warning("--w8a8 %s has no effect here: %s; every run uses the main graph",
                    mode, reason)


def open_w8a8_session(info: ModelInfo, mode: str, so: ort.SessionOptions, providers: list
                      ) -> tuple[str, ort.InferenceSession | None]:
    """The export's W8A8 graph (int8 GEMMs: same inputs, outputs and KV buffers as the main
    graph, so the two sessions take turns on one cache) where ``mode`` asks for it.

    Args:
        info: the model; its ``w8a8_file`` is the graph, if the export has one.
        mode: one of `W8A8_MODES`.
        so, providers: the main session's options and providers.
    Returns:
        (the mode in effect: "off", "prefill" or "all"; the session, or None when "off").
        A mode that cannot apply logs why (`w8a8_unused`) and is "off".
    """
    if mode == "off":
        return "off", None
    unusable = (
        "the export has no W8A8 graph (llorch.json graph.w8a8)" if info.w8a8_file is None
        else "its cache grows per step (not shared KV buffers)" if not info.shared_kv
        else f"it is a CPU graph, not one for {providers[0]}"
        if providers[0] != "CPUExecutionProvider" else None)
    if unusable is not None:
        w8a8_unused(mode, unusable)
        return "off", None
    session = ort.InferenceSession(str(info.w8a8_file), so, providers=providers)
    mode = "all" if mode == "auto" else mode
    log.info("W8A8 graph %s: %s run on int8 GEMMs", info.w8a8_file.name,
             "prefill and decode steps (a lone sequence's: see the batch invariance line)"
             if mode == "all" else "prefill")
    return mode, session
