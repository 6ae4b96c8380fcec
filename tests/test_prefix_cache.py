"""The prefix cache's books (pure) and the runtime operations it relies on (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from serve.prefix_cache import PrefixCache, common_prefix


def ids(*xs: int) -> np.ndarray:
    return np.asarray(xs, np.int64)


def test_common_prefix():
    assert common_prefix(ids(1, 2, 3), ids(1, 2, 4)) == 2
    assert common_prefix(ids(1, 2), ids(1, 2, 3)) == 2
    assert common_prefix(ids(), ids(1)) == 0
    assert common_prefix(ids(5), ids(1)) == 0


def test_match_prefers_the_longest_prefix_then_the_least_recently_used():
    cache = PrefixCache(4, capacity=100)
    for slot in range(3):
        cache.take(slot)
    assert cache.release(0, ids(1, 2, 3, 4)) == []
    assert cache.release(1, ids(1, 2, 9)) == []
    assert cache.release(2, ids(1, 2, 3, 8)) == []
    assert cache.match(ids(1, 2, 3, 4, 5), limit=10) == (0, 4)
    assert cache.match(ids(1, 2, 3, 4, 5), limit=2) == (0, 2)  # LRU among equals
    assert cache.match(ids(1, 2, 3, 8), limit=3) == (0, 3)
    assert cache.match(ids(7), limit=10) == (None, 0)
    assert cache.match(ids(1, 2), limit=0) == (None, 0)
    assert cache.victim() == 3  # the empty one first
    cache.take(3)
    assert cache.victim() == 0  # then the least recently used
    cache.touch(0)
    assert cache.victim() == 1
    assert cache.tokens == 4 + 3 + 4 and cache.n_free == 3


def test_the_token_budget_evicts_least_recently_used_first():
    cache = PrefixCache(3, capacity=6)
    for slot in range(3):
        cache.take(slot)
    assert cache.release(0, ids(1, 2, 3)) == []
    assert cache.release(1, ids(4, 5, 6)) == []
    assert cache.release(2, ids(7, 8)) == [(0, 0)]  # slot 0 is emptied
    assert cache.tokens == 5 and cache.held(0) == 0
    cache.take(2)
    assert cache.release(2, ids(*range(10))) == [(2, 6), (1, 0)]  # too big: kept in part
    assert cache.tokens == 6 and cache.match(ids(0, 1, 2, 3, 4, 5, 6), 10) == (2, 6)
    assert sorted(cache.clear()) == [2] and cache.tokens == 0


def test_capacity_zero_keeps_nothing():
    cache = PrefixCache(2, capacity=0)
    cache.take(0)
    assert cache.release(0, ids(1, 2)) == [(0, 0)]
    assert not cache.enabled and cache.match(ids(1, 2), 5) == (None, 0)
    with pytest.raises(ValueError):
        PrefixCache(1, capacity=-1)


def test_runtime_copy_slot_prefix_and_kv_bytes(tiny_model_dir):
    """copy_slot(src, dst, n) + prefill of the rest equals prefilling it all."""
    from serve.runtime import RuntimeOptions, open_runtime

    rt = open_runtime(tiny_model_dir, RuntimeOptions(max_batch=3, threads=1))
    prompt = list(range(300, 340))
    whole = rt.prefill(0, prompt)
    rt.prefill(1, prompt[:25] + [7, 7, 7])
    rt.copy_slot(1, 2, 25)
    assert rt.length(2) == 25
    part = rt.prefill(2, prompt[25:])
    np.testing.assert_allclose(part, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        rt.copy_slot(1, 2, 29)
    per_token = rt.kv_bytes() // (3 * rt.info.max_length)
    assert rt.kv_bytes_in_use() == (40 + 28 + 40) * per_token
    rt.reset(1)
    assert rt.kv_bytes_in_use() == 80 * per_token
