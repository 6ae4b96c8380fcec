"""Greedy generation on a Runtime: the reference tokens the GPU parity check compares with.

    python bench/gpu/greedy.py MODEL_DIR --out ref.json [--provider cpu] [--tokens 48]

Writes {"prompts": [...], "ids": [[prompt ids]], "tokens": [[greedy ids]], "logits0": file}
where logits0 (an .npy beside the JSON) holds the fp32 logits after each prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three prime numbers greater than 10.",
)


def chat_ids(model_dir: Path, prompts=PROMPTS) -> list[list[int]]:
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]),
                       add_special_tokens=False) for p in prompts]


def eos_ids(model_dir: Path) -> frozenset[int]:
    """The ids that end generation, as the server reads them (`Tokenizer.eos_ids`)."""
    from serve.tokenizer import Tokenizer

    return Tokenizer.from_dir(model_dir).eos_ids


def greedy(rt, ids: list[int], n: int, eos: set[int], slot: int = 0) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after ids (stops at eos); returns (tokens, logits after the prompt)."""
    rt.reset(slot)
    first = rt.prefill(slot, ids)
    out, logits = [], first
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        if t in eos:
            break
        logits = rt.decode([slot], [t])[0]
    return out, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(args.model, RuntimeOptions(provider=args.provider, max_length=1024))
    eos = set(eos_ids(args.model))
    ids = chat_ids(args.model)
    t0 = time.perf_counter()
    res = [greedy(rt, p, args.tokens, eos) for p in ids]
    logits_file = args.out.with_suffix(".logits0.npy")
    np.save(logits_file, np.stack([r[1] for r in res]).astype(np.float32))
    args.out.write_text(json.dumps({
        "model": str(args.model), "provider": args.provider, "prompts": list(PROMPTS),
        "ids": ids, "tokens": [r[0] for r in res], "logits0": logits_file.name,
        "seconds": time.perf_counter() - t0}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
