"""Tiny synthetic GGUF files for tests: a random Llama written the way llama.cpp converts one.

`llama_cpp_permute` is llama.cpp's `convert_hf_to_gguf.py` Q/K permutation, so a reader that
undoes it must give back the HF weights the file was written from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_PIECES = [
    "▁", "e", "h", "l", "o", "w", "r", "d", "a", "t", "s", "i", "n",
    "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld", "orld", "▁world",
    "▁a", "▁t", "▁th", "he", "▁the", "in", "▁in", "st", "▁st", "at", "▁at",
]  # fmt: skip


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocab: <unk> <s> </s>, 256 byte tokens, pieces, a user token."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256
    seen = set(tokens)
    for piece in SPM_PIECES:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(NORMAL)
    tokens.append("<tool>")
    types.append(USER_DEFINED)
    # SentencePiece scores: log-probabilities, more frequent (earlier) pieces higher.
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    bs += list(range(0xAE, 0xFF + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocab: 2 control tokens, 256 byte chars, a few merges."""
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    tokens = ["<|endoftext|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in merges]
    types = [CONTROL, CONTROL] + [NORMAL] * (len(tokens) - 2)
    return tokens, merges, types


def tiny_config(vocab_size: int) -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
    }


def random_state(cfg: dict[str, Any], *, seed: int = 0, tied: bool = True) -> dict[str, np.ndarray]:
    """HF-named float32 weights of a random Llama."""
    rng = np.random.default_rng(seed)
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def w(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    state = {"model.embed_tokens.weight": w(cfg["vocab_size"], h, scale=0.5)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        state[p + "input_layernorm.weight"] = 1 + w(h)
        state[p + "self_attn.q_proj.weight"] = w(q, h)
        state[p + "self_attn.k_proj.weight"] = w(kv, h)
        state[p + "self_attn.v_proj.weight"] = w(kv, h)
        state[p + "self_attn.o_proj.weight"] = w(h, q)
        state[p + "post_attention_layernorm.weight"] = 1 + w(h)
        state[p + "mlp.gate_proj.weight"] = w(i, h)
        state[p + "mlp.up_proj.weight"] = w(i, h)
        state[p + "mlp.down_proj.weight"] = w(h, i)
    state["model.norm.weight"] = 1 + w(h)
    if not tied:
        state["lm_head.weight"] = w(cfg["vocab_size"], h)
    return state


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf: str) -> str:
    if hf in _TO_GGUF:
        return _TO_GGUF[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


def write_gguf(
    path: Path,
    *,
    arch: str = "llama",
    cfg: dict[str, Any] | None = None,
    state: dict[str, np.ndarray] | None = None,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tokenizer: str = "llama",
    pre: str | None = None,
    extra: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a GGUF the way llama.cpp's converter lays one out (Q/K permuted).

    Args:
        qtype: storage type of 2-D weights (norms stay F32).
        tokenizer: "llama" (SentencePiece-style, spm_vocab) or "gpt2" (bpe_vocab).
        extra: more metadata; values typed by Python type (str, bool, int -> uint32, float).
    """
    if tokenizer == "llama":
        tokens, scores, types = spm_vocab()
        merges = None
    else:
        tokens, merges, types = bpe_vocab()
        scores = None
    cfg = cfg or tiny_config(len(tokens))
    state = state if state is not None else random_state(cfg)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if arch == "llama":
        w.add_block_count(cfg["num_hidden_layers"])
        w.add_context_length(cfg["max_position_embeddings"])
        w.add_embedding_length(cfg["hidden_size"])
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_head_count(cfg["num_attention_heads"])
        w.add_head_count_kv(cfg["num_key_value_heads"])
        w.add_rope_dimension_count(cfg["head_dim"])
        w.add_rope_freq_base(cfg["rope_theta"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model(tokenizer)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    if tokenizer == "llama":
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    else:
        w.add_bos_token_id(0)
        w.add_eos_token_id(1)
        w.add_pad_token_id(1)
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)

    for name, t in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gguf_tensor_name(name), t.astype(np.float16))
            else:
                # the writer takes the byte shape and works out the element shape
                w.add_tensor(
                    gguf_tensor_name(name), gguf.quants.quantize(t, qtype), raw_dtype=qtype
                )
        else:
            w.add_tensor(gguf_tensor_name(name), t)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
