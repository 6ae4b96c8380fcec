"""The runtime: ONNX Runtime sessions over an export's graphs and the KV cache of its slots.

`open_runtime(model_dir, options)` reads the model directory once and picks the class; every
class implements the `Runtime` protocol (`serve.runtime.interface`), which is all the engine
uses::

    llorch.json graph.variant "static-kv-host" (--target coreml) → StaticRuntime   static.py
    no shared KV buffers (optimum-cli decoders)                  → GrowingKVRuntime growing.py
    GroupQueryAttention graph, --provider resolving to CUDA      → CudaRuntime      cuda.py
    GroupQueryAttention graph, any other provider                → HostRuntime      shared_kv.py

The modules below this one import only `interface`, `session` and `slots` (never each other's
classes except `cuda` → `shared_kv`), so the package has no import cycle.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from serve.model_dir import load_model_info
from serve.runtime.interface import (
    W8A8_MODES,
    ContextFull,
    ProviderError,
    RowDraw,
    RowToken,
    Runtime,
    RuntimeOptions,
    cuda_graph_in_effect,
)

__all__ = ["W8A8_MODES", "ContextFull", "ProviderError", "RowDraw", "RowToken", "Runtime",
           "RuntimeOptions", "open_runtime"]


def open_runtime(model_dir: Path | str, options: RuntimeOptions | None = None) -> Runtime:
    """Open ``model_dir`` for serving: its sessions loaded, ``options.max_batch`` empty slots.

    Args:
        model_dir: an export (llorch, ONNX Runtime GenAI's builder, optimum-cli).
        options: provider, threads, slots, tokens a slot, W8A8 and CUDA-graph use (None:
            `RuntimeOptions()`, one slot on the CPU).
    Returns:
        The runtime for the directory's layout and the provider (module docstring's table).
    Raises:
        ModelDirError: the directory is not a usable model directory.
        ProviderError: this onnxruntime build lacks ``options.provider``.
        ValueError: ``options.max_length`` exceeds the export's, ``options.cuda_graph``
            where decode does not run on CUDA or the export has no static decode graph, or
            ``options.device_sampling`` True for an export without shared KV buffers, or
            ``options.attention_pad`` for another runtime than `HostRuntime` or an export
            without the pad.
    """
    # the classes import onnxruntime: only here, so `serve.options` stays cheap to import
    from serve.runtime.cuda import CudaRuntime
    from serve.runtime.growing import GrowingKVRuntime
    from serve.runtime.session import on_cuda, resolve_providers
    from serve.runtime.shared_kv import HostRuntime
    from serve.runtime.static import VARIANT, StaticRuntime

    options = options or RuntimeOptions()
    info = load_model_info(model_dir)
    if info.graph.get("variant") == VARIANT:  # --target coreml: host-side KV
        cls = StaticRuntime
    elif not info.shared_kv:
        cls = GrowingKVRuntime
    elif on_cuda(options.provider):  # KV on the GPU, IO binding by pointer
        cls = CudaRuntime
    else:
        cls = HostRuntime
    if options.cuda_graph is None:  # auto
        options = replace(options, cuda_graph=cuda_graph_in_effect(
            None, cls is CudaRuntime, info.graph))
    if options.cuda_graph and cls is not CudaRuntime:
        resolve_providers(options.provider)  # an unavailable provider: ProviderError says so
        raise ValueError(f"{model_dir}: cuda_graph needs --provider cuda and a GroupQueryAttention "
                         f"export (provider {options.provider}, {cls.__name__})")
    if options.attention_pad and cls is not HostRuntime:
        raise ValueError(f"{model_dir}: the attention pad is for GroupQueryAttention exports "
                         f"with host KV (--provider cpu), not {cls.__name__}")
    if options.device_sampling and cls not in (CudaRuntime, HostRuntime):
        raise ValueError(f"{model_dir}: device sampling needs a GroupQueryAttention export "
                         f"({cls.__name__} returns logits)")
    return cls(info, options)
