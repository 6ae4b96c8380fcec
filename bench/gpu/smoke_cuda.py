"""A tiny random Llama exported for --target cuda, run on the GPU against the CPU provider.

Needs no model download: the checkpoint (vocab 512, word-level tokenizer) is written here.
Checks, for fp16 and int4: CudaRuntime (KV on the device, IO binding by pointer) gives the
same logits as the plain Runtime on ONNX Runtime's CPU provider, through batched decode, row
swaps and copy_slot; then whether CUDA graph capture runs. Prints one JSON object.

    python bench/gpu/smoke_cuda.py [--device cuda|cpu] [--out smoke.json]

``--device cpu`` runs the same pointer-bound plan on host memory (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "vocab_size": 512, "bos_token_id": 1, "eos_token_id": 2,
}


def tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from export.config import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig.from_hf(CONFIG)
    rng = np.random.default_rng(seed)
    tensors = {n: ((1 + 0.1 * rng.standard_normal(s)) if n.endswith("norm.weight")
                   else 0.2 * rng.standard_normal(s)).astype(np.float32)
               for n, s in cfg.expected_shapes().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(CONFIG))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return out


def run_script(rt, prompts, steps) -> list[np.ndarray]:
    """Prefill every slot, decode in shifting subsets (row swaps), copy a slot, decode again."""
    outs = [rt.prefill(j, p) for j, p in enumerate(prompts)]
    for order in steps:
        outs.append(rt.decode(order, [(7 * j + len(outs)) % 500 + 3 for j in order]).copy())
    rt.copy_slot(len(prompts) - 1, 0)
    outs.append(rt.decode([0, len(prompts) - 1], [9, 9]).copy())
    return [np.asarray(o, np.float32) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and args.device == "cuda":
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, where present
        except Exception as e:  # noqa: BLE001 - LD_LIBRARY_PATH may still provide them
            print(f"preload_dlls: {e}", file=sys.stderr)
    from export.api import export_model
    from serve.model_dir import load_model_info
    from serve.runtime import RuntimeOptions, open_runtime
    from serve.runtime.cuda import CudaRuntime

    report = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    provider = "cuda" if args.device == "cuda" else "cpu"
    rng = np.random.default_rng(1)
    prompts = [list(map(int, rng.integers(3, 500, n))) for n in (5, 17, 40)]
    steps = [[0, 1, 2], [2, 0], [1, 2, 0], [2], [0, 1, 2]]
    with tempfile.TemporaryDirectory() as tmp:
        hf = tiny_checkpoint(Path(tmp) / "hf")
        for precision in ("fp16", "int4"):
            r = report[precision] = {}
            try:
                d = Path(tmp) / precision
                export_model(hf, d, precision=precision, target="cuda", progress=False)
                want = run_script(open_runtime(d, RuntimeOptions(max_batch=3)), prompts, steps)
                t0 = time.perf_counter()
                got = run_script(CudaRuntime(load_model_info(d),
                                             RuntimeOptions(provider=provider, max_batch=3),
                                             device=args.device), prompts, steps)
                r["seconds"] = time.perf_counter() - t0
                diff = max(float(np.abs(a - b).max()) for a, b in zip(want, got, strict=False))
                scale = max(float(np.abs(a).max()) for a in want)
                r.update(max_abs_diff=diff, rel_diff=diff / scale,
                         argmax_agree=float(np.mean([np.array_equal(a.argmax(-1), b.argmax(-1))
                                                     for a, b in zip(want, got, strict=False)])))
                try:
                    graph = run_script(CudaRuntime(load_model_info(d), RuntimeOptions(
                                           provider=provider, max_batch=3, cuda_graph=True),
                                                   device=args.device),
                                       prompts, steps + steps)
                    r["cuda_graph"] = "ran"
                    first = len(prompts) + len(steps)  # same calls as the uncaptured run
                    r["cuda_graph_max_abs_diff"] = max(
                        float(np.abs(a - b).max()) for a, b in zip(want[:first], graph[:first], strict=False))
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    r["cuda_graph"] = f"failed: {type(e).__name__}: {e}"[:600]
            except Exception as e:  # noqa: BLE001
                r["error"] = f"{type(e).__name__}: {e}"[:800]
                r["traceback"] = traceback.format_exc()[-1500:]
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
