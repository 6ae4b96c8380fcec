"""`llorch export --target cuda` and the CUDA runtime, as far as a machine without a GPU can
check them: op types per node, fp16 initializers and I/O, the IO-binding plan, the device-copy
graph, and the runtime's pointer-bound plan run on host memory ("device" cpu) against the plain
Runtime. ONNX Runtime's CPU provider runs the fp16 graph too, so its numbers are checked here;
the GPU run itself is bench/gpu/ (results in bench/results/).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from export.api import export_model
from export.config import ExportError, LlamaConfig
from export.sources import open_source
from export.verify import reference_logits
from serve.model_dir import load_model_info
from serve.runtime import ProviderError, RowDraw, Runtime, RuntimeOptions, open_runtime
from serve.runtime.cuda import (
    CudaRuntime,
    DeviceCopier,
    binding_plan,
    cuda_provider_options,
    graph_sizes,
    identity_model,
    prefill_shape,
)
from serve.runtime.shared_kv import SharedKVRuntime

F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT


def _ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 49152, n)]


@pytest.fixture(scope="module")
def cuda_dirs(tmp_path_factory, tiny_hf_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cuda")
    out = {}
    for precision in ("fp16", "int4"):
        out[precision] = root / precision
        export_model(tiny_hf_dir, out[precision], precision=precision, target="cuda",
                     progress=False)
    return out


def _model(d: Path) -> onnx.ModelProto:
    return onnx.load(d / "model.onnx", load_external_data=False)


def _io(model, name) -> tuple[int, list]:
    v = {x.name: x for x in [*model.graph.input, *model.graph.output]}[name]
    t = v.type.tensor_type
    return t.elem_type, [d.dim_value or d.dim_param for d in t.shape.dim]


# -- graph construction -------------------------------------------------------------------------


def test_fp16_graph_ops_and_dtypes(cuda_dirs):
    m = _model(cuda_dirs["fp16"])
    ops = Counter((n.domain or "ai.onnx", n.op_type) for n in m.graph.node)
    layers = 2
    assert ops[("com.microsoft", "GroupQueryAttention")] == layers
    assert ops[("ai.onnx", "SimplifiedLayerNormalization")] == 1
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 2 * layers
    assert ops[("ai.onnx", "MatMul")] == 4 * layers + 1  # qkv, o, gate_up, down; lm_head
    assert ("com.microsoft", "MatMulNBits") not in ops
    # weights feed MatMul directly in fp16: the only Cast is the logits' to fp32
    casts = [n for n in m.graph.node if n.op_type == "Cast" and n.name.startswith(("/lm", "/model/l"))]
    assert [n.name for n in casts] == ["/lm_head/Cast"]
    assert casts[0].attribute[0].i == F32
    floats = [t for t in m.graph.initializer if t.data_type in (F16, F32)]
    assert floats and all(t.data_type == F16 for t in floats), \
        [t.name for t in floats if t.data_type != F16]
    assert _io(m, "past_key_values.0.key") == (F16, ["batch_size", 2, "max_sequence_length", 16])
    assert _io(m, "present.1.value")[0] == F16
    assert _io(m, "logits")[0] == F32
    assert _io(m, "input_ids")[0] == onnx.TensorProto.INT64
    gqa = next(n for n in m.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a for a in gqa.attribute}
    assert attrs["do_rotary"].i == 1 and attrs["kv_num_heads"].i == 2


def test_int4_graph_matmulnbits_fp16_scales(cuda_dirs):
    m = _model(cuda_dirs["int4"])
    inits = {t.name: t for t in m.graph.initializer}
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * 2 + 1
    for n in nbits:
        attrs = {a.name: a.i for a in n.attribute}
        assert attrs["accuracy_level"] == 0  # CUDA's default: fp16 compute
        assert inits[n.input[2]].data_type == F16  # scales
        assert inits[n.input[3]].data_type == onnx.TensorProto.UINT8  # zero points
        assert attrs["bits"] == (8 if n.name == "/lm_head/MatMulNBits" else 4)
    # Q4_1-style float zero points stay exact through an fp16 block-sum correction
    corr = [n for n in m.graph.node if n.name.endswith("zero_point_correction/MatMul")]
    assert corr and all(inits[n.input[1]].data_type == F16 for n in corr)
    assert all(t.data_type == F16 for t in inits.values() if t.data_type in (F16, F32))


def test_cpu_graph_is_unchanged_by_the_targets(tiny_model_dir):
    """The CPU export keeps fp32 I/O and no logits Cast (the targets are parameters)."""
    m = _model(tiny_model_dir)
    assert _io(m, "past_key_values.0.key")[0] == F32 and _io(m, "logits")[0] == F32
    assert not any(n.name == "/lm_head/Cast" for n in m.graph.node)
    assert any(n.name == "/model/layers.1/self_attn/GroupQueryAttention" for n in m.graph.node)


def test_cuda_export_refuses_fp32(tmp_path, tiny_hf_dir):
    with pytest.raises(ExportError, match="not available for --target cuda"):
        export_model(tiny_hf_dir, tmp_path / "x", precision="fp32", target="cuda",
                     progress=False)


def test_manifest_names_the_dtypes(cuda_dirs):
    import json

    graph = json.loads((cuda_dirs["fp16"] / "llorch.json").read_text())["graph"]
    assert graph["io_dtype"] == graph["kv_dtype"] == "float16"
    assert graph["logits_dtype"] == "float32"


# -- numbers on the CPU provider ----------------------------------------------------------------


def test_fp16_graph_logits_close_to_the_reference(cuda_dirs, tiny_hf_dir):
    src = open_source(tiny_hf_dir)
    cfg = LlamaConfig.from_dir(tiny_hf_dir)
    ids = _ids(20, seed=7)
    ref = reference_logits(cfg, src.load, ids)
    rt = open_runtime(cuda_dirs["fp16"])
    assert rt.kv_dtype == np.float16
    got = [rt.prefill(0, ids[:12])] + [rt.decode([0], [t]).copy()[0] for t in ids[12:]]
    err = np.abs(np.stack(got) - ref[11:]).max() / np.abs(ref).max()
    assert err < 1e-2


# -- the IO-binding plan and the runtime's pointer binding -------------------------------------


def test_binding_plan_keeps_kv_on_device_and_shares_past_present(cuda_dirs):
    rt = open_runtime(cuda_dirs["fp16"])  # only for its ModelInfo
    plan = binding_plan(rt.info, np.float16, first_row=2, rows=3, seq=1, mask_width=40,
                        device_io=False)
    host = [(b.kind, b.name) for b in plan if b.device == "host"]
    assert host == [("input", "input_ids"), ("input", "attention_mask"), ("output", "logits")]
    kv = [b for b in plan if b.buffer.startswith(("k.", "v."))]
    assert len(kv) == 2 * 2 * rt.info.num_layers and all(b.device == "cuda" for b in kv)
    by_buffer = {}
    for b in kv:
        by_buffer.setdefault(b.buffer, []).append(b)
    for pair in by_buffer.values():  # past and present: the same buffer, the same rows
        assert sorted(b.kind for b in pair) == ["input", "output"]
        assert {(b.first_row, b.shape) for b in pair} == {(2, (3, 2, rt.info.max_length, 16))}
    logits = next(b for b in plan if b.name == "logits")
    assert logits.shape == (3, 1, rt.info.vocab_size) and logits.dtype == "float32"
    graph_plan = binding_plan(rt.info, np.float16, 0, 3, seq=1, mask_width=512, device_io=True)
    assert all(b.device == "cuda" for b in graph_plan)


def test_cuda_provider_options():
    opts = cuda_provider_options(device_id=1, cuda_graph=True)
    assert opts == {"device_id": "1", "enable_skip_layer_norm_strict_mode": "1",
                    "enable_cuda_graph": "1"}


def test_device_copy_graph():
    model = onnx.load_from_string(identity_model(3, F16))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Identity"] * 3
    copier = DeviceCopier(2, np.float16, ["CPUExecutionProvider"], device="cpu")
    src = [np.arange(8, dtype=np.float16) + k for k in range(3)]
    dst = [np.zeros(8, np.float16) for _ in range(3)]
    copier.copy([(s.ctypes.data, d.ctypes.data) for s, d in zip(src, dst, strict=False)], 8)
    for s, d in zip(src, dst, strict=False):
        np.testing.assert_array_equal(s, d)


@pytest.mark.parametrize("precision", ["fp16", "int4"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_pointer_bound_runtime_equals_runtime(cuda_dirs, precision, cuda_graph):
    """Batched decode in shifting orders (row swaps through the scratch row), copy_slot and
    truncate; with cuda_graph the ids/mask/logits sit in fixed buffers and the mask spans the
    whole cache. Host memory stands in for the GPU's."""
    d = cuda_dirs[precision]
    prompts = [_ids(n, seed=n) for n in (4, 15, 33)]
    orders = [[0, 1, 2], [2, 0], [1, 2, 0], [2], [0, 2, 1]]

    def script(rt):
        out = [rt.prefill(j, p) for j, p in enumerate(prompts)]
        for k, order in enumerate(orders):
            out.extend(rt.decode(order, [11 + k + j for j in order]).copy())
        rt.copy_slot(2, 0, length=20)
        rt.truncate(1, 10)
        out.append(rt.prefill(0, [5, 6]))
        out.append(rt.prefill(1, [7]))
        out.extend(rt.decode([1, 0, 2], [8, 8, 8]).copy())
        return np.stack(out)

    want = script(open_runtime(d, RuntimeOptions(max_batch=3)))
    rt = CudaRuntime(load_model_info(d), RuntimeOptions(max_batch=3, cuda_graph=cuda_graph),
                     device="cpu")
    assert isinstance(rt, Runtime)
    assert rt.kv_bytes() == open_runtime(d, RuntimeOptions(max_batch=3)).kv_bytes()
    # fp16 logits: the CUDA runtime computes the lm_head over every prefill position (no pinned
    # num_logits_to_keep on CUDA), a different kernel shape: one fp16 ulp apart at most.
    np.testing.assert_allclose(script(rt), want, atol=2e-3)


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_pointer_bound_prefill_batch_equals_one_at_a_time(cuda_dirs, precision):
    """Rows of very different lengths in one call, their logits gathered by pointer into the
    fixed buffer before they come to the host; then decode steps over the padding's KV. Host
    memory stands in for the GPU's."""
    d = cuda_dirs[precision]
    news = [_ids(n, seed=50 + n) for n in (33, 2, 1, 9, 20)]

    def script(rt, batched):
        slots = [4, 2, 0, 1, 3]  # not in row order: rows move
        if batched:
            out = list(rt.prefill_batch(slots, news))
        else:
            out = [rt.prefill(s, ids) for s, ids in zip(slots, news, strict=True)]
        assert [rt.length(s) for s in slots] == [len(ids) for ids in news]
        for k in range(2):
            out.extend(rt.decode([0, 1, 2, 3, 4], [30 + k + j for j in range(5)]).copy())
        return np.stack(out)

    info, opts = load_model_info(d), RuntimeOptions(max_batch=5)
    alone_rt, rt = CudaRuntime(info, opts, device="cpu"), CudaRuntime(info, opts, device="cpu")
    want, got = script(alone_rt, batched=False), script(rt, batched=True)
    # every prefill's logits came through the device gather, one row a prompt
    assert alone_rt.rows_gathered == rt.rows_gathered == len(news)
    # the same kernels at another batch shape (measured: fp16 equal, int4 4.9e-4 apart:
    # MatMulNBits rounds by M); the suite's fp16 tolerance
    np.testing.assert_allclose(got, want, atol=2e-3)
    np.testing.assert_allclose(got, script(open_runtime(d, opts), batched=False), atol=2e-3)


def test_cuda_provider_missing_is_a_clear_error(cuda_dirs):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(ProviderError, match="CUDAExecutionProvider is not available"):
        open_runtime(cuda_dirs["fp16"], RuntimeOptions(provider="cuda"))




@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_static_decode_graph_has_nothing_ort_would_put_on_the_cpu(cuda_dirs, precision):
    """CUDA graph capture needs every node on the GPU: the decode graph has no shape
    arithmetic (Shape/Squeeze → total_sequence_length is an input), no logits slice
    (Neg/Slice of num_logits_to_keep), fixed shapes, and shares the main graph's data file."""
    d = cuda_dirs[precision]
    assert json.loads((d / "llorch.json").read_text())["graph"]["cuda_graph"] == \
        "model_decode_static.onnx"
    m = onnx.load(d / "model_decode_static.onnx", load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    assert not {"Shape", "Squeeze", "Neg", "Slice"} & set(ops), ops
    assert ops["GroupQueryAttention"] == LlamaConfig.from_hf(
        json.loads((d / "config.json").read_text())).num_hidden_layers
    inputs = {i.name for i in m.graph.input}
    assert "num_logits_to_keep" not in inputs
    assert _io(m, "input_ids")[1] == ["batch_size", 1]
    # the mask spans the KV buffer; its length is the runtime's, passed as a host scalar
    assert _io(m, "attention_mask")[1] == ["batch_size", "max_sequence_length"]
    assert _io(m, "total_sequence_length") == (onnx.TensorProto.INT32, [])
    assert _io(m, "logits")[1][1] == 1
    locations = {e.value for t in m.graph.initializer for e in t.external_data
                 if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert not (d / "model_decode_static.onnx.data").exists()


def test_graph_sizes():
    assert graph_sizes(1) == [1]
    assert graph_sizes(5) == [1, 2, 4, 5]
    assert graph_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_captured_steps_pad_to_captured_sizes(cuda_dirs):
    """3 sequences run as a captured step of 4 (then 2 of 6 as 2, 5 as 8): the padding rows'
    sequences keep their KV and lengths (their next logits equal an unpadded runtime's), and a
    full sequence in a padding row turns the padding off for that step."""
    d = cuda_dirs["fp16"]
    prompts = [_ids(n, seed=n) for n in (4, 15, 33, 7, 9, 12)]

    def script(rt):
        out = [rt.prefill(j, p) for j, p in enumerate(prompts)]
        for k, order in enumerate([[0, 1, 2], [3, 4, 5], [5, 0, 3, 1, 2], [4, 1], [2, 3, 4, 5, 0]]):
            out.extend(rt.decode(order, [11 + k + j for j in order]).copy())
        rt.prefill(5, _ids(40 - rt.length(5), seed=1))  # slot 5 is full now
        out.extend(rt.decode([0, 1, 2], [3, 4, 5]).copy())
        out.extend(rt.decode([3, 4], [6, 7]).copy())
        return np.stack(out)

    ref = CudaRuntime(load_model_info(d), RuntimeOptions(max_batch=6, max_length=40),
                      device="cpu")
    want = script(ref)
    rt = CudaRuntime(load_model_info(d), RuntimeOptions(max_batch=6, max_length=40,
                                                        cuda_graph=True, device_sampling=True),
                     device="cpu")  # device sampling is off by default (auto = host): asked for
    assert rt.captured_sizes == [1, 2, 4, 6] and ref.captured_sizes == []  # the startup line's
    got = script(rt)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert sorted(rows for (_, rows, decode) in rt._calls if decode) == [2, 3, 4, 6]
    # tokens picked on the device from a padded step: one a sequence, padding rows dropped
    picked = rt.decode_sampled([1, 2, 3], [9, 9, 9], [RowDraw(greedy=True)] * 3)
    assert [p.token for p in picked] == np.argmax(ref.decode([1, 2, 3], [9, 9, 9]), -1).tolist()
    # warmed up first (every captured size run once on the empty buffer): the same numbers
    warm = CudaRuntime(load_model_info(d), RuntimeOptions(max_batch=6, max_length=40,
                                                          cuda_graph=True), device="cpu")
    assert warm.warm_up() == {"prefill": [16, 32], "batch": [(2, 16), (2, 32), (4, 16), (4, 32)],
                              "decode": [1, 2, 4, 6]}
    np.testing.assert_allclose(script(warm), want, atol=2e-3)
    with pytest.raises(RuntimeError, match="empty"):
        warm.warm_up()
    # with tokens picked on the device the warm-up runs the token-choice graph at every size
    warm = CudaRuntime(load_model_info(d), RuntimeOptions(max_batch=6, max_length=40,
                                                          cuda_graph=True, device_sampling=True),
                       device="cpu")
    runs = []
    real = warm._sampler.sample
    warm._sampler.sample = lambda logits, draws: runs.append(len(draws)) or real(logits, draws)
    assert warm.warm_up()["decode"] == [1, 2, 4, 6] and runs == [1, 1, 2, 2, 4, 4, 6, 6]
    np.testing.assert_allclose(script(warm), want, atol=2e-3)


def test_prefill_shape_buckets():
    """Prefill calls run at powers of two from 16 (few shapes: ORT's first call at a new
    sequence length costs 50-100 ms on CUDA), capped by what is left of the buffer."""
    assert [prefill_shape(n, 0, 2048) for n in (1, 16, 17, 37, 64, 65, 512, 513)] == \
        [16, 16, 32, 64, 64, 128, 512, 1024]
    assert prefill_shape(37, 2000, 2048) == 48  # 64 would not fit: what is left
    assert prefill_shape(8, 2040, 2048) == 8


def test_bucketed_prefill_equals_exact_prefill(cuda_dirs):
    """A padded prefill (right-padded to its bucket, the mask spanning the buffer, the real
    last position's logits) gives the logits of an exact-length prefill, and the padding's KV
    never shows: later decode steps and prefills agree too, up to the buffer's end."""
    d = cuda_dirs["fp16"]
    info = load_model_info(d)
    exact = CudaRuntime(info, RuntimeOptions(max_batch=2, max_length=40), device="cpu")
    exact.prefill = lambda slot, ids: SharedKVRuntime.prefill(exact, slot, ids)  # no buckets
    rt = CudaRuntime(info, RuntimeOptions(max_batch=2, max_length=40), device="cpu")
    assert rt.warm_up() == {"prefill": [16, 32], "batch": [(2, 16), (2, 32)], "decode": []}
    assert rt.length(0) == rt.length(1) == 0

    def script(r):
        out = [r.prefill(0, _ids(5, 1)), r.prefill(1, _ids(21, 2))]
        out.extend(r.decode([0, 1], [9, 10]).copy())
        out.append(r.prefill(0, _ids(30, 3)))  # 6 + 30 = 36: the 64 bucket capped at 34
        out.extend(r.decode([1, 0], [11, 12]))
        out.extend(r.decode([0], [13]))
        assert r.length(0) == 38 and r.length(1) == 23
        return np.stack(out)

    np.testing.assert_allclose(script(rt), script(exact), atol=2e-3)


def test_batched_prefill_runs_at_power_of_two_rows_and_bucketed_lengths(cuda_dirs):
    """Seven empty slots prefilled together run as 4 + 2 + 1 rows, each call right-padded to a
    power-of-two length: the logits equal each prompt prefilled alone."""
    d = cuda_dirs["fp16"]
    info = load_model_info(d)
    prompts = [_ids(n, seed=n) for n in (3, 9, 17, 30, 5, 12, 33)]
    alone = CudaRuntime(info, RuntimeOptions(max_batch=8, max_length=64), device="cpu")
    want = np.stack([alone.prefill(j, p) for j, p in enumerate(prompts)])
    rt = CudaRuntime(info, RuntimeOptions(max_batch=8, max_length=64), device="cpu")
    widths = []
    run = rt._run
    rt._run = lambda call, ids, mask: (widths.append(ids.shape), run(call, ids, mask))
    got = rt.prefill_batch(list(range(7)), prompts)
    assert widths == [(4, 32), (2, 16)]  # the seventh alone: `prefill`, its own bucketed path
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert [rt.length(j) for j in range(7)] == [len(p) for p in prompts]
    np.testing.assert_allclose(rt.decode(list(range(7)), [4] * 7),
                               alone.decode(list(range(7)), [4] * 7), atol=2e-3)


def test_a_batch_after_finished_sequences_is_prefilled_where_the_next_decode_wants_it(cuda_dirs):
    """Four sequences decode, end (their slots keep their KV for the prefix cache), then four
    new prompts prefill together: with the engine's running slots as ``decoding`` (none) the
    batch takes rows 0-3 and its first decode step swaps no row; placed after the rows the
    last step ran, as before, that step swapped every row (three whole-row copies each: the
    first step after a burst took 98-135 ms on an H200)."""
    info = load_model_info(cuda_dirs["fp16"])

    def first_decode_swaps(decoding) -> int:
        rt = CudaRuntime(info, RuntimeOptions(max_batch=8, max_length=64), device="cpu")
        rt.prefill_batch([0, 1, 2, 3], [_ids(n, seed=n) for n in (5, 7, 9, 11)])
        for _ in range(3):
            rt.decode([0, 1, 2, 3], [4] * 4)
        new = [4, 5, 6, 7]
        rt.prefill_batch(new, [_ids(n, seed=10 + n) for n in (6, 8, 10, 12)], decoding=decoding)
        before = rt.rows_swapped
        rt.decode(new, [4] * 4)
        assert [rt.length(s) for s in new] == [7, 9, 11, 13]
        return rt.rows_swapped - before

    assert first_decode_swaps(decoding=[]) == 0
    assert first_decode_swaps(decoding=None) == 4


def test_a_blank_slot_moves_into_an_occupied_row_with_one_row_copy(cuda_dirs):
    """Placing blank slots (a new batch) over rows that idle sequences hold moves each idle
    sequence's tokens once, not through the scratch row (three copies); both sequences keep
    their tokens, and rows holding tokens on both sides still swap (three copies)."""
    info = load_model_info(cuda_dirs["fp16"])
    rt = CudaRuntime(info, RuntimeOptions(max_batch=8, max_length=64), device="cpu")
    rt.prefill_batch([0, 1], [_ids(5, seed=1), _ids(7, seed=2)])
    want = rt.decode([0, 1], [4, 4]).copy()
    copies = []
    real = rt._copy_rows
    rt._copy_rows = lambda pairs: (copies.append(list(pairs)), real(pairs))
    rt.prefill_batch([2, 3], [_ids(6, seed=3), _ids(6, seed=4)], decoding=[])  # rows 0-1
    assert [rt._row[s] for s in (2, 3)] == [0, 1] and len(copies) == 2
    assert all(len(c) == 1 for c in copies)  # one whole-row copy each
    for s in (0, 1):
        rt.truncate(s, rt.length(s) - 1)  # the last decode again, from its new row
    np.testing.assert_allclose(rt.decode([0, 1], [4, 4]), want, atol=2e-3)
    copies.clear()
    rt.decode([2, 3], [4, 4])  # back to rows 0-1, tokens on both sides: two 3-copy swaps
    assert [len(c) for c in copies] == [3, 3]
    copies.clear()
    rt.decode([2, 3], [4, 4])  # already there: nothing moves
    assert copies == []


def test_cuda_graphs_are_on_by_default_where_the_model_runs_on_cuda_with_the_graph(cuda_dirs,
                                                                                  tiny_model_dir):
    """`llorch serve` passes ``cuda_graph=None`` (auto): on where the runtime is on the CUDA
    provider and the export has its static decode graph, off elsewhere; an explicit flag wins.
    The fingerprint hashes the mode in effect, so the default and an explicit flag that means
    the same share one."""
    import argparse

    from serve.fingerprint import cuda_graph, system_fingerprint
    from serve.options import ServeOptions, add_arguments, options_from_args
    from serve.runtime.interface import cuda_graph_in_effect

    graph = load_model_info(cuda_dirs["fp16"]).graph
    assert graph.get("cuda_graph") and not load_model_info(tiny_model_dir).graph.get("cuda_graph")
    assert cuda_graph_in_effect(None, True, graph) is True
    assert cuda_graph_in_effect(None, False, graph) is False  # another provider
    assert cuda_graph_in_effect(None, True, {}) is False  # an export without the graph
    assert cuda_graph_in_effect(False, True, graph) is False
    assert cuda_graph_in_effect(True, False, {}) is True  # explicit: open_runtime then refuses
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flags, want in (([], None), (["--no-cuda-graph"], False),
                        (["--cuda-graph", "--provider", "cuda"], True)):
        assert options_from_args([str(tiny_model_dir)], parser.parse_args(flags)).cuda_graph is want
    with pytest.raises(ValueError, match="--cuda-graph needs --provider cuda, not cpu"):
        ServeOptions(tiny_model_dir, cuda_graph=True, provider="cpu")
    # on the CPU provider (CI) the default resolves to off: the same numbers as the flag off
    assert cuda_graph(ServeOptions(cuda_dirs["fp16"])) is False
    assert system_fingerprint(ServeOptions(cuda_dirs["fp16"])) == system_fingerprint(
        ServeOptions(cuda_dirs["fp16"], cuda_graph=False))
    assert open_runtime(cuda_dirs["fp16"], RuntimeOptions(cuda_graph=None))._full_mask is False
