"""``llorch`` command line: export, serve, models.

Each subcommand imports its package lazily, so ``llorch serve`` never loads the exporter.
Flags map one-to-one onto function arguments.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="convert a HF SafeTensors directory or a GGUF file into an ONNX model directory",
        description="Convert a Llama-family checkpoint (HF SafeTensors directory or llama.cpp "
        "GGUF file) into an ONNX model directory with a KV cache; or, with --to-safetensors, "
        "a GGUF into a HF SafeTensors directory.",
    )
    p.add_argument("source", type=Path, help="HF model directory or .gguf file")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("--precision", choices=("fp32", "fp16", "int4"), default="int4",
                   help="weight precision (default: int4)")
    p.add_argument("--target", choices=("cpu", "cuda", "coreml"), default="cpu",
                   help="execution provider the graph is built for (default: cpu)")
    p.add_argument("--max-length", type=int, default=None,
                   help="KV buffer / rotary cache length (default: the model's context length; "
                   "coreml: at most 2048, every step attends over the whole buffer)")
    p.add_argument("--block-size", type=int, default=32, help="int4 block size (default: 32)")
    p.add_argument("--accuracy-level", type=int, default=None, choices=range(5),
                   metavar="{0..4}",
                   help="MatMulNBits accuracy_level (default: 4 on cpu, i.e. int8 compute)")
    p.add_argument("--down-proj-accuracy-level", type=int, default=None, choices=range(5),
                   metavar="{0..4}",
                   help="accuracy_level of the MLP down_proj, whose input carries the activation "
                   "outliers int8 compute distorts most (default: --accuracy-level; 4 makes "
                   "the W8A8 graph row-invariant, so llorch serve is batch-invariant by "
                   "default; 0: fp32 compute, slightly closer to fp32, not row-invariant)")
    p.add_argument("--int4-symmetric", action=argparse.BooleanOptionalAction, default=False,
                   help="int4: symmetric blocks without zero points (ONNX Runtime's implicit "
                   "zero point 8), as ORT GenAI's builder writes them (int4_is_symmetric): no "
                   "float-zero-point correction, fewer bytes per token; GGUF: Q4_0/Q8_0 blocks "
                   "map exactly, other 4-5-bit types are refused (default: off)")
    p.add_argument("--lm-head-bits", type=int, default=8, choices=(0, 4, 8),
                   help="int4 exports: lm_head as 8- or 4-bit MatMulNBits, 0 = float "
                   "(default: 8)")
    p.add_argument("--kv-dtype", choices=("fp32", "fp16", "int8"), default=None,
                   help="cpu: the KV cache's element type; int8 quarters fp32's at the same "
                   "speed (per-channel scales calibrated at export; on the default model within "
                   "int4's own perplexity and greedy-answer tolerance), fp16 halves it but "
                   "decodes about 2x slower (ONNX Runtime widens it every step) (default: int8 "
                   "for cpu int4 exports, else fp32)")
    p.add_argument("--prefill-chunk", type=int, default=64,
                   help="coreml: tokens per call of the static prefill graph (default: 64)")
    p.add_argument("--w8a8-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="cpu: also write model_w8a8.onnx, the decoder with int8 GEMMs (int8 "
                   "weights per channel, smoothed int8 activations per token, calibrated on the "
                   "int4 graph) that llorch serve uses for prefill and batched decode "
                   "(default: on for cpu int4 GroupQueryAttention exports, else off)")
    p.add_argument("--verify", action="store_true",
                   help="compare the export with a NumPy reference forward pass; fail loudly")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--to-safetensors", action="store_true",
                   help="GGUF → HF SafeTensors directory instead of ONNX")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _serve_parser(sub) -> None:
    from serve.options import add_arguments  # dataclass + argparse only: cheap to import

    p = sub.add_parser("serve", help="serve a model directory behind an OpenAI-compatible API")
    p.add_argument("models", nargs="*", metavar="DIR[=alias]",
                   help="model directories, each optionally renamed (DIR=alias); the first is the "
                   "default model, for requests without 'model' (default: prepare and serve "
                   "SmolLM2-135M-Instruct int4, unless --models-dir is given)")
    add_arguments(p)


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="prepare the default model")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    f = msub.add_parser("fetch", help="fetch SmolLM2-135M-Instruct and export it")
    f.add_argument("name", nargs="?", default="smollm2", choices=("smollm2",))
    f.add_argument("--variants", default="int4,fp32",
                   help="comma-separated exports to build (default: int4,fp32)")
    f.add_argument("--root", type=Path, default=None, help="models directory")


DESCRIPTION = ("llorch: an OpenAI-compatible LLM server on ONNX Runtime, and a torch-free "
               "exporter of Llama-family checkpoints to ONNX.")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; no subcommand prints the help (exit 0)."""
    from llorch import __version__

    parser = argparse.ArgumentParser(prog="llorch", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"llorch {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="{export,serve,models}")
    _export_parser(sub)
    _serve_parser(sub)
    _models_parser(sub)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "serve" and not any(r.startswith("-") for r in rest):
        args.models += rest  # `llorch serve A --port 8000 B`: both are models
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd is None:
        parser.print_help()
        return 0
    if args.cmd == "export":
        return _run_export(args)
    if args.cmd == "models":
        return _run_models(args)
    return _run_serve(args)


def _run_export(args) -> int:
    try:
        from export.config import ExportError
    except ImportError as e:
        print(f"llorch export needs the exporter's dependencies: pip install 'llorch[export]' "
              f"({e})", file=sys.stderr)
        return 2
    try:
        if args.to_safetensors:
            from export.gguf_to_hf import gguf_to_hf

            out = gguf_to_hf(args.source, args.output, force=args.force,
                             progress=not args.quiet)
            print(f"wrote {out}")
            return 0
        from export.api import export_model

        summary = export_model(
            args.source, args.output, precision=args.precision, target=args.target,
            max_length=args.max_length, block_size=args.block_size,
            accuracy_level=args.accuracy_level, verify=args.verify, force=args.force,
            progress=not args.quiet, lm_head_bits=args.lm_head_bits,
            down_proj_accuracy_level=args.down_proj_accuracy_level,
            prefill_chunk=args.prefill_chunk, w8a8_graph=args.w8a8_graph,
            kv_dtype=args.kv_dtype, int4_symmetric=args.int4_symmetric,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.render())
    return 0


def _run_models(args) -> int:
    from export.default_model import ensure_default_model

    paths = ensure_default_model(root=args.root, variants=tuple(args.variants.split(",")))
    for k, v in paths.items():
        print(f"{k}: {v}")
    return 0


def _default_model_dir() -> Path:
    """Prepare the default model in a child process: serve must not import the exporter."""
    code = ("from export.default_model import ensure_default_model; "
            "print(ensure_default_model(variants=('int4',))['int4'])")
    res = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        raise SystemExit("error: could not prepare the default model (see above); "
                         "it needs pip access to PyPI and the exporter: pip install 'llorch[export]'")
    return Path(res.stdout.strip().splitlines()[-1])


def _run_serve(args) -> int:
    from serve.main import serve_args

    models = args.models or ([] if args.models_dir is not None else [_default_model_dir()])
    return serve_args(models, args)


if __name__ == "__main__":
    sys.exit(main())
