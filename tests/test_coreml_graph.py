"""`llorch export --target coreml`: static graphs CoreML's ML Program takes, run here on the CPU.

There is no Mac here, so what CoreML would reject is checked structurally (every op in the
CoreML EP's ML Program list, kept in docs/coreml_ops.md with its source; no dimension above
16384; static shapes; opset ≤ 20; no contrib ops), and the numbers are checked by running the
same graphs on ONNX Runtime's CPU provider through serve's StaticRuntime against the CPU fp32
export (tiny model: logits; default model: greedy tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.api import export_model
from export.config import ExportError
from export.graph_coreml import COREML_MLPROGRAM_OPS, MAX_DIM, coreml_violations
from serve.runtime import ContextFull, ProviderError, Runtime, RuntimeOptions, open_runtime
from serve.runtime.static import StaticRuntime, static_providers

DOC = Path(__file__).resolve().parent.parent / "docs" / "coreml_ops.md"


def _ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


@pytest.fixture(scope="module")
def coreml_dirs(tmp_path_factory, tiny_hf_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coreml")
    out = {}
    for precision in ("fp32", "fp16"):
        out[precision] = root / precision
        export_model(tiny_hf_dir, out[precision], precision=precision, target="coreml",
                     progress=False, verify=True)
    return out


# -- structure: what CoreML's converter accepts ------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", ["decode.onnx", "prefill.onnx"])
def test_every_node_is_a_coreml_mlprogram_op(coreml_dirs, precision, graph):
    model = onnx.load(coreml_dirs[precision] / graph)
    ops = {n.op_type for n in model.graph.node}
    assert ops <= COREML_MLPROGRAM_OPS, ops - COREML_MLPROGRAM_OPS
    assert {n.domain for n in model.graph.node} <= {""}
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert coreml_violations(model) == []
    # weights inline (under 2 GB), no external data files
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not list(coreml_dirs[precision].glob("*.data"))


def test_static_io_contract(coreml_dirs):
    d = coreml_dirs["fp16"]
    graph = json.loads((d / "llorch.json").read_text())["graph"]
    assert graph["variant"] == "static-kv-host" and graph["chunk"] == 64
    assert graph["host_embedding"] and graph["logits_parts"] == [16384, 16384, 16384]
    table = np.load(d / graph["embed_file"], mmap_mode="r")
    assert table.shape == (49152, 64) and table.dtype == np.float16
    for fname, seq in (("decode.onnx", 1), ("prefill.onnx", 64)):
        model = onnx.load(d / fname)
        ins = {i.name: i.type.tensor_type for i in model.graph.input}
        outs = {o.name: o.type.tensor_type for o in model.graph.output}

        def shape(t):
            return [x.dim_value for x in t.shape.dim]

        assert shape(ins["inputs_embeds"]) == [1, seq, 64]
        assert ins["inputs_embeds"].elem_type == onnx.TensorProto.FLOAT16
        assert shape(ins["attention_mask"]) == [1, 1, seq, 512 + seq]
        assert shape(ins["past_key_values.1.value"]) == [1, 2, 512, 16]
        assert ("logits_index" in ins) == (seq > 1) and "input_ids" not in ins
        assert shape(outs["present.0.key"]) == [1, 2, seq, 16]
        assert [shape(outs[f"logits.{j}"]) for j in range(3)] == [[1, 1, 16384]] * 3
        assert all(outs[f"logits.{j}"].elem_type == onnx.TensorProto.FLOAT for j in range(3))
    genai = json.loads((d / "genai_config.json").read_text())["model"]["decoder"]
    assert genai["filename"] == "decode.onnx" and "inputs_embeds" in genai["inputs"]


def test_rms_norm_is_decomposed(coreml_dirs):
    model = onnx.load(coreml_dirs["fp32"] / "decode.onnx")
    ops = [n.op_type for n in model.graph.node if n.name.startswith("/model/norm/")]
    assert ops == ["Mul", "ReduceMean", "Add", "Sqrt", "Div", "Mul"]
    ops16 = [n.op_type for n in onnx.load(coreml_dirs["fp16"] / "decode.onnx").graph.node
             if n.name.startswith("/model/norm/")]
    assert ops16 == ["Cast", "Mul", "ReduceMean", "Add", "Sqrt", "Div", "Cast", "Mul"]


def test_op_list_matches_its_documented_source():
    text = DOC.read_text()
    assert "coreml_supported_mlprogram_ops.md" in text and "1.32.0" in text
    documented = set(re.findall(r"^\|ai\.onnx:(\w+)\|", text, flags=re.M))
    assert documented == COREML_MLPROGRAM_OPS


def test_small_vocab_keeps_the_embedding_in_the_graph(tmp_path):
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models

    from export.config import LlamaConfig

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 1, "max_position_embeddings": 256, "vocab_size": 600,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": True}
    rng = np.random.default_rng(0)
    tensors = {n: (0.2 * rng.standard_normal(s)).astype(np.float32)
               for n, s in LlamaConfig.from_hf(cfg).expected_shapes().items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(tensors, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(cfg))
    Tokenizer(models.WordLevel({"a": 0}, unk_token="a")).save(str(hf / "tokenizer.json"))
    out = tmp_path / "coreml"
    summary = export_model(hf, out, precision="fp32", target="coreml", progress=False,
                           verify=True)  # MQA + biases + tied, against the NumPy reference
    assert summary.verify.max_rel_diff < 1e-3
    model = onnx.load(out / "prefill.onnx")
    assert {i.name for i in model.graph.input} >= {"input_ids", "position_ids"}
    assert [o.name for o in model.graph.output][0] == "logits"
    assert not (out / "embed_tokens.npy").exists() and coreml_violations(model) == []


# -- numbers: the same graphs on the CPU provider -----------------------------------------------


def test_logits_match_the_cpu_fp32_export(coreml_dirs, tiny_model_dir):
    """Prefill over three chunks (150 tokens), then decode steps, against the GQA export."""
    prompt, steps = _ids(150, seed=1), _ids(6, seed=2)
    want_rt, got_rt = open_runtime(tiny_model_dir), open_runtime(coreml_dirs["fp32"])
    assert isinstance(got_rt, StaticRuntime) and isinstance(got_rt, Runtime)
    want = [want_rt.prefill(0, prompt)] + [want_rt.decode([0], [t])[0] for t in steps]
    got = [got_rt.prefill(0, prompt)] + [got_rt.decode([0], [t])[0] for t in steps]
    assert np.abs(np.stack(got) - np.stack(want)).max() < 1e-4
    half = open_runtime(coreml_dirs["fp16"])
    got16 = np.stack([half.prefill(0, prompt)] + [half.decode([0], [t])[0] for t in steps])
    scale = np.abs(np.stack(want)).max()
    assert np.abs(got16 - np.stack(want)).max() / scale < 1e-2
    assert (got16.argmax(-1) == np.stack(want).argmax(-1)).mean() >= 0.8


def test_static_runtime_slots_batch_truncate_copy(coreml_dirs):
    d = coreml_dirs["fp32"]
    prompts = [_ids(n, seed=n) for n in (3, 70, 12)]
    rt = open_runtime(d, RuntimeOptions(max_batch=3))
    first = [rt.prefill(j, p) for j, p in enumerate(prompts)]
    batched = rt.decode([2, 0, 1], [5, 6, 7])
    for j, (p, t) in enumerate(zip(prompts, (6, 7, 5), strict=False)):
        alone = open_runtime(d)
        np.testing.assert_allclose(alone.prefill(0, p), first[j], atol=1e-5)
        np.testing.assert_allclose(alone.decode([0], [t])[0], batched[[1, 2, 0][j]], atol=1e-5)
    # a shared prefix: copy 40 tokens of slot 1 into slot 0, continue both the same way
    rt.copy_slot(1, 0, length=40)
    assert rt.length(0) == 40
    a = rt.prefill(0, prompts[1][40:50])
    rt.truncate(1, 40)
    b = rt.prefill(1, prompts[1][40:50])
    np.testing.assert_allclose(a, b, atol=1e-6)
    rt.reset(2)
    assert rt.length(2) == 0 and rt.kv_bytes_in_use() > 0


def test_static_runtime_limits(coreml_dirs):
    d = coreml_dirs["fp32"]
    rt = open_runtime(d, RuntimeOptions(max_length=80))
    rt.prefill(0, _ids(79, seed=4))
    rt.decode([0], [3])
    with pytest.raises(ContextFull):
        rt.decode([0], [3])
    with pytest.raises(ValueError, match="exceeds the export's max_length 512"):
        open_runtime(d, RuntimeOptions(max_length=513))
    with pytest.raises(ValueError, match="at least one token"):
        rt.prefill(0, [])


def test_default_model_greedy_tokens_match_the_cpu_fp32_export(tmp_path, default_hf_dir,
                                                               default_fp32_dir):
    from serve.tokenizer import Tokenizer

    out = tmp_path / "smollm2-coreml"
    export_model(default_hf_dir, out, precision="fp32", target="coreml", max_length=512,
                 progress=False)
    tok = Tokenizer.from_dir(default_fp32_dir)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]),
        add_special_tokens=False)

    def greedy(rt, n=16):
        logits, out_ids = rt.prefill(0, prompt), []
        for _ in range(n):
            out_ids.append(int(np.argmax(logits)))
            logits = rt.decode([0], [out_ids[-1]])[0]
        return out_ids

    want = greedy(open_runtime(default_fp32_dir, RuntimeOptions(max_length=512)))
    got = greedy(open_runtime(out))
    assert got == want
    assert "Paris" in tok.decode(got)


# -- providers and refusals ---------------------------------------------------------------------


def test_coreml_provider_is_a_clear_error_where_ort_lacks_it(coreml_dirs):
    import onnxruntime as ort

    if "CoreMLExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CoreML provider")
    with pytest.raises(ProviderError, match="CoreMLExecutionProvider is not available"):
        open_runtime(coreml_dirs["fp32"], RuntimeOptions(provider="coreml"))


def test_coreml_provider_options(monkeypatch, tmp_path):
    import serve.runtime.static as rs

    monkeypatch.setattr(rs, "resolve_providers",
                        lambda p: ["CoreMLExecutionProvider", "CPUExecutionProvider"])
    providers = static_providers("coreml", tmp_path / "model", tmp_path / "cache")
    name, options = providers[0]
    assert name == "CoreMLExecutionProvider" and providers[1] == "CPUExecutionProvider"
    assert options["ModelFormat"] == "MLProgram"
    assert options["RequireStaticInputShapes"] == "1"
    assert Path(options["ModelCacheDirectory"]) == tmp_path / "cache"
    assert (tmp_path / "cache").is_dir()


@pytest.mark.parametrize("kwargs, match", [
    (dict(precision="int4"), "not available for --target coreml"),
    (dict(precision="fp32", max_length=MAX_DIM), "above CoreML's limit of 16384"),
])
def test_coreml_export_refusals(tmp_path, tiny_hf_dir, kwargs, match):
    with pytest.raises(ExportError, match=match):
        export_model(tiny_hf_dir, tmp_path / "x", target="coreml", progress=False, **kwargs)
    assert not (tmp_path / "x").exists()
