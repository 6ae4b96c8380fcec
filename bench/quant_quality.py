"""Quality of int4 exports against a float export of the same checkpoint: perplexity, per-position
agreement and KL on a fixed text, and greedy answers to short factual questions.

    python -m bench.quant_quality REF_DIR DIR [DIR ...] [--tokens 768] [--new 24]

REF_DIR is the float (fp32) export; each DIR an int4 export of the same weights. The text is
the one tests/test_default_model.py scores (Python's pydoc topics, first `--tokens` tokens);
the questions are "capital of" prompts in the style of the suite's checks, each with and
without a system prompt, greedy, `--new` tokens. Per export it prints (and returns):

    perplexity       exp(mean NLL) of the text, every position scored in one prefill
    top1             share of positions whose argmax equals REF_DIR's
    kl               mean KL(ref || export) over positions, nats
    answers          questions whose answer names the expected city
    same_as_ref      questions whose greedy tokens equal REF_DIR's, token for token
    first_token      questions whose first answer token equals REF_DIR's
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

QUESTIONS = [("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
             ("Japan", "Tokyo"), ("England", "London"), ("Russia", "Moscow"),
             ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon")]
SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def text_ids(tokenizer, n: int) -> list[int]:
    """The first `n` tokens of Python's pydoc topics (tests/test_default_model.py's text)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer.encode(text, add_special_tokens=False)[:n]


def log_probs(model_dir: Path, ids: list[int]) -> np.ndarray:
    """float64 [len(ids), vocab] log-softmax of the logits, one prefill of `ids`."""
    from export.config import LlamaConfig
    from export.verify import onnx_logits

    cfg = LlamaConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    logits = onnx_logits(model_dir, cfg, ids, prefill=len(ids)).astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def greedy(model_dir: Path, tokenizer, messages: list[dict], new: int) -> list[int]:
    """Greedy answer token ids (stops at EOS) through serve's runtime, one sequence."""
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(model_dir, RuntimeOptions(max_batch=1, max_length=512))
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True),
                           add_special_tokens=False)
    logits, out = rt.prefill(0, ids), []
    for _ in range(new):
        t = int(np.argmax(logits))
        if t in tokenizer.eos_ids:
            break
        out.append(t)
        logits = rt.decode([0], [t])[0]
    return out


def prompts() -> list[tuple[list[dict], str]]:
    out = []
    for country, city in QUESTIONS:
        q = {"role": "user", "content": f"What is the capital of {country}?"}
        out += [([q], city), ([{"role": "system", "content": SYSTEM}, q], city)]
    return out


def evaluate(ref: Path, dirs: list[Path], tokens: int = 768, new: int = 24) -> dict:
    """The table of the module docstring, {dir name: {...}} (REF_DIR's own row included)."""
    from serve.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ref)
    ids = text_ids(tok, tokens)
    target = np.array(ids[1:])
    ref_lp = log_probs(ref, ids)[:-1]
    cases = prompts()
    ref_answers = [greedy(ref, tok, m, new) for m, _ in cases]
    rows = {}
    for d in [ref, *dirs]:
        lp = ref_lp if d == ref else log_probs(d, ids)[:-1]
        answers = ref_answers if d == ref else [greedy(d, tok, m, new) for m, _ in cases]
        rows[d.name] = {
            "perplexity": float(np.exp(-lp[np.arange(len(target)), target].mean())),
            "top1": float((lp.argmax(-1) == ref_lp.argmax(-1)).mean()),
            "kl": float((np.exp(ref_lp) * (ref_lp - lp)).sum(-1).mean()),
            "answers": sum(city in tok.decode(a) for a, (_, city) in zip(answers, cases,
                                                                          strict=True)),
            "same_as_ref": sum(a == r for a, r in zip(answers, ref_answers, strict=True)),
            "first_token": sum(a[:1] == r[:1] for a, r in zip(answers, ref_answers, strict=True)),
            "questions": len(cases),
        }
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quant_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", type=Path)
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--new", type=int, default=24)
    args = p.parse_args(argv)
    rows = evaluate(args.ref, args.dirs, args.tokens, args.new)
    print("| export | perplexity | top-1 = ref | KL to ref | answers right | greedy = ref | "
          "first token = ref |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        q = r["questions"]
        print(f"| {name} | {r['perplexity']:.3f} | {r['top1']:.1%} | {r['kl']:.4f} | "
              f"{r['answers']}/{q} | {r['same_as_ref']}/{q} | {r['first_token']}/{q} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
