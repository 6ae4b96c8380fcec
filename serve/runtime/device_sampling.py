"""Token choice on the execution provider: a small ONNX graph run right after the model's logits.

A decode step on the GPU otherwise brings ``rows x vocab`` float32 logits to the host (12.6 MB
at 64 streams of a 49k vocabulary) for the CPU sampler. Here the logits OrtValue stays where the
model wrote it and a second session, on the same provider, turns it into one int64 token a row
(and logprobs for the rows that ask); only the rows the CPU sampler must serve (logit_bias,
penalties, token masks, grammars) come back as logits, gathered on the device::

    logits [b, s, V] ─ last position ─┬─ Gather(host_rows) ─────────────────► host_logits [h, V]
                                      └─ NaN → -inf, +inf → FLT_MAX, no finite logit → token 0
                                          ├─ first argmax ──────────────────┐
                                          └─ top-k ─► exp((x - max) / T) ─► top-p ─► min-p
                                               ─► float64 cumsum ─► first > u * total ─┴─► tokens [b]

The rule is the CPU sampler's (`serve.sampling.Sampler`, `serve.runtime.interface.RowDraw`),
given the same uniform draw ``u`` per row, which the engine takes from the request's seeded
generator exactly where the CPU sampler would: a seeded request gives the same tokens either
way, up to float rounding at a cumulative-sum boundary (exp and sums differ in the last bits
between NumPy and a provider's kernels).

Three graphs, each built once at serve time with `onnx.helper` and run by the cheapest one that
serves the step: ``greedy`` (the first argmax: TopK k=1), ``sample`` (every rule), ``sample_logprobs`` (plus
the chosen token's logprob and the top alternatives). The per-row settings are inputs, so one
graph serves any mix of requests. Top-k and top-p sort only as many values as the step's
settings need (``top_k_max``, ``sort_k``: the largest top-k; the whole vocabulary only when a
top-p row has no top-k).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from serve.runtime.interface import MAX_DEVICE_LOGPROBS, RowDraw, RowToken

OPSET = 17
KINDS = ("greedy", "sample", "sample_logprobs")
_F32_MAX = float(np.finfo(np.float32).max)


class _Graph:
    """Nodes appended in order; each helper returns its output's name (builders return their
    outputs, no shared state but the node list)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        names = [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name


def sampling_model(vocab: int, kind: str) -> onnx.ModelProto:
    """The token-choice graph ``kind`` (one of `KINDS`) for a ``vocab``-wide model.

    Inputs (b rows, h of them to bring back; every graph): ``logits`` float32 [b, s, vocab]
    (the last position is used), ``host_rows`` int64 [h]. ``sample*`` also: ``greedy`` bool [b],
    ``inv_temperature`` float32 [b], ``top_k`` int64 [b] (0 off), ``top_k_max`` int64 [1] (>= 1
    and >= every top_k), ``top_p`` float64 [b], ``sort_k`` int64 [1] (values sorted for top-p:
    >= every top-p row's top_k, the vocabulary where one has none), ``min_p`` float32 [b],
    ``u`` float64 [b]; ``sample_logprobs`` also ``n_top`` int64 [1] (>= 1).

    Outputs: ``tokens`` int64 [b], ``host_logits`` float32 [h, vocab] (raw); ``sample_logprobs``
    also ``logprob`` float32 [b] and ``top_ids`` int64 / ``top_logprobs`` float32 [b, n_top].

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = _Graph()
    f32, f64, i64, b = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.BOOL
    inputs = [helper.make_tensor_value_info("logits", f32, ["rows", "seq", vocab]),
              helper.make_tensor_value_info("host_rows", i64, ["h"])]
    outputs = [helper.make_tensor_value_info("tokens", i64, ["rows"]),
               helper.make_tensor_value_info("host_logits", f32, ["h", vocab])]
    one = g.const("one", np.array([1], np.int64))
    axis1 = g.const("axis1", np.array([1], np.int64))
    neg_inf = g.const("neg_inf", np.array(-np.inf, np.float32))
    zero = g.const("zero", np.array(0.0, np.float32))
    onehot0 = np.full(vocab, -np.inf, np.float32)
    onehot0[0] = 0.0

    raw = g.op("Gather", "logits", g.const("last", np.array(-1, np.int64)), axis=1)  # [b, V]
    g.nodes.append(helper.make_node("Gather", [raw, "host_rows"], ["host_logits"], axis=0))
    # serve.sampling.finite_scores: NaN → -inf, +inf → FLT_MAX, ...
    x = g.op("Min", g.op("Where", g.op("IsNaN", raw), neg_inf, raw),
             g.const("f32_max", np.array(_F32_MAX, np.float32)))
    # the largest logit and the first index of it (np.argmax's choice): TopK(k=1) puts the
    # lower index first among equal values (ONNX TopK, opset 11+), so a row with no finite
    # logit (all -inf after the line above) is all ties: token 0. One kernel over the row,
    # where ReduceMax + Equal + Where + ReduceMin took 5.5 ms at 8 rows on an H200's CUDA EP.
    m, top1 = g.op("TopK", x, one, axis=1, outputs=2)  # [b, 1] each
    greedy_tok = g.op("Squeeze", top1, axis1)
    if kind == "greedy":
        g.nodes.append(helper.make_node("Identity", [greedy_tok], ["tokens"]))
        return _model(g, inputs, outputs)
    iota = g.const("iota", np.arange(vocab, dtype=np.float32))  # exact below 2**24
    # ... and a row with no finite logit is token 0 alone
    dead = g.op("Equal", m, neg_inf)
    x = g.op("Where", dead, g.const("onehot0", onehot0), x)
    m = g.op("Where", dead, zero, m)

    inputs += [helper.make_tensor_value_info("greedy", b, ["rows"]),
               helper.make_tensor_value_info("inv_temperature", f32, ["rows"]),
               helper.make_tensor_value_info("top_k", i64, ["rows"]),
               helper.make_tensor_value_info("top_k_max", i64, [1]),
               helper.make_tensor_value_info("top_p", f64, ["rows"]),
               helper.make_tensor_value_info("sort_k", i64, [1]),
               helper.make_tensor_value_info("min_p", f32, ["rows"]),
               helper.make_tensor_value_info("u", f64, ["rows"])]

    def col(name: str) -> str:  # [b] → [b, 1]
        return g.op("Unsqueeze", name, axis1)

    def count(mask: str) -> str:  # [b, n] bool → [b, 1] float32 of the trues
        return g.op("ReduceSum", g.op("Cast", mask, to=f32), axis1, keepdims=1)

    # top-k: every logit >= the k-th largest (ties kept, as Hugging Face's TopKLogitsWarper)
    k_on = col(g.op("Greater", "top_k", g.const("zero_i", np.array(0, np.int64))))
    k_idx = g.op("Sub", g.op("Where", k_on, col("top_k"), one), one)
    top_vals = g.op("TopK", x, "top_k_max", axis=1, outputs=2)[0]
    kth = g.op("GatherElements", top_vals, k_idx, axis=1)
    keep_k = g.op("Or", g.op("Not", k_on), g.op("GreaterOrEqual", x, kth))
    # temperature: w = exp((x - max) / T), the max at exactly 1
    w = g.op("Exp", g.op("Mul", g.op("Sub", x, m), col("inv_temperature")))
    wk = g.op("Where", keep_k, w, zero)
    # top-p: the descending values up to the one whose cumulative sum reaches top_p * total
    sorted_w = g.op("TopK", wk, "sort_k", axis=1, outputs=2)[0]
    cum = g.op("CumSum", g.op("Cast", sorted_w, to=f64), g.const("axis1_s", np.array(1, np.int64)))
    total_k = g.op("ReduceSum", g.op("Cast", wk, to=f64), axis1, keepdims=1)
    reach = g.op("Mul", col("top_p"), total_k)
    j = g.op("Min", g.op("Cast", count(g.op("Less", cum, reach)), to=i64),
             g.op("Sub", "sort_k", one))
    threshold = g.op("GatherElements", sorted_w, j, axis=1)
    p_off = g.op("GreaterOrEqual", col("top_p"), g.const("one_d", np.array(1.0, np.float64)))
    keep_p = g.op("Or", p_off, g.op("GreaterOrEqual", wk, threshold))
    # min-p: relative to the most likely token, whose w is 1
    keep_m = g.op("GreaterOrEqual", w, col("min_p"))
    kept = g.op("Where", g.op("And", g.op("And", keep_k, keep_p), keep_m), w, zero)
    # the draw: the first token, in vocabulary order, whose cumulative weight exceeds u * total
    cdf = g.op("CumSum", g.op("Cast", kept, to=f64), g.const("axis1_c", np.array(1, np.int64)))
    total = g.op("Slice", cdf, g.const("last_s", np.array([vocab - 1], np.int64)),
                 g.const("end_s", np.array([vocab], np.int64)), axis1)
    below = count(g.op("LessOrEqual", cdf, g.op("Mul", col("u"), total)))
    # rounding may put u * total at the total: the last kept token then
    last_kept = g.op("ReduceMax", g.op("Where", g.op("Greater", kept, zero), iota,
                                       g.const("minus_one", np.array(-1.0, np.float32))),
                     axes=[1], keepdims=1)
    drawn = g.op("Cast", g.op("Squeeze", g.op("Min", below, last_kept), axis1), to=i64)
    tokens = g.op("Where", "greedy", greedy_tok, drawn)
    g.nodes.append(helper.make_node("Identity", [tokens], ["tokens"]))
    if kind == "sample":
        return _model(g, inputs, outputs)

    # logprobs of the raw (finite) logits, as serve.sampling.token_logprobs
    inputs.append(helper.make_tensor_value_info("n_top", i64, [1]))
    outputs += [helper.make_tensor_value_info("logprob", f32, ["rows"]),
                helper.make_tensor_value_info("top_ids", i64, ["rows", "n_top"]),
                helper.make_tensor_value_info("top_logprobs", f32, ["rows", "n_top"])]
    shifted = g.op("Sub", x, m)
    lse = g.op("Add", m, g.op("Log", g.op("ReduceSum", g.op("Exp", shifted), axis1, keepdims=1)))
    chosen = g.op("GatherElements", x, g.op("Unsqueeze", "tokens", axis1), axis=1)
    g.nodes.append(helper.make_node("Squeeze", [g.op("Sub", chosen, lse), axis1], ["logprob"]))
    top_v, top_i = g.op("TopK", x, "n_top", axis=1, outputs=2)
    g.nodes.append(helper.make_node("Sub", [top_v, lse], ["top_logprobs"]))
    g.nodes.append(helper.make_node("Identity", [top_i], ["top_ids"]))
    return _model(g, inputs, outputs)


def _model(g: _Graph, inputs, outputs) -> onnx.ModelProto:
    graph = helper.make_graph(g.nodes, "llorch-sampling", inputs, outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="llorch")
    model.ir_version = 8  # onnxruntime >= 1.20 reads it
    onnx.checker.check_model(model)
    return model


class DeviceSampler:
    """Runs `sampling_model` graphs on the logits a model session left on the device.

    Args:
        vocab: the logits' last dimension.
        providers: the model session's providers (with their options), so the logits need no
            copy between sessions.
        threads: intra-op threads for nodes on the CPU provider.
    """

    def __init__(self, vocab: int, providers: list, threads: int | None = None) -> None:
        self.vocab = vocab
        self._providers = providers
        self._threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, kind: str) -> ort.InferenceSession:
        """The session of graph ``kind`` (built on first use)."""
        if kind not in self._sessions:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.intra_op_num_threads = self._threads or 1
            so.inter_op_num_threads = 1
            model = sampling_model(self.vocab, kind).SerializeToString()
            self._sessions[kind] = ort.InferenceSession(model, so, providers=self._providers)
        return self._sessions[kind]

    def check(self) -> None:
        """Build every graph and run it once on two rows of zero logits.

        Raises:
            Exception: what onnxruntime raised (a provider that cannot run the graphs).
            RuntimeError: a graph picked a token other than 0 (the first of equal logits).
        """
        zeros = ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 1, self.vocab), np.float32))
        for draws in ([RowDraw(greedy=True), None], [RowDraw(greedy=False, top_p=0.5), None],
                      [RowDraw(greedy=True, logprobs=1), None]):
            got = self.sample(zeros, draws)
            if got[0].token != 0 or got[1].shape != (self.vocab,):
                raise RuntimeError(f"the token-choice graph picked {got[0]} from equal logits")

    def sample(self, logits: ort.OrtValue, draws: Sequence[RowDraw | None]
               ) -> list[RowToken | np.ndarray]:
        """Row ``j`` of ``logits`` (float32 [b, s, vocab], on any device) → a `RowToken`
        picked by ``draws[j]``, or its float32 [vocab] logits (a host copy) where that is None.

        Raises:
            ValueError: ``draws`` is not one per row, or asks for more than
                `MAX_DEVICE_LOGPROBS` logprobs.
        """
        rows = logits.shape()[0]
        if len(draws) != rows:
            raise ValueError(f"{len(draws)} draws for {rows} rows of logits")
        host = [j for j, d in enumerate(draws) if d is None]
        picked = [d for d in draws if d is not None]
        n_top = max((d.logprobs for d in picked if d.logprobs is not None), default=None)
        if n_top is not None and n_top > MAX_DEVICE_LOGPROBS:
            raise ValueError(f"at most {MAX_DEVICE_LOGPROBS} logprobs on the device, asked {n_top}")
        kind = ("sample_logprobs" if n_top is not None
                else "sample" if any(not d.greedy for d in picked) else "greedy")
        session = self.session(kind)
        io = session.io_binding()
        io.bind_ortvalue_input("logits", logits)
        io.bind_cpu_input("host_rows", np.asarray(host, np.int64))
        if kind != "greedy":
            self._bind_settings(io, draws)
        if kind == "sample_logprobs":
            io.bind_cpu_input("n_top", np.array([max(n_top, 1)], np.int64))
        for out in session.get_outputs():
            io.bind_output(out.name, "cpu")
        session.run_with_iobinding(io)
        got = dict(zip((o.name for o in session.get_outputs()),
                       (v.numpy() for v in io.get_outputs()), strict=True))
        result: list[RowToken | np.ndarray] = []
        h = 0
        for j, d in enumerate(draws):
            if d is None:
                result.append(got["host_logits"][h])
                h += 1
            elif d.logprobs is None:
                result.append(RowToken(int(got["tokens"][j])))
            else:
                top = tuple((int(t), float(v)) for t, v in
                            zip(got["top_ids"][j, :d.logprobs], got["top_logprobs"][j, :d.logprobs],
                                strict=True))
                result.append(RowToken(int(got["tokens"][j]), float(got["logprob"][j]), top))
        return result

    def _bind_settings(self, io: ort.IOBinding, draws: Sequence[RowDraw | None]) -> None:
        """The per-row settings of the ``sample*`` graphs; host rows ride along as greedy."""
        d = [r or RowDraw(greedy=True) for r in draws]
        top_k = np.array([0 if r.greedy or not 0 < r.top_k < self.vocab else r.top_k for r in d],
                         np.int64)
        top_p = np.array([1.0 if r.greedy else r.top_p for r in d], np.float64)
        nucleus = [int(k) for k, p in zip(top_k, top_p, strict=True) if p < 1.0]
        sort_k = max((k or self.vocab for k in nucleus), default=1)
        io.bind_cpu_input("greedy", np.array([r.greedy for r in d], np.bool_))
        io.bind_cpu_input("inv_temperature", np.array([r.inv_temperature for r in d], np.float32))
        io.bind_cpu_input("top_k", top_k)
        io.bind_cpu_input("top_k_max", np.array([max(1, int(top_k.max()))], np.int64))
        io.bind_cpu_input("top_p", top_p)
        io.bind_cpu_input("sort_k", np.array([sort_k], np.int64))
        io.bind_cpu_input("min_p", np.array([0.0 if r.greedy else r.min_p for r in d], np.float32))
        io.bind_cpu_input("u", np.array([r.u for r in d], np.float64))
