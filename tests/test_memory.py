"""The buffer pool (pycnn.memory): a block is never handed out while an array on it lives,
it is handed out again once none does, and training gives the same numbers with or without it."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import memory, models, optim

BIG = memory.MIN_BYTES // 4  # float32 elements in the smallest pooled array


@pytest.fixture
def pool():
    old_limit = memory.set_limit(1 << 30)
    old_enabled = memory.set_enabled(True)
    memory.release()
    yield memory
    memory.set_enabled(old_enabled)
    memory.set_limit(old_limit)
    memory.release()


def _block_address(a):
    """Where the pool block under ``a`` starts (an int: holding the block itself would keep it in use)."""
    return (a.base if a.base is not None else a).ctypes.data


def test_pooled_arrays_are_aligned_contiguous_and_of_the_asked_shape(pool):
    for shape, dtype in [((BIG,), np.float32), ((3, 5, 7, 1024), np.float64), ((BIG + 13,), np.int64)]:
        a = pool.empty(shape, dtype)
        assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % memory.ALIGNMENT == 0
        assert a.base is not None  # a view of a pool block


def test_small_requests_bypass_the_pool(pool):
    a = pool.empty((10, 10), np.float32)
    assert a.base is None and pool.stats()["blocks"] == 0


@pytest.mark.parametrize("keep", ["array", "view", "transpose", "slice", "memoryview", "reshape"])
def test_a_block_is_not_reused_while_anything_refers_to_it(pool, keep):
    a = pool.empty((BIG,), np.float32)
    block = _block_address(a)
    holder = {"array": lambda a: a, "view": lambda a: a.view(np.int32), "transpose": lambda a: a.reshape(64, -1).T,
              "slice": lambda a: a[5:-5:3], "memoryview": memoryview,
              "reshape": lambda a: a.reshape(2, -1)}[keep](a)
    del a
    b = pool.empty((BIG,), np.float32)
    assert _block_address(b) != block
    del b
    del holder
    hits = pool.stats()["hits"]
    c = pool.empty((BIG,), np.float32)  # the first block is free again (both are; either is right)
    assert pool.stats()["hits"] == hits + 1 and pool.stats()["blocks"] == 2
    del c


def test_a_freed_block_is_handed_out_again_for_a_size_of_its_class(pool):
    before = pool.stats()
    a = pool.empty((BIG * 2,), np.float32)
    block = _block_address(a)
    del a
    b = pool.empty((BIG * 2 - 100,), np.float32)  # within 12.5% below: the same size class
    assert _block_address(b) == block
    after = pool.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)


def test_random_allocations_never_overlap_a_live_array(pool):
    hits = pool.stats()["hits"]
    rng = np.random.default_rng(0)
    live = {}  # tag -> (array or a view of it, fill value)
    for tag in range(300):
        n = int(rng.integers(BIG, 4 * BIG))
        a = pool.empty((n,), np.float32)
        a.fill(tag)
        kind = rng.integers(3)
        live[tag] = (a if kind == 0 else a[::2] if kind == 1 else a.reshape(1, -1), tag)
        del a
        for old in list(live):
            if rng.random() < 0.3:
                del live[old]
        for array, value in live.values():
            assert array.min() == value == array.max()
    assert pool.stats()["hits"] - hits > 50


def test_the_limit_frees_the_least_recently_used_idle_blocks(pool):
    arrays = [pool.empty((BIG * 2,), np.float32) for _ in range(4)]
    held = pool.stats()["held_bytes"]
    del arrays
    assert pool.stats()["idle_bytes"] == held
    pool.set_limit(held // 2)
    assert pool.stats()["held_bytes"] <= held // 2
    assert pool.release() > 0 and pool.stats()["blocks"] == 0
    with pytest.raises(ValueError, match="nbytes"):
        pool.set_limit(-1)


def test_blocks_in_use_are_never_freed_by_the_limit(pool):
    pool.set_limit(0)
    a = pool.empty((BIG,), np.float32)
    a.fill(1.0)
    b = pool.empty((BIG,), np.float32)
    b.fill(2.0)
    assert a.min() == 1.0 == a.max() and b.min() == 2.0 == b.max()


def test_disabled_pool_gives_plain_arrays(pool):
    pool.set_enabled(False)
    a = pool.empty((BIG,), np.float32)
    assert a.base is None and pool.stats()["blocks"] == 0


def test_threads_never_share_a_block(pool):
    errors = []

    def work(value):
        for _ in range(200):
            a = pool.empty((BIG,), np.float32)
            a.fill(value)
            if not (a.min() == value == a.max()):
                errors.append(value)

    threads = [threading.Thread(target=work, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_the_environment_variable_turns_it_off():
    code = "import pycnn.memory as m; print(m.stats()['enabled'])"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "PYCNN_BUFFER_POOL": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _train(steps=3):
    pycnn.manual_seed(0)
    model = models.vgg(3, 16, 10, widths=(16, 32), convs_per_stage=1, dropout=0.25, rng=np.random.default_rng(0))
    opt = optim.SGD(optim.param_groups(model, weight_decay=5e-4), lr=0.05, momentum=0.9, nesterov=True)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(steps):
        x = rng.standard_normal((32, 3, 16, 16)).astype(np.float32)
        y = rng.integers(0, 10, 32)
        loss = F.softmax_cross_entropy(model(pycnn.Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    return losses, [p.data.copy() for _, p in model.named_parameters()]


def test_training_gives_the_same_numbers_with_and_without_the_pool(pool):
    hits = pool.stats()["hits"]
    with_pool = _train()
    assert pool.stats()["hits"] > hits
    pool.set_enabled(False)
    without = _train()
    assert with_pool[0] == without[0]
    for a, b in zip(with_pool[1], without[1]):
        np.testing.assert_array_equal(a, b)
