"""Bad input → a clear ExportError naming the file/field, and nothing written.

Also the output-directory rules (exists without --force, --force replaces, a failure at any
point leaves neither the output nor a temp sibling), the CLI's exit code and messages, and
`--verify` failing loudly.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG, write_random_llama
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

import export.graph
from export.api import export_model
from export.config import ExportError, LlamaConfig
from export.verify import verify_export

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """What write_random_llama copies: tokenizer files + a config.json giving the vocab size."""
    d = tmp_path_factory.mktemp("tok")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t2", "bos_token": "t1"}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    (d / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "bos_token_id": 1,
                                               "eos_token_id": 2}))
    return d


@pytest.fixture(scope="module")
def good_src(tmp_path_factory, tokenizer_dir) -> Path:
    """A valid tiny checkpoint; tests copy it before breaking it."""
    return write_random_llama(tmp_path_factory.mktemp("good") / "tiny", TINY_CONFIG, tokenizer_dir)


@pytest.fixture
def src(tmp_path, good_src) -> Path:
    return Path(shutil.copytree(good_src, tmp_path / "src"))


def _export_fails(src: Path, out: Path, match: str, **kw) -> ExportError:
    with pytest.raises(ExportError, match=match) as exc:
        export_model(src, out, precision=kw.pop("precision", "fp32"), progress=False, **kw)
    _assert_nothing_written(out)
    return exc.value


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert leftovers == []


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def _rewrite_tensors(src: Path, edit) -> None:
    """Rewrite model.safetensors with ``edit(tensors)`` applied (tensors: name -> array)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


# -- inputs ----------------------------------------------------------------------------------


def test_missing_config_json(src, tmp_path):
    (src / "config.json").unlink()
    _export_fails(src, tmp_path / "out", rf"{src}: config\.json not found")


def test_invalid_config_json(src, tmp_path):
    (src / "config.json").write_text("{ not json")
    _export_fails(src, tmp_path / "out", r"config\.json: not valid JSON")


def test_missing_tokenizer_json(src, tmp_path):
    (src / "tokenizer.json").unlink()
    _export_fails(src, tmp_path / "out", rf"{src}: tokenizer\.json not found")


def test_missing_source(tmp_path):
    _export_fails(tmp_path / "nowhere", tmp_path / "out", r"nowhere: no such file or directory")


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"architectures": ["GPT2LMHeadModel"]},
         r"config\.json: unsupported architectures \['GPT2LMHeadModel'\]"),
        ({"model_type": "gpt2"}, r"config\.json: unsupported model_type 'gpt2'"),
        ({"architectures": [], "model_type": "falcon"},
         r"config\.json: unsupported model_type 'falcon'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
         r"config\.json: unsupported rope_scaling type 'yarn' \(field rope_scaling\.rope_type"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}},  # the older spelling of the key
         r"unsupported rope_scaling type 'dynamic'"),
        ({"hidden_act": "gelu"}, r"config\.json: unsupported hidden_act 'gelu'"),
        ({"hidden_size": None}, r"config\.json: required field 'hidden_size' is missing"),
        ({"num_key_value_heads": 3},
         r"num_attention_heads \(4\) is not a multiple of num_key_value_heads \(3\)"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_bias": False,
          "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
         r"config\.json: sliding_window 64 applied to only some layers"),
    ],
    ids=["architectures", "model_type", "model_type-only", "rope-yarn", "rope-dynamic",
         "hidden_act", "missing-field", "kv-heads", "qwen2-window"],
)
def test_unsupported_config(src, tmp_path, changes, match):
    _edit_config(src, **changes)
    _export_fails(src, tmp_path / "out", match)


@pytest.mark.parametrize("changes", [
    {"model_type": "mistral", "sliding_window": 4096},  # never reached within 512 positions
    {"model_type": "mistral", "sliding_window": None},
    {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 16},
    {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16,
     "layer_types": ["full_attention", "full_attention"]},
], ids=["mistral-long-window", "mistral-null", "qwen2-off", "qwen2-no-sliding-layers"])
def test_inactive_sliding_window_is_accepted(changes):
    LlamaConfig.from_hf({**TINY_CONFIG, "architectures": [], "vocab_size": VOCAB, **changes})


def test_truncated_safetensors(src, tmp_path):
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _export_fails(src, tmp_path / "out", rf"{path}: truncated safetensors file")


def test_truncated_safetensors_before_the_header(src, tmp_path):
    path = src / "model.safetensors"
    path.write_bytes(b"\x10\x00")
    _export_fails(src, tmp_path / "out", rf"{path}: truncated safetensors file \(no header\)")


@pytest.mark.parametrize("kind", ["garbage-json", "huge-length", "not-utf8"])
def test_corrupt_safetensors_header(src, tmp_path, kind):
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    if kind == "garbage-json":
        data[8:8 + 16] = b"}{ not a header "
    elif kind == "huge-length":
        data[:8] = struct.pack("<Q", 1 << 40)
    else:
        data[8:12] = b"\xff\xfe\xfd\xfc"
    path.write_bytes(bytes(data))
    _export_fails(src, tmp_path / "out", rf"{path}: corrupt safetensors header")


def test_tensor_with_wrong_shape(src, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"

    def edit(t):
        t[name] = np.zeros((48, 64), np.float32)  # expected (kv_heads * head_dim, hidden)

    _rewrite_tensors(src, edit)
    _export_fails(src, tmp_path / "out",
                  rf"tensor '{name}' has shape \[48, 64\], expected \[32, 64\]")


def test_missing_tensor(src, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_tensors(src, lambda t: t.pop(name))
    _export_fails(src, tmp_path / "out", rf"{src}: missing tensor '{name}' \(expected shape")


def test_untied_config_without_lm_head(src, tmp_path):
    _rewrite_tensors(src, lambda t: t.pop("lm_head.weight"))
    _export_fails(src, tmp_path / "out", r"missing tensor 'lm_head\.weight'")


def test_missing_shard(src, tmp_path):
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight":
                                            "model-00002-of-00002.safetensors"}}
    (src / "model.safetensors").rename(src / "model-00001-of-00002.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    _export_fails(src, tmp_path / "out",
                  r"model\.safetensors\.index\.json: shard model-00002-of-00002\.safetensors "
                  r"\(tensor 'model\.embed_tokens\.weight'\) not found")


def test_no_weights_at_all(src, tmp_path):
    (src / "model.safetensors").unlink()
    _export_fails(src, tmp_path / "out", rf"{src}: no model\.safetensors")


@pytest.mark.parametrize(("kw", "match"), [
    ({"precision": "int3"}, r"--precision 'int3'"),
    ({"target": "tpu"}, r"--target 'tpu'"),
    ({"precision": "int4", "block_size": 24}, r"--block-size 24: must be a power of two"),
    ({"max_length": -1}, r"--max-length -1: must be positive"),
], ids=["precision", "target", "block-size", "max-length"])
def test_bad_options(src, tmp_path, kw, match):
    _export_fails(src, tmp_path / "out", match, **kw)


# -- the output directory ------------------------------------------------------------------------


def test_existing_output_without_force_is_untouched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match=rf"{out}: output directory exists \(pass --force"):
        export_model(src, out, precision="fp32", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_force_replaces_the_output(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    export_model(src, out, precision="fp32", force=True, progress=False)
    names = {p.name for p in out.iterdir()}
    assert "keep.txt" not in names
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "llorch.json",
            "tokenizer.json", "config.json"} <= names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .old-* / .tmp-*


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "force-over-existing"])
def test_failure_mid_export_leaves_nothing(src, tmp_path, monkeypatch, exc, existing):
    """A builder raising at layer 1 (after layer 0's weights were written to the temp dir)."""
    real_mlp = export.graph.mlp

    def failing_mlp(ctx, h):
        if ctx.layer == 1:
            raise exc("boom")
        return real_mlp(ctx, h)

    monkeypatch.setattr(export.graph, "mlp", failing_mlp)
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    with pytest.raises(exc, match="boom"):
        export_model(src, out, precision="int4", force=existing, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "src"] if existing else ["src"])
    if existing:  # the old directory survives a failed --force export
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# -- --verify --------------------------------------------------------------------------------


def test_verify_passes_on_a_good_export(src, tmp_path):
    summary = export_model(src, tmp_path / "out", precision="fp32", verify=True, progress=False)
    assert summary.verify is not None
    assert summary.verify.max_abs_diff < 1e-3 and summary.verify.argmax_agreement == 1.0
    manifest = json.loads((tmp_path / "out" / "llorch.json").read_text())
    assert manifest["verify"]["max_abs_diff"] == summary.verify.max_abs_diff


def _perturbing_loader(src: Path, target: str):
    from export.safetensors_reader import SafeTensorsCheckpoint

    ckpt = SafeTensorsCheckpoint(src)

    def load(name: str) -> np.ndarray:
        w = ckpt.load(name)
        if name == target:
            w = w.copy()
            w[: w.shape[0] // 2] *= 1.5  # what a wrong graph would compute
        return w

    return load


@pytest.mark.parametrize("target", ["model.layers.1.self_attn.v_proj.weight",
                                    "model.layers.0.post_attention_layernorm.weight"])
def test_verify_export_raises_on_a_perturbed_weight(src, tmp_path, target):
    out = tmp_path / "out"
    export_model(src, out, precision="fp32", progress=False)
    cfg = LlamaConfig.from_dir(src)
    verify_export(out, cfg, _perturbing_loader(src, "none"), quantized=False)  # baseline passes
    with pytest.raises(ExportError, match=r"verify failed: ONNX logits differ from the NumPy "
                                          r"reference \(max \|Δ\| "):
        verify_export(out, cfg, _perturbing_loader(src, target), quantized=False)


def test_export_with_failing_verify_leaves_nothing(src, tmp_path, monkeypatch):
    import export.api

    monkeypatch.setattr(export.api, "_reference_loader",
                        lambda source, spec: _perturbing_loader(src, "model.norm.weight"))
    _export_fails(src, tmp_path / "out", r"verify failed", verify=True)


# -- through the CLI -------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llorch", "export", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_errors_exit_1_with_the_message(src, tmp_path):
    _edit_config(src, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    res = _cli(src, "-o", tmp_path / "out", "--precision", "fp32", "--quiet")
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and "rope_scaling" in res.stderr
    assert "'yarn'" in res.stderr and "Traceback" not in res.stderr
    assert res.stdout == ""
    _assert_nothing_written(tmp_path / "out")

    out = tmp_path / "existing"
    out.mkdir()
    res = _cli(src, "-o", out, "--quiet")
    assert res.returncode == 1
    assert res.stderr == f"error: {out}: output directory exists (pass --force to replace it)\n"
    assert list(out.iterdir()) == []


def test_cli_success_prints_the_summary(src, tmp_path):
    out = tmp_path / "out"
    res = _cli(src, "-o", out, "--precision", "int4", "--verify", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines() if line.strip())
    params = LlamaConfig.from_dir(src).num_params()
    assert lines["precision"] == "int4 (cpu)"
    assert lines["params"] == f"{params / 1e6:.1f} M"
    size = sum(f.stat().st_size for f in out.iterdir())
    assert lines["size"] == f"{size / 2**20:.1f} MiB"
    assert lines["time"].endswith(" s") and float(lines["time"][:-2]) >= 0
    assert lines["verify"].startswith("ok: max |Δlogits|")
    assert (out / "model.onnx").is_file()
