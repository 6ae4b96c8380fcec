"""Resident KV memory follows the tokens held (issue 15, part 1): the buffers themselves, a
runtime's slots, and the real server after a few short requests."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from test_batching_e2e import metrics
from test_server_e2e import running_server

from serve.runtime import RuntimeOptions, open_runtime
from serve.runtime.kv_memory import PAGE, KVBuffers


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_buffers_read_zero_and_become_resident_only_where_written():
    # 8 rows x 3 heads x 8192 tokens x 64 x fp32 = 48 MiB a buffer, 192 MiB in all
    kv = KVBuffers(2, (8, 3, 8192, 64), np.float32)
    assert kv.k[0].shape == (8, 3, 8192, 64) and not kv.v[1][5].any()
    before = _rss_mb()
    for buf in kv.all:
        buf[2, :, :30] = 1.0  # 30 tokens of one row: 30 * 256 B a head, 2 pages
    grown = _rss_mb() - before
    assert grown < 2, f"30 tokens made {grown:.1f} MB resident (huge pages?)"
    for buf in kv.all:
        buf[2, :, :4000] = 2.0
    assert _rss_mb() - before > 4 * 3 * 4000 * 256 / 2**20 * 0.9
    per_page = PAGE // 256  # tokens a page of one head holds
    for buf in kv.all:
        buf[3, :, :5] = 3.0
    kv.forget(2, per_page + 1)  # the page holding the last kept token stays whole
    assert _rss_mb() - before < 2
    assert (kv.k[1][2, :, :2 * per_page] == 2.0).all()
    assert not kv.k[1][2, :, 2 * per_page:].any()  # given back: zeros again
    assert (kv.v[0][3, :, :5] == 3.0).all() and not kv.v[0][1].any()  # other rows intact
    with pytest.raises(ValueError):
        kv.forget(8, 0)


def test_a_slots_prefill_costs_its_tokens_not_its_capacity(default_model_dir):
    rt = open_runtime(default_model_dir, RuntimeOptions(max_batch=4, max_length=8192))
    ids = list(range(1000, 1030))
    rt.prefill(0, ids)  # the first run sizes ORT's arenas
    before = _rss_mb()
    for slot in (1, 2, 3):
        rt.prefill(slot, ids)
        rt.decode([slot], [5])
    # a slot of 8192 tokens is 90 MB of int8 KV (360 MB fp32); 31 tokens are 0.34 MB (in
    # 4 KiB pages: 0.7)
    assert _rss_mb() - before < 3 * 8, "prefill touched more than its tokens' pages"
    assert rt.kv_bytes_in_use() == (30 + 3 * 31) * rt._kv_token_bytes()


@pytest.mark.slow
def test_a_full_slot_costs_its_int8_kv(default_model_dir):
    """Issue 15's goal: 8 slots x 4096 tokens all full in at most half the 1919 MB measured
    with fp32 KV. The default export's int8 KV is 11,520 bytes a token, 45 MB a full
    4096-token slot; the server measured 918 MB (414 idle). Here, in serve's runtime: the
    first full slot adds its KV and ORT's arenas (measured +93 MB), the second its KV and
    some more arena (+64), every later one its KV alone (+45.0); the first two plus six more
    on a 420 MB idle server stay within the goal (an fp32 cache alone is 180 MB a slot)."""
    rt = open_runtime(default_model_dir, RuntimeOptions(max_batch=3, max_length=4096,
                                                        w8a8="auto"))
    assert rt._kv_token_bytes() == 11_520
    ids = [1000 + i % 30000 for i in range(4096)]
    rt.prefill(0, ids[:8])  # the small arenas of a first run, as a server's idle RSS holds
    rt.reset(0)
    rss = [_rss_mb()]
    for slot in (0, 1, 2):
        for i in range(0, 4096, 512):
            rt.prefill(slot, ids[i:i + 512])
        rss.append(_rss_mb())
    first, second, third = np.diff(rss)
    kv_mb = 4096 * 11_520 / 2**20
    print(f"full slots: +{first:.1f}, +{second:.1f}, +{third:.1f} MB ({kv_mb:.1f} MB KV each)")
    assert rt.kv_bytes_in_use() == 3 * 4096 * 11_520
    assert third < kv_mb * 1.05, f"a full slot added {third:.1f} MB ({kv_mb:.1f} MB of KV)"
    assert 420 + first + second + 6 * third <= 1919 / 2, (first, second)


@pytest.mark.slow
def test_server_rss_after_short_requests(default_model_dir, tmp_path):
    """`llorch serve`'s defaults (4 slots of the export's 8192 tokens, the export's KV type, the W8A8
    graph): four short requests leave the server at most 600 MB resident (was 1.8 GB)."""
    log = tmp_path / "server.log"
    with running_server(default_model_dir, "--threads", "2", log_path=log) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                               timeout=300)
        idle = metrics(base)[("process_resident_memory_bytes", ())] / 2**20
        for q in ("Hi!", "What is 2 + 2?", "Name a colour.", "Say hello in French."):
            r = client.chat.completions.create(
                model="smollm2-135m-instruct", max_tokens=16, temperature=0,
                messages=[{"role": "user", "content": q}])
            assert r.choices[0].message.content
        after = metrics(base)
    rss = after[("process_resident_memory_bytes", ())] / 2**20
    kv = sum(v for (name, _), v in after.items() if name == "llorch_kv_cache_bytes_in_use") / 2**20
    print(f"server RSS idle {idle:.0f} MB, after 4 requests {rss:.0f} MB, KV in use {kv:.1f} MB")
    assert rss <= 600, f"{rss:.0f} MB resident after 4 short requests (idle {idle:.0f} MB)"
