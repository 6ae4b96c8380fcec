"""Parity of `llorch export` with transformers (torch, CPU) on tiny random checkpoints.

Every checkpoint here is written by transformers itself (`save_pretrained`, in fp32, bf16 or
fp16, one file or sharded) and read back by `from_pretrained` as the reference, so the
exporter's reader, config parsing and graph are all checked against an independent
implementation. The models are tiny (hidden 64, 2 layers, vocab 512) with a small byte-level
BPE tokenizer built here.

Weights are drawn larger than transformers' default init (std 0.2, norms 1 ± 0.2, random
biases): with std 0.02 the attention would be near uniform and the logits near zero, and a
wrong rotary or a missing bias would hide under any tolerance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from export.api import export_model
from export.config import LlamaConfig
from export.verify import onnx_logits
from serve.runtime import RuntimeOptions, open_runtime

VOCAB = 512
FP32_TOL = 1e-3  # max |Δlogits|, prefill and decode steps alike
FP16_REL_TOL = 1e-2  # fp16 weights vs the fp32 model, relative to the logit scale

ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
}
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@dataclass(frozen=True)
class Case:
    arch: str = "llama"
    config: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32  # what save_pretrained writes
    shard: str | None = None  # save_pretrained(max_shard_size=...)
    seq_len: int = 24


CASES = {
    "gqa-untied": Case(),
    "mha-tied": Case(config=dict(num_key_value_heads=4, tie_word_embeddings=True)),
    # head_dim 32 with 4 heads: q_proj is [128, 64], so hidden/heads (16) would be wrong.
    "head-dim-32": Case(config=dict(head_dim=32)),
    # original_max_position_embeddings 64 and head_dim 16 put the 8 rotary wavelengths
    # (6 … 19869) in all three llama3 bands (< 16 kept, 16–64 smoothed, > 64 divided by 8);
    # 300 positions run well past 64.
    "rope-llama3": Case(config=dict(rope_scaling=LLAMA3), seq_len=300),
    "rope-linear": Case(config=dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
                        seq_len=300),
    "bf16": Case(dtype=torch.bfloat16),
    "fp16-weights": Case(dtype=torch.float16),
    "sharded": Case(config=dict(tie_word_embeddings=True), shard="100KB"),
    # head sizes ORT's CPU GroupQueryAttention rejects: standard-op attention, growing cache
    "head-dim-8": Case(config=dict(head_dim=8)),
    "head-dim-24-mha": Case(config=dict(head_dim=24, num_key_value_heads=4)),
    "qwen2": Case(arch="qwen2"),  # bias on q/k/v (random here: HF initializes them to 0)
    "mistral": Case(arch="mistral"),
    # sliding window shorter than the sequence: GroupQueryAttention's local_window_size, and
    # the standard-op mask for a head size GQA rejects
    "mistral-window": Case(arch="mistral", config=dict(sliding_window=16), seq_len=40),
    "mistral-window-hd8": Case(arch="mistral", config=dict(sliding_window=16, head_dim=8),
                               seq_len=40),
}


def _build_tokenizer(path: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 16, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog. 0123456789"] * 20,
                            trainer)
    tok.save(str(path))


def _randomize(model, seed: int, *, std: float, peaked: bool = False) -> None:
    """Draw every parameter: linears N(0, std), norms 1 ± 0.2, biases N(0, 0.5).

    ``peaked``: embeddings N(0, 1) and lm_head = ½·embed_tokens[permutation], so each token
    strongly predicts one successor and the layers shift the logits without drowning that
    (what int4's greedy comparison needs; see test_int4_greedy_matches_transformers).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif peaked and name == "model.embed_tokens.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
        if peaked and not model.config.tie_word_embeddings:
            perm = torch.randperm(model.config.vocab_size, generator=g)
            model.lm_head.weight.copy_(0.5 * model.model.embed_tokens.weight[perm])


class Models:
    """Checkpoints, references and exports, each built once per module."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = root / "tokenizer.json"
        _build_tokenizer(self.tokenizer)
        self._hf: dict = {}
        self._exports: dict = {}

    def hf(self, name: str, *, peaked: bool = False) -> tuple[Path, torch.nn.Module]:
        """(checkpoint dir, transformers model read back from it in fp32)."""
        key = (name, peaked)
        if key not in self._hf:
            case = CASES[name]
            config_cls, model_cls = ARCHS[case.arch]
            config = config_cls(**{**BASE, **case.config})
            torch.manual_seed(0)
            model = model_cls(config).eval()
            _randomize(model, seed=sum(map(ord, name)), std=0.08 if peaked else 0.2,
                       peaked=peaked)
            path = self.root / (name + ("-peaked" if peaked else ""))
            kw = {"max_shard_size": case.shard} if case.shard else {}
            model.to(case.dtype).save_pretrained(path, **kw)
            shutil.copy(self.tokenizer, path / "tokenizer.json")
            ref = model_cls.from_pretrained(path, dtype=torch.float32).eval()
            self._hf[key] = (path, ref)
        return self._hf[key]

    def export(self, name: str, precision: str = "fp32", *, peaked: bool = False) -> Path:
        key = (name, precision, peaked)
        if key not in self._exports:
            src, _ = self.hf(name, peaked=peaked)
            out = self.root / "exports" / f"{src.name}-{precision}"
            export_model(src, out, precision=precision, progress=False)
            self._exports[key] = out
        return self._exports[key]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("parity"))


def _ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, VOCAB, n)]


def _ref_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


# -- fp32: prefill and decode through the KV cache ---------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_fp32_prefill_and_decode_match_transformers(tiny, name):
    src, ref_model = tiny.hf(name)
    out = tiny.export(name)
    cfg = LlamaConfig.from_dir(src)
    ids = _ids(CASES[name].seq_len, seed=1)
    ref = _ref_logits(ref_model, ids)
    # The first half in one prefill, then one decode step per token with the past fed back.
    half = len(ids) // 2
    got = onnx_logits(out, cfg, ids, prefill=half)
    assert got.shape == ref.shape == (len(ids), VOCAB)
    assert np.abs(got[:half] - ref[:half]).max() <= FP32_TOL, "prefill"
    assert np.abs(got[half:] - ref[half:]).max() <= FP32_TOL, "decode steps"
    assert np.abs(ref).max() > 1.0  # the logits are not vanishingly small


@pytest.mark.parametrize("name", CASES)
def test_fp32_runtime_two_slots_decoding_together(tiny, name):
    """Two sequences of different lengths in one Runtime, decoded in the same ORT calls."""
    _, ref_model = tiny.hf(name)
    rt = open_runtime(tiny.export(name), RuntimeOptions(max_batch=2))
    n = CASES[name].seq_len
    a, b = _ids(n, seed=2), _ids(n - 5, seed=3)
    ref_a, ref_b = _ref_logits(ref_model, a), _ref_logits(ref_model, b)
    steps = 6
    pa, pb = len(a) - steps, len(b) - steps
    la, lb = rt.prefill(0, a[:pa]), rt.prefill(1, b[:pb])
    assert np.abs(la - ref_a[pa - 1]).max() <= FP32_TOL
    assert np.abs(lb - ref_b[pb - 1]).max() <= FP32_TOL
    for k in range(steps):
        got = rt.decode([0, 1], [a[pa + k], b[pb + k]])
        assert np.abs(got[0] - ref_a[pa + k]).max() <= FP32_TOL, f"slot 0, step {k}"
        assert np.abs(got[1] - ref_b[pb + k]).max() <= FP32_TOL, f"slot 1, step {k}"
    assert (rt.length(0), rt.length(1)) == (len(a), len(b))


@pytest.mark.parametrize("name", ["rope-llama3", "rope-linear"])
def test_rope_scaling_changes_the_logits(tiny, name):
    """The rope tests above are only meaningful if ignoring the scaling would fail them."""
    src, ref_model = tiny.hf(name)
    unscaled = type(ref_model).from_pretrained(src, dtype=torch.float32, rope_scaling=None).eval()
    ids = _ids(CASES[name].seq_len, seed=1)
    diff = np.abs(_ref_logits(ref_model, ids) - _ref_logits(unscaled, ids)).max()
    assert diff > 100 * FP32_TOL


def test_sharded_checkpoint_is_sharded(tiny):
    src, _ = tiny.hf("sharded")
    assert (src / "model.safetensors.index.json").is_file()
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 1
    assert not (src / "model.safetensors").exists()


# -- fp16 ------------------------------------------------------------------------------------


def test_fp16_export_matches_transformers(tiny):
    """fp16 on CPU stores weights in half precision and computes in fp32.

    Against transformers with the same weights rounded to fp16, that is exact up to fp32
    arithmetic (FP32_TOL). Against the fp32 model the rounding (2^-11 relative per weight)
    moves logits in proportion to their size, so that bound is relative to the logit scale.
    """
    src, ref_model = tiny.hf("gqa-untied")
    out = tiny.export("gqa-untied", "fp16")
    cfg = LlamaConfig.from_dir(src)
    ids = _ids(24, seed=4)
    got = onnx_logits(out, cfg, ids, prefill=12)
    ref = _ref_logits(ref_model, ids)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= FP16_REL_TOL * scale

    rounded = type(ref_model).from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for pname, p in rounded.named_parameters():
            if "norm" not in pname and not pname.endswith(".bias"):
                p.copy_(p.half().float())
    assert np.abs(got - _ref_logits(rounded, ids)).max() <= FP32_TOL


def test_fp16_export_of_fp16_checkpoint_is_lossless(tiny):
    src, ref_model = tiny.hf("fp16-weights")
    got = onnx_logits(tiny.export("fp16-weights", "fp16"), LlamaConfig.from_dir(src),
                      _ids(24, seed=5), prefill=12)
    assert np.abs(got - _ref_logits(ref_model, _ids(24, seed=5))).max() <= FP32_TOL


# -- int4 ------------------------------------------------------------------------------------


def _greedy_ref(model, ids: list[int], steps: int) -> list[int]:
    seq, out = list(ids), []
    for _ in range(steps):
        t = int(_ref_logits(model, seq)[-1].argmax())
        out.append(t)
        seq.append(t)
    return out


@pytest.mark.parametrize("name", ["gqa-untied", "mha-tied", "qwen2", "head-dim-32", "head-dim-8"])
def test_int4_greedy_matches_transformers(tiny, name):
    """int4 (MatMulNBits, block 32, accuracy level 4 = int8 activations; lm_head 8-bit).

    Tolerance: the same 8 greedy tokens as transformers' fp32 model, and teacher-forced
    max |Δlogits| ≤ 10% of the logit scale (verify_export's int4 bound). Round-to-nearest
    int4 of Gaussian weights has ~10% relative error per weight, which on random tiny models
    with flat logits (top-2 gaps ~1% of the scale) flips argmaxes by chance. The "peaked"
    weights (see _randomize) give top-2 gaps about 10x the int4 error, while the layers still
    move the logits by several times that error — checked below, so an int4 export that got
    the layers wrong could not pass on the embeddings alone.
    """
    src, ref_model = tiny.hf(name, peaked=True)
    out = tiny.export(name, "int4", peaked=True)
    prompt = _ids(8, seed=6)
    want = _greedy_ref(ref_model, prompt, 8)

    rt = open_runtime(out)
    logits, got = rt.prefill(0, prompt), []
    for _ in range(8):
        got.append(int(logits.argmax()))
        logits = rt.decode([0], [got[-1]])[0]
    assert got == want

    seq = prompt + want
    ref = _ref_logits(ref_model, seq)
    q = onnx_logits(out, LlamaConfig.from_dir(src), seq, prefill=len(prompt))
    err = np.abs(q - ref).max()
    assert err <= 0.10 * np.abs(ref).max()
    assert (q[len(prompt) - 1:].argmax(-1) == ref[len(prompt) - 1:].argmax(-1)).all()

    without_layers = type(ref_model).from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in without_layers.model.layers:
            for p in layer.parameters():
                p.zero_()
    layer_effect = np.abs(ref - _ref_logits(without_layers, seq)).max()
    assert layer_effect > 3 * err


@pytest.mark.parametrize("name", ["gqa-untied", "mha-tied", "qwen2", "head-dim-32",
                                  "mistral-window", "rope-llama3"])
def test_w8a8_graph_matches_transformers(tiny, name):
    """The W8A8 companion of an int4 export (what prefill and batched decode run on),
    teacher-forced over the whole sequence in one prefill: within the int4 bound (10% of the
    logit scale) of transformers' fp32 model and the same argmax at every position, for
    q/k/v biases, a sliding window and llama3 rope too; and a batch of two through the
    Runtime gives each row its logits alone."""
    src, ref_model = tiny.hf(name, peaked=True)
    out = tiny.export(name, "int4", peaked=True)
    assert (out / "model_w8a8.onnx").is_file()
    seq = _ids(min(CASES[name].seq_len, 64), seed=7)
    ref = _ref_logits(ref_model, seq)
    q = onnx_logits(out, LlamaConfig.from_dir(src), seq, prefill=len(seq),
                    graph="model_w8a8.onnx")
    assert np.abs(q - ref).max() <= 0.10 * np.abs(ref).max()
    assert (q.argmax(-1) == ref.argmax(-1)).mean() >= 0.95

    rt = open_runtime(out, RuntimeOptions(max_batch=2, w8a8=True))
    a, b = seq[:12], _ids(9, seed=8)
    rt.prefill(0, a)
    rt.prefill(1, b)
    both = rt.decode([0, 1], [5, 6])
    for j, (p, t) in enumerate(((a, 5), (b, 6))):
        alone = open_runtime(out, RuntimeOptions(max_batch=2, w8a8=True))
        alone.prefill(0, p)
        # a lone row decodes on the int4 graph: pad it with a second row to stay on W8A8
        alone.prefill(1, [3, 4])
        np.testing.assert_array_equal(alone.decode([0, 1], [t, 7])[0], both[j])


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant", "shared"), [
    ("gqa-untied", "gqa-shared-kv", True),
    ("head-dim-8", "standard-growing-kv", False),
])
def test_attention_variant_by_head_size(tiny, name, variant, shared):
    """head_dim % 16 != 0 → standard-op attention with position_ids and a growing cache,
    described as such to ONNX Runtime GenAI (past_present_share_buffer false)."""
    import json

    out = tiny.export(name)
    manifest = json.loads((out / "llorch.json").read_text())
    genai = json.loads((out / "genai_config.json").read_text())
    assert manifest["graph"]["variant"] == variant
    assert genai["search"]["past_present_share_buffer"] is shared
    assert ("position_ids" in genai["model"]["decoder"]["inputs"]) is not shared
