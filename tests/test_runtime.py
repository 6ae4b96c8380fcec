"""serve.runtime (open_runtime): KV slots, batching, row swaps, chunked prefill, limits — and
optimum-cli exports (growing KV) against transformers.

The shared-buffer tests compare the Runtime with itself (one slot alone vs several slots in
one batch): the arithmetic is the same GroupQueryAttention kernel either way, so they must
agree to float32 rounding (1e-5). Parity with transformers lives in test_export_parity.py.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serve.runtime import ContextFull, ProviderError, Runtime, RuntimeOptions, open_runtime
from serve.runtime.growing import GrowingKVRuntime
from serve.runtime.shared_kv import HostRuntime

TOL = 1e-5


def _ids(n: int, seed: int, vocab: int = 49152) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def _alone(model_dir: Path, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """Logits after the prompt and after each of ``tokens``, one sequence in its own Runtime."""
    rt = open_runtime(model_dir)
    out = [rt.prefill(0, prompt)]
    out += [rt.decode([0], [t])[0] for t in tokens]
    return np.stack(out)


# -- batching and row movement -----------------------------------------------------------------


def test_batched_decode_equals_decoding_alone(tiny_model_dir):
    prompts = [_ids(n, seed=n) for n in (3, 7, 12)]
    steps = [_ids(5, seed=100 + j) for j in range(3)]
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3))
    got = [[rt.prefill(j, p)] for j, p in enumerate(prompts)]
    for k in range(5):
        logits = rt.decode([0, 1, 2], [steps[j][k] for j in range(3)])
        assert logits.shape == (3, rt.info.vocab_size) and logits.dtype == np.float32
        for j in range(3):
            got[j].append(logits[j])
    for j in range(3):
        want = _alone(tiny_model_dir, prompts[j], steps[j])
        assert np.abs(np.stack(got[j]) - want).max() <= TOL, f"slot {j}"
        assert rt.length(j) == len(prompts[j]) + 5


def test_shuffled_and_partial_decode_order(tiny_model_dir):
    """Slots decoded in a different order (and subset) each step: rows are swapped under the
    hood, slot ids stay stable."""
    n_slots = 4
    prompts = [_ids(n, seed=10 + n) for n in (2, 9, 5, 14)]
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 0], [1, 3, 2], [0, 3, 1, 2], [3], [2, 1, 0, 3]]
    streams = {j: _ids(len(orders), seed=200 + j) for j in range(n_slots)}
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=n_slots))
    got = {j: [rt.prefill(j, p)] for j, p in enumerate(prompts)}
    fed = {j: [] for j in range(n_slots)}
    for order in orders:
        tokens = [streams[j][len(fed[j])] for j in order]
        logits = rt.decode(order, tokens)
        for row, (j, t) in enumerate(zip(order, tokens, strict=True)):
            fed[j].append(t)
            got[j].append(logits[row])
    for j in range(n_slots):
        assert rt.length(j) == len(prompts[j]) + len(fed[j])
        want = _alone(tiny_model_dir, prompts[j], fed[j])
        assert np.abs(np.stack(got[j]) - want).max() <= TOL, f"slot {j}"


def test_copy_slot_then_divergent_continuations(tiny_model_dir):
    prompt = _ids(11, seed=3)
    a, b = _ids(4, seed=4), _ids(4, seed=5)
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3))
    rt.prefill(2, _ids(6, seed=6))  # an unrelated sequence that must not be disturbed
    first = rt.prefill(0, prompt)
    rt.copy_slot(0, 1)
    assert rt.length(1) == rt.length(0) == len(prompt)
    got_a, got_b = [first], [first]
    for k in range(4):
        logits = rt.decode([1, 0], [b[k], a[k]])  # dst first: it moves to row 0
        got_b.append(logits[0])
        got_a.append(logits[1])
    assert np.abs(np.stack(got_a) - _alone(tiny_model_dir, prompt, a)).max() <= TOL
    assert np.abs(np.stack(got_b) - _alone(tiny_model_dir, prompt, b)).max() <= TOL
    assert np.abs(got_a[1] - got_b[1]).max() > 1e-3  # they really diverged

    # the unrelated slot still continues as if alone
    t = _ids(1, seed=7)
    assert np.abs(rt.decode([2], t)[0] - _alone(tiny_model_dir, _ids(6, seed=6), t)[1]).max() \
        <= TOL


def test_copy_slot_over_a_longer_sequence(tiny_model_dir):
    """dst held more tokens than src: its stale tail must not leak into attention."""
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=2))
    rt.prefill(1, _ids(30, seed=8))
    prompt = _ids(5, seed=9)
    rt.prefill(0, prompt)
    rt.copy_slot(0, 1)
    assert rt.length(1) == 5
    t = _ids(3, seed=10)
    got = np.stack([rt.decode([1], [x])[0] for x in t])
    assert np.abs(got - _alone(tiny_model_dir, prompt, t)[1:]).max() <= TOL


def test_truncate_then_prefill_equals_fresh(tiny_model_dir):
    p, q = _ids(20, seed=11), _ids(5, seed=12)
    rt = open_runtime(tiny_model_dir)
    rt.prefill(0, p)
    rt.decode([0], [7])
    rt.truncate(0, 10)
    assert rt.length(0) == 10
    got = rt.prefill(0, q)
    assert np.abs(got - _alone(tiny_model_dir, p[:10] + q, [])[0]).max() <= TOL
    rt.truncate(0, 0)
    assert np.abs(rt.prefill(0, q) - _alone(tiny_model_dir, q, [])[0]).max() <= TOL
    with pytest.raises(ValueError):
        rt.truncate(0, rt.length(0) + 1)
    with pytest.raises(ValueError):
        rt.truncate(0, -1)


def test_reset_then_prefill_equals_fresh(tiny_model_dir):
    rt = open_runtime(tiny_model_dir)
    rt.prefill(0, _ids(25, seed=13))
    rt.reset(0)
    assert rt.length(0) == 0
    q = _ids(4, seed=14)
    assert np.abs(rt.prefill(0, q) - _alone(tiny_model_dir, q, [])[0]).max() <= TOL


def test_chunked_prefill_equals_one_prefill(tiny_model_dir):
    ids = _ids(23, seed=15)
    t = _ids(3, seed=16)
    rt = open_runtime(tiny_model_dir)
    rt.prefill(0, ids[:8])
    rt.prefill(0, ids[8:9])
    last = rt.prefill(0, ids[9:])
    assert rt.length(0) == 23
    got = np.stack([last] + [rt.decode([0], [x])[0] for x in t])
    assert np.abs(got - _alone(tiny_model_dir, ids, t)).max() <= TOL


def _prefill_batch_script(rt, news, steps):
    """``news`` in one `prefill_batch` over slots 0.. in reverse order (they move to other
    rows), then ``steps`` decode steps of every slot; returns the logits per slot."""
    order = list(range(len(news)))[::-1]
    first = rt.prefill_batch(order, [news[j] for j in order])
    assert first.shape == (len(news), rt.info.vocab_size) and first.dtype == np.float32
    got = {j: [first[k]] for k, j in enumerate(order)}
    for j in range(len(news)):
        assert rt.length(j) == len(news[j])
    for k in range(steps):
        logits = rt.decode(list(range(len(news))), [20 + k + j for j in range(len(news))])
        for j in range(len(news)):
            got[j].append(logits[j])
    return {j: np.stack(v) for j, v in got.items()}


# rows of very different lengths
BATCH_NEWS = [_ids(40, seed=32), _ids(2, seed=33), _ids(1, seed=34), _ids(17, seed=35)]


@pytest.mark.parametrize("equal", [False, True])
def test_prefill_batch_equals_prefilling_alone(tiny_model_dir, equal):
    """Right-padded rows: each row's logits, and the decode steps after (which write over the
    padding's KV), are those of the same prompt prefilled alone."""
    news = [n[:2] for n in BATCH_NEWS[:2]] if equal else BATCH_NEWS
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=len(news)))
    got = _prefill_batch_script(rt, news, steps=3)
    for j, new in enumerate(news):
        want = _alone(tiny_model_dir, new, [20 + k + j for k in range(3)])
        assert np.abs(got[j] - want).max() <= TOL, f"slot {j}"


def test_prefill_batch_refusals_change_nothing(tiny_model_dir):
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3, max_length=16))
    with pytest.raises(ContextFull, match="slot 1: 0 \\+ 17 tokens exceed"):
        rt.prefill_batch([1, 0], [_ids(17, seed=37), _ids(3, seed=38)])
    rt.prefill(0, _ids(10, seed=36))
    for slots, seqs in (([], []), ([1, 1], [[5], [6]]), ([1, 2], [[5]]), ([1, 2], [[5], []]),
                        ([1, 0], [[5], [6]])):  # the last: slot 0 holds a prefix
        with pytest.raises(ValueError):
            rt.prefill_batch(slots, seqs)
    assert [rt.length(s) for s in range(3)] == [10, 0, 0]
    # a lone row is a plain prefill
    np.testing.assert_array_equal(rt.prefill_batch([1], [[5, 6]])[0],
                                  open_runtime(tiny_model_dir).prefill(0, [5, 6]))


def test_prefill_batch_rows_follow_the_decode_batch(tiny_model_dir):
    """Prefilled slots land in the rows after those of the last decode step, where the next
    decode (the old batch, then the new slots) wants them: no swaps in that decode."""
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=6))
    rt.prefill_batch([4, 5], [_ids(5, seed=40), _ids(6, seed=41)])
    rt.decode([4, 5], [1, 2])  # 4 and 5 move to rows 0 and 1
    swaps = rt.rows_swapped
    rt.prefill_batch([0, 2, 1], [_ids(3, seed=42), _ids(7, seed=43), _ids(4, seed=44)])
    moved = rt.rows_swapped - swaps
    rt.decode([4, 5, 0, 2, 1], [3, 4, 5, 6, 7])
    assert rt.rows_swapped - swaps == moved <= 3


def test_context_full(tiny_model_dir):
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=2, max_length=16))
    assert rt.info.max_length == 16
    with pytest.raises(ContextFull, match="slot 0: 0 \\+ 17 tokens exceed the context length 16"):
        rt.prefill(0, _ids(17, seed=17))
    assert rt.length(0) == 0
    rt.prefill(0, _ids(15, seed=18))
    rt.prefill(1, _ids(3, seed=19))
    rt.decode([0, 1], [5, 6])  # slot 0 reaches 16: still fits
    assert rt.length(0) == 16
    with pytest.raises(ContextFull):
        rt.decode([1, 0], [5, 6])
    assert (rt.length(0), rt.length(1)) == (16, 4)  # a refused step changes nothing
    with pytest.raises(ContextFull):
        rt.prefill(0, [5])
    rt.decode([1], [5])  # the other slot goes on
    assert rt.length(1) == 5


def test_max_length_beyond_the_export_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="exceeds the export's max_length 512"):
        open_runtime(tiny_model_dir, RuntimeOptions(max_length=513))


def test_open_runtime_picks_a_class_with_the_interface(tiny_model_dir):
    rt = open_runtime(tiny_model_dir)
    assert type(rt) is HostRuntime and isinstance(rt, Runtime)
    with pytest.raises(ValueError, match="cuda_graph needs --provider cuda"):
        open_runtime(tiny_model_dir, RuntimeOptions(cuda_graph=True))


def test_kv_bytes(tiny_model_dir):
    info = open_runtime(tiny_model_dir).info
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.max_length) == (2, 2, 16, 512)
    per_slot_token = 2 * 2 * 2 * 16 * 4  # (k, v) x layers x kv heads x head_dim x fp32
    assert open_runtime(tiny_model_dir).kv_bytes() == per_slot_token * 512
    assert open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3, max_length=64)).kv_bytes() == \
        per_slot_token * 64 * 3


def test_bad_calls(tiny_model_dir):
    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=2))
    with pytest.raises(ValueError):
        rt.prefill(0, [])
    with pytest.raises(ValueError):
        rt.decode([0, 1], [5])


# -- providers ---------------------------------------------------------------------------------


def test_cuda_provider_on_a_cpu_build_is_refused(tiny_model_dir):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime build has CUDA")
    with pytest.raises(ProviderError, match=r"--provider cuda: CUDAExecutionProvider is not "
                                            r"available .*install onnxruntime-gpu"):
        open_runtime(tiny_model_dir, RuntimeOptions(provider="cuda"))
    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        open_runtime(tiny_model_dir, RuntimeOptions(provider="tpu"))


# -- optimum-cli exports (growing KV, position_ids) --------------------------------------------


@pytest.fixture(scope="module")
def optimum_model(tmp_path_factory):
    """(optimum export dir, transformers model) for a tiny random Llama saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from optimum.exporters.onnx import main_export

    root = tmp_path_factory.mktemp("optimum")
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger than the default init, so attention is far from uniform
        for name, p in model.named_parameters():
            p.copy_((1 + 0.2 * torch.randn(p.shape, generator=g)) if "norm" in name
                    else 0.2 * torch.randn(p.shape, generator=g))
    src = root / "hf"
    model.save_pretrained(src)
    _write_tokenizer(src / "tokenizer.json")
    out = root / "onnx"
    with warnings.catch_warnings():
        # torch's TorchScript exporter, as optimum drives it, warns about its own tracing
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        main_export(str(src), str(out), task="text-generation-with-past", do_validation=False,
                    device="cpu")
    shutil.rmtree(src)  # the runtime must need nothing but the export
    return out, model


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(512)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.slow  # the fixture's torch export: ~4 s cold
def test_optimum_export_matches_transformers(optimum_model):
    out, model = optimum_model
    rt = open_runtime(out, RuntimeOptions(max_batch=2))
    assert rt.info.source == "optimum" and rt.kv_bytes() == 0
    assert type(rt) is GrowingKVRuntime and isinstance(rt, Runtime)
    prompt = _ids(10, seed=20, vocab=512)
    # greedy: prefill, then decode the argmax each step
    seq, got = list(prompt), [rt.prefill(0, prompt)]
    for _ in range(6):
        seq.append(int(got[-1].argmax()))
        got.append(rt.decode([0], [seq[-1]])[0])
    want = _torch_logits(model, seq)[len(prompt) - 1:]
    assert np.abs(np.stack(got) - want).max() <= 1e-3
    assert np.abs(want).max() > 1.0

    # two slots decoded "together", chunked prefill, copy and truncate
    a, b = _ids(12, seed=21, vocab=512), _ids(7, seed=22, vocab=512)
    rt.reset(0)
    rt.prefill(0, a[:4])
    rt.prefill(0, a[4:10])
    rt.prefill(1, b[:5])
    for k in range(2):
        la, lb = rt.decode([1, 0], [b[5 + k], a[10 + k]])[::-1]
    assert np.abs(la - _torch_logits(model, a)[-1]).max() <= 1e-3
    assert np.abs(lb - _torch_logits(model, b)[-1]).max() <= 1e-3
    rt.copy_slot(1, 0)
    rt.truncate(0, 3)
    last = rt.prefill(0, a[:2])
    assert np.abs(last - _torch_logits(model, b[:3] + a[:2])[-1]).max() <= 1e-3
    assert np.abs(rt.decode([1], [9])[0] - _torch_logits(model, b + [9])[-1]).max() <= 1e-3


@pytest.mark.slow
def test_optimum_context_full(optimum_model):
    out, _ = optimum_model
    rt = open_runtime(out, RuntimeOptions(max_length=8))
    rt.prefill(0, list(range(3, 11)))
    with pytest.raises(ContextFull):
        rt.decode([0], [3])


# -- the attention pad ---------------------------------------------------------------------------


def _pad_script(model_dir: Path, pad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sequence's logits after a 150-token prompt and 30 tokens, computed three ways:
    (prefill at once, one-token decode steps alone), (prefill chunks of 129 + 21, verify calls
    of 5, 3, 1, 6 … positions) and (prefill chunks 64 + 1 + 85, decode steps beside another
    sequence; with the pad, batch-invariant: one call each)."""
    rt = open_runtime(model_dir, RuntimeOptions(max_batch=3, attention_pad=pad,
                                                batch_invariant=True if pad else None))
    vocab = rt.info.vocab_size
    prompt, tokens = _ids(150, 1, vocab), _ids(30, 2, vocab)
    alone = [rt.prefill(0, prompt)] + [rt.decode([0], [t])[0] for t in tokens]
    rt.prefill(1, prompt[:129])
    verified, i, sizes = [rt.prefill(1, prompt[129:])[None]], 0, [5, 3, 1, 6]
    while i < len(tokens):
        step = tokens[i:i + sizes[len(verified) % 4]]
        verified.append(rt.verify(1, step))
        i += len(step)
    rt.reset(0)
    rt.prefill(0, prompt)
    rt.prefill(2, prompt[:64])
    rt.prefill(2, prompt[64:65])
    together = [rt.prefill(2, prompt[65:])] + [rt.decode([0, 2], [t, t])[1] for t in tokens]
    return np.stack(alone), np.concatenate(verified)[:len(alone)], np.stack(together)


def test_attention_pad_computes_a_position_alike_in_every_call(tiny_model_dir):
    """`RuntimeOptions.attention_pad`: a position's logits are the same bit for bit in a
    one-token decode step, a verify call, a prefill chunk of any size (129 and 1 included) and
    a decode step beside another sequence (one call each, `batch_invariant` True); without the
    pad a verify call
    computes them otherwise (ORT's one-row GEMM kernel), which this test would catch."""
    alone, verified, together = _pad_script(tiny_model_dir, pad=True)
    assert np.array_equal(verified, alone)
    assert np.array_equal(together, alone)
    alone, verified, _ = _pad_script(tiny_model_dir, pad=False)
    assert not np.array_equal(verified, alone)
    np.testing.assert_allclose(verified, alone, atol=TOL)


def test_attention_pad_fills_a_slot_to_the_exports_length(tiny_model_dir):
    """The pad row of a slot's last position lands in the spare KV position: a slot fills to
    the export's max_length (512) one decode step at a time, then is full."""
    rt = open_runtime(tiny_model_dir, RuntimeOptions(attention_pad=True))
    assert rt.info.max_length == 512
    rt.prefill(0, _ids(500, 3, rt.info.vocab_size))
    for t in _ids(12, 4, rt.info.vocab_size):
        assert np.isfinite(rt.decode([0], [t])).all()
    assert rt.length(0) == 512
    with pytest.raises(ContextFull):
        rt.decode([0], [5])


def test_attention_pad_needs_an_export_that_has_it(tiny_model_dir, tmp_path):
    """An export without the pad (llorch.json graph.attention_pad missing) is refused, by name."""
    import json

    old = tmp_path / "old"
    shutil.copytree(tiny_model_dir, old)
    manifest = json.loads((old / "llorch.json").read_text())
    del manifest["graph"]["attention_pad"]
    (old / "llorch.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="attention_pad"):
        open_runtime(old, RuntimeOptions(attention_pad=True))


def _count_calls(rt) -> list[int]:
    """Wrap ``rt._run`` so that each ORT call of the runtime appends 1 to the returned list."""
    calls, run = [], rt._run

    def counted(*args, **kwargs):
        calls.append(1)
        return run(*args, **kwargs)

    rt._run = counted
    return calls


@pytest.mark.parametrize("batch_invariant", [True, None])
def test_attention_pad_decode_sampled(tiny_model_dir, batch_invariant):
    """`decode_sampled` with the pad over two sequences, tokens picked on the device: with
    `batch_invariant` True one call each, greedy picks the argmax of what each sequence's lone
    padded step gives; auto (None) one unpadded call, picks the argmax of that call's rows."""
    from serve.runtime import RowDraw, RowToken

    opts = RuntimeOptions(max_batch=2, attention_pad=True, batch_invariant=batch_invariant)
    rt = open_runtime(tiny_model_dir, replace(opts, device_sampling=True))
    ref = open_runtime(tiny_model_dir, opts)
    calls = _count_calls(rt)
    prompts = [_ids(20, 5, rt.info.vocab_size), _ids(33, 6, rt.info.vocab_size)]
    for r in (rt, ref):
        for s, p in enumerate(prompts):
            r.prefill(s, p)
    del calls[:]
    for step in range(5):
        got = rt.decode_sampled([0, 1], [7 + step, 9 + step], [RowDraw(greedy=True)] * 2)
        if batch_invariant:
            want = [int(ref.decode([s], [t])[0].argmax())
                    for s, t in ((0, 7 + step), (1, 9 + step))]
        else:
            want = [int(r.argmax()) for r in ref.decode([0, 1], [7 + step, 9 + step])]
        assert [g.token for g in got if isinstance(g, RowToken)] == want
    assert len(calls) == (10 if batch_invariant else 5)
    assert rt.length(0) == 25 and rt.length(1) == 38


def test_attention_pad_batches_unpadded_unless_batch_invariant(tiny_model_dir):
    """Under the pad, `batch_invariant` auto (None, what `llorch serve --speculative` passes)
    or False runs a decode step of two sequences as one unpadded call, whose logits are those
    of the same step without the pad (and not a lone padded step's: not batch-invariant, the
    runtime says so), while a lone step still takes the pad (it computes what a verify call
    does); True runs one padded call a sequence, each equal to that sequence's lone step."""
    vocab = 1000
    prompts, tokens = [_ids(40, 7, vocab), _ids(25, 8, vocab)], _ids(6, 9, vocab)

    def run(pad: bool, batch_invariant: bool | None):
        rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3, attention_pad=pad,
                                                         batch_invariant=batch_invariant))
        for s, p in enumerate(prompts):
            rt.prefill(s, p)
        rt.prefill(2, prompts[0])
        calls = _count_calls(rt)
        together = [rt.decode([0, 1], [t, t]) for t in tokens]
        steps = len(calls)
        alone = [rt.decode([2], [t])[0] for t in tokens]  # slot 2 holds slot 0's prompt
        return rt, steps, np.stack(together), np.stack(alone)

    unpadded = run(False, None)[2]
    for batch_invariant in (None, False, True):
        rt, steps, together, alone = run(True, batch_invariant)
        if batch_invariant:
            assert steps == 2 * len(tokens) and rt._apart
            assert np.array_equal(together[:, 0], alone)
        else:
            assert steps == len(tokens) and not rt._apart and not rt.batch_invariant
            assert np.array_equal(together, unpadded)
            assert not np.array_equal(together[:, 0], alone)
        # a lone step is padded either way: it computes what a verify call computes
        rt.reset(2)
        rt.prefill(2, prompts[0])
        assert np.array_equal(rt.verify(2, tokens), alone)
