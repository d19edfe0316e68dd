"""Data: the CIFAR-10 readers (against files written in the official formats from the
bit-exact images of the shared copy), the download's error paths, ArrayDataset, DataLoader
(determinism, prefetch thread, shutdown) and BalancedSampler."""
from __future__ import annotations

import gc
import io
import os
import pickle
import struct
import tarfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from pycnn.data import ArrayDataset, BalancedSampler, DataLoader, datasets

THREAD_NAME = "pycnn-DataLoader-prefetch"


# ------------------------------------------------------------ writers of the official formats

class _Python2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` (BINSTRING) and NumPy globals as
    ``numpy.core``, as the official batches (pickled by Python 2's cPickle) do."""

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module and module.startswith("numpy._core"):
            name = name or obj.__qualname__
            self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core')}\n{name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch = pickle._Pickler.dispatch.copy()
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def batch_dict(images, labels):
    """The official python batch: channel-planar rows, labels as a list of ints."""
    return {b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(images.reshape(len(images), -1)),
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}


def write_pickle_batch(path, images, labels, style="py2"):
    batch = batch_dict(images, labels)
    with open(path, "wb") as f:
        if style == "py2":
            _Python2Pickler(f, protocol=2).dump(batch)
        elif style == "bytes-data":  # data as a plain byte string
            batch[b"data"] = batch[b"data"].tobytes()
            pickle.dump(batch, f, protocol=2)
        else:
            pickle.dump(batch, f, protocol=style)


def write_binary_batch(path, images, labels):
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    records.tofile(path)


@pytest.fixture(scope="module")
def exact_cifar():
    """Up to 600 bit-exact CIFAR-10 train images (N, 3, 32, 32) uint8 and their labels."""
    path = datasets.cifar10_dir() / "train.npz"
    if not path.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {path}")
    with np.load(path) as d:
        exact = d["exact"]
        x = d["x"][exact][:600]
        y = d["y"][exact][:600].astype(np.int64)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


# -------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("style", ["py2", 2, 4, 5, "bytes-data"])
def test_pickle_reader_is_bit_exact(tmp_path, exact_cifar, style):
    images, labels = exact_cifar
    path = tmp_path / "data_batch_1"
    write_pickle_batch(path, images, labels, style)
    got_images, got_labels = datasets.read_cifar10_pickle(path)
    assert got_images.dtype == np.uint8 and got_images.shape == images.shape
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.dtype == np.int64
    np.testing.assert_array_equal(got_labels, labels)


def test_channel_planar_layout(tmp_path):
    # the first 1024 bytes of a row are the red plane, row by row
    images = np.zeros((1, 3, 32, 32), np.uint8)
    images[0, 0, 0, 1] = 7   # red, row 0, column 1 -> byte 1
    images[0, 2, 1, 0] = 9   # blue, row 1, column 0 -> byte 2048 + 32
    write_binary_batch(tmp_path / "b.bin", images, np.array([3]))
    raw = np.fromfile(tmp_path / "b.bin", np.uint8)
    assert raw[0] == 3 and raw[1 + 1] == 7 and raw[1 + 2048 + 32] == 9
    got, label = datasets.read_cifar10_binary(tmp_path / "b.bin")
    np.testing.assert_array_equal(got, images)
    assert label.tolist() == [3]


def test_binary_reader_is_bit_exact(tmp_path, exact_cifar):
    images, labels = exact_cifar
    write_binary_batch(tmp_path / "data_batch_1.bin", images, labels)
    got_images, got_labels = datasets.read_cifar10_binary(tmp_path / "data_batch_1.bin")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_cifar10_reads_the_official_folders(tmp_path, exact_cifar):
    images, labels = exact_cifar
    parts = np.array_split(np.arange(500), 5)
    py, binary = tmp_path / "py" / "cifar-10-batches-py", tmp_path / "bin" / "cifar-10-batches-bin"
    py.mkdir(parents=True)
    binary.mkdir(parents=True)
    for i, part in enumerate(parts, start=1):
        write_pickle_batch(py / f"data_batch_{i}", images[part], labels[part])
        write_binary_batch(binary / f"data_batch_{i}.bin", images[part], labels[part])
    write_pickle_batch(py / "test_batch", images[500:], labels[500:])
    write_binary_batch(binary / "test_batch.bin", images[500:], labels[500:])
    for root in (tmp_path / "py", tmp_path / "bin", py):
        x, y = datasets.load_cifar10(root, "train")
        np.testing.assert_array_equal(x, images[:500])
        np.testing.assert_array_equal(y, labels[:500])
        x, y = datasets.load_cifar10(root, "test")
        np.testing.assert_array_equal(x, images[500:])
    with pytest.raises(FileNotFoundError, match="download_cifar10"):
        datasets.load_cifar10(tmp_path / "nothing", "train")
    with pytest.raises(ValueError, match="split"):
        datasets.load_cifar10(tmp_path / "py", "validation")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_other_globals(tmp_path):
    path = tmp_path / "data_batch_1"
    for payload in ({b"data": Evil(), b"labels": []}, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [Evil()]},
                    {b"data": np.zeros((1, 3072), np.uint8), b"labels": [1], b"x": threading.Lock}):
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
        with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
            datasets.read_cifar10_pickle(path)


def test_reader_errors_name_the_problem(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match="labels"):
        datasets.read_cifar10_pickle(path)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="uint8"):
        datasets.read_cifar10_pickle(path)
    with open(path, "wb") as f:  # 1.7 was read as 1
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1.7]}, f)
    with pytest.raises(ValueError, match="labels must be integers"):
        datasets.read_cifar10_pickle(path)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f)
    with pytest.raises(ValueError, match="1 labels for 2 images"):
        datasets.read_cifar10_pickle(path)
    (tmp_path / "x.bin").write_bytes(b"\x00" * 3074)
    with pytest.raises(ValueError, match="3073-byte"):
        datasets.read_cifar10_binary(tmp_path / "x.bin")


# ------------------------------------------------------------------------------ download

def test_download_without_network_names_the_url(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as info:
        datasets.download_cifar10(tmp_path)
    assert datasets.CIFAR10_URL in str(info.value)
    assert "cifar-10-python.tar.gz" in str(info.value)
    assert not list(tmp_path.iterdir())  # no partial file left


def _tarball(images, labels) -> bytes:
    buffer = io.BytesIO()
    member = io.BytesIO()
    _Python2Pickler(member, protocol=2).dump(batch_dict(images, labels))
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.size = len(member.getvalue())
        tar.addfile(info, io.BytesIO(member.getvalue()))
    return buffer.getvalue()


def test_download_checks_md5_and_unpacks(tmp_path, monkeypatch):
    import hashlib

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), np.array([0, 1, 2, 9])
    payload = _tarball(images, labels)
    calls = []

    def fake(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    with pytest.raises(ValueError, match="MD5 mismatch.*c58f30108f718f92721af3b95e74349a"):
        datasets.download_cifar10(tmp_path / "bad")  # the official MD5 does not match the fake
    assert not any((tmp_path / "bad").iterdir())

    md5 = hashlib.md5(payload).hexdigest()
    folder = datasets.download_cifar10(tmp_path / "good", md5=md5)
    assert folder == tmp_path / "good" / "cifar-10-batches-py"
    x, y = datasets.read_cifar10_pickle(folder / "test_batch")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    datasets.download_cifar10(tmp_path / "good", md5=md5)  # already there: not fetched again
    assert calls == [datasets.CIFAR10_URL] * 2


# ------------------------------------------------------------------------------ dataset

def test_array_dataset_validates_its_input():
    x = np.zeros((4, 3, 8, 8), np.uint8)
    y = np.array([0, 1, 2, 1])
    d = ArrayDataset(x, y)
    assert len(d) == 4 and d.num_classes == 3 and "4 images 3x8x8 uint8" in repr(d)
    assert ArrayDataset(x.astype(np.float32), y, num_classes=10).num_classes == 10
    cases = [((x[0], y), ValueError, "images must be a 4-D"),
             ((x.astype(np.int16), y), TypeError, "images must be uint8"),
             ((x, y[:, None]), ValueError, "labels must be a 1-D"),
             ((x, y.astype(float)), TypeError, "labels must be integers"),
             ((x, y[:3]), ValueError, "labels has 3 entries but images has 4"),
             ((x, np.array([0, -1, 2, 1])), ValueError, r"labels must be in \[0, 3\)")]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            ArrayDataset(*args)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        ArrayDataset(x, y, num_classes=2)


def _toy(n=103, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, 4, 4), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256  # an id in the first pixel
    return images, rng.integers(0, 5, n)


def test_loader_yields_float32_batches_covering_the_epoch():
    images, labels = _toy()
    loader = DataLoader(ArrayDataset(images, labels), batch_size=16, seed=3)
    assert len(loader) == 7
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16] * 6 + [7]
    seen = np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).astype(int)
    assert sorted(seen) == list(range(103))
    for x, y in batches:
        assert x.dtype == np.float32 and y.dtype == np.int64
        np.testing.assert_array_equal(x, images[x[:, 0, 0, 0].astype(int)])  # values unchanged
        np.testing.assert_array_equal(y, labels[x[:, 0, 0, 0].astype(int)])
    assert seen.tolist() != list(range(103))  # shuffled
    dropped = DataLoader((images, labels), batch_size=16, drop_last=True, prefetch=0)
    assert len(dropped) == 6 and [len(y) for _, y in dropped] == [16] * 6
    ordered = DataLoader((images, labels), batch_size=50, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([y for _, y in ordered]), labels)


def _random_transform(x, rng):
    """uint8 in: noise whose draws come from the generator the loader hands over."""
    assert x.dtype == np.uint8
    return x + rng.standard_normal(x.shape).astype(np.float32)


def _epochs(loader, n):
    return [[(x.copy(), y.copy()) for x, y in loader] for _ in range(n)]


def test_loader_is_deterministic_and_independent_of_prefetch():
    images, labels = _toy()
    runs = [_epochs(DataLoader((images, labels), 10, seed=5, transform=_random_transform, prefetch=p), 2)
            for p in (0, 1, 2, 5)]
    for run in runs[1:]:
        for epoch_a, epoch_b in zip(runs[0], run):
            for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
                np.testing.assert_array_equal(xa, xb)
                np.testing.assert_array_equal(ya, yb)
    first, second = runs[0]
    assert not np.array_equal(first[0][1], second[0][1])  # reshuffled each epoch
    other_seed = _epochs(DataLoader((images, labels), 10, seed=6, transform=_random_transform), 1)[0]
    assert not np.array_equal(first[0][1], other_seed[0][1])
    replay = DataLoader((images, labels), 10, seed=5, transform=_random_transform)
    replay.set_epoch(1)
    np.testing.assert_array_equal(next(iter(replay))[0], second[0][0])
    assert replay.epoch == 2


def test_loader_transform_without_rng_and_errors():
    images, labels = _toy()
    x, _ = next(iter(DataLoader((images, labels), 8, transform=lambda b: b / 255.0)))
    assert x.dtype == np.float32 and x.max() <= 1
    for kwargs, message in (({"batch_size": 0}, "batch_size"), ({"batch_size": 4, "prefetch": -1}, "prefetch"),
                            ({"batch_size": 4, "seed": -2}, "seed")):
        with pytest.raises(ValueError, match=message):
            DataLoader((images, labels), **kwargs)
    with pytest.raises(TypeError, match="transform"):
        DataLoader((images, labels), 4, transform=3)
    with pytest.raises(TypeError, match="sampler"):
        DataLoader((images, labels), 4, sampler=[1, 2])

    def broken(batch):
        raise ZeroDivisionError("bad transform")

    for prefetch in (0, 2):
        with pytest.raises(ZeroDivisionError, match="bad transform"):
            list(DataLoader((images, labels), 8, transform=broken, prefetch=prefetch))
    _wait_for_no_prefetch_threads()


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == THREAD_NAME]


def _wait_for_no_prefetch_threads(seconds=5.0):
    deadline = time.monotonic() + seconds
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _prefetch_threads()


def test_prefetch_thread_works_ahead_and_shuts_down_when_abandoned():
    images, labels = _toy(400)
    calls = []

    def slow(batch):
        calls.append(len(batch))
        time.sleep(0.005)
        return batch

    loader = DataLoader((images, labels), 4, transform=slow, prefetch=3)
    batches = iter(loader)
    next(batches)
    time.sleep(0.3)  # the training step: meanwhile the thread fills the queue (3 waiting + 1 blocked)
    assert len(calls) >= 3
    assert len(calls) <= 1 + 3 + 1  # bounded by prefetch
    assert len(_prefetch_threads()) == 1
    del batches  # abandoned after one batch of 100
    gc.collect()
    _wait_for_no_prefetch_threads()

    for _ in loader:  # abandoned by break
        break
    gc.collect()
    _wait_for_no_prefetch_threads()

    with iter(loader) as batches:  # closed explicitly
        next(batches)
    _wait_for_no_prefetch_threads()
    assert len(list(loader)) == 100  # a full epoch still works afterwards
    _wait_for_no_prefetch_threads()


# ------------------------------------------------------------------------------ sampler

def test_balanced_sampler_on_imbalanced_labels():
    labels = np.repeat([0, 1, 2, 4], [50, 10, 3, 20])
    up = BalancedSampler(labels, "upsample", seed=1)
    assert len(up) == 4 * 50
    idx = up.epoch_indices(0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [50, 50, 50, 0, 50])
    counts = np.bincount(idx, minlength=len(labels))
    assert counts[labels == 0].tolist() == [1] * 50               # majority class: each image once
    assert set(counts[labels == 2]) <= {16, 17}                   # minority: repeats spread evenly
    assert set(counts[labels == 1]) == {5}
    assert not np.array_equal(idx, up.epoch_indices(1))           # a new order every epoch
    np.testing.assert_array_equal(idx, BalancedSampler(labels, "upsample", seed=1).epoch_indices(0))

    down = BalancedSampler(labels, "downsample", seed=1)
    assert len(down) == 4 * 3
    idx0, idx1 = down.epoch_indices(0), down.epoch_indices(1)
    for idx in (idx0, idx1):
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [3, 3, 3, 0, 3])
        assert len(set(idx.tolist())) == len(idx)                 # majority images dropped, none repeated
    assert set(idx0[labels[idx0] == 0]) != set(idx1[labels[idx1] == 0])  # a fresh subset each epoch
    assert "downsample" in repr(down)
    with pytest.raises(ValueError, match="mode"):
        BalancedSampler(labels, "oversample")
    with pytest.raises(ValueError, match="labels"):
        BalancedSampler(labels.astype(float))


def test_loader_with_balanced_sampler():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [60, 15, 5])
    images = rng.integers(0, 256, (80, 1, 4, 4), dtype=np.uint8)
    loader = DataLoader((images, labels), 30, sampler=BalancedSampler(labels, "upsample", seed=2), seed=0)
    assert len(loader) == 6
    y = np.concatenate([y for _, y in loader])
    np.testing.assert_array_equal(np.bincount(y), [60, 60, 60])


# ------------------------------------------------------------ validation splits and folds

def test_stratified_holdout_is_exact_disjoint_and_proportional():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 100])
    kept, held = datasets.stratified_holdout(labels, 40, seed=3)
    assert len(held) == 40 and len(kept) == 160
    assert len(np.intersect1d(kept, held)) == 0 and len(np.union1d(kept, held)) == 200
    np.testing.assert_array_equal(np.bincount(labels[held]), [2, 4, 6, 8, 20])  # 20% of every class
    again = datasets.stratified_holdout(labels, 40, seed=3)[1]
    np.testing.assert_array_equal(held, again)
    assert not np.array_equal(held, datasets.stratified_holdout(labels, 40, seed=4)[1])
    # rounding goes to the largest remainders, and no class is emptied on either side
    kept, held = datasets.stratified_holdout(np.array([0, 0, 1, 1, 1, 2, 2, 2, 2]), 4)
    assert len(held) == 4 and set(np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])[kept]) == {0, 1, 2}
    with pytest.raises(ValueError, match="size must be an integer in"):
        datasets.stratified_holdout(labels, 200)
    with pytest.raises(ValueError, match="size must be an integer in"):
        datasets.stratified_holdout(labels, 2.5)


def test_stratified_folds_partition_the_data_evenly():
    labels = np.repeat(np.arange(3), [9, 10, 11])
    folds = datasets.stratified_folds(labels, 3, seed=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), np.arange(30))
    assert [len(f) for f in folds] == [10, 10, 10]
    for f in folds:
        assert np.all(np.abs(np.bincount(labels[f], minlength=3) - [3, 10 / 3, 11 / 3]) <= 1)
    with pytest.raises(ValueError, match="folds must be an integer"):
        datasets.stratified_folds(labels, 1)


def test_select_classes_relabels_in_the_given_order():
    images = np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1)
    labels = np.array([0, 1, 2, 1, 0, 2])
    x, y = datasets.select_classes(images, labels, [2, 0])
    np.testing.assert_array_equal(x[:, 0, 0, 0], [0, 2, 4, 5])
    np.testing.assert_array_equal(y, [1, 0, 1, 0])
    with pytest.raises(ValueError, match=r"labels \[7\] do not occur"):
        datasets.select_classes(images, labels, [0, 7])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_loader_starts_inside_an_epoch_with_the_same_batches(prefetch):
    images = np.random.default_rng(0).integers(0, 255, (50, 1, 4, 4), dtype=np.uint8)
    labels = np.arange(50) % 5

    def noisy(x, rng):
        return x + rng.standard_normal(x.shape).astype(np.float32)

    loader = DataLoader((images, labels), 8, seed=1, transform=noisy, prefetch=prefetch)
    loader.set_epoch(3)
    whole = list(loader)
    loader.set_epoch(3, start_batch=4)
    rest = list(loader)
    assert len(rest) == len(whole) - 4
    for (a, la), (b, lb) in zip(whole[4:], rest):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
    assert loader.epoch == 4 and len(list(loader)) == len(whole)  # the next epoch starts at batch 0 again
    with pytest.raises(ValueError, match="start_batch must be a non-negative integer"):
        loader.set_epoch(0, start_batch=-1)


def test_stratified_holdout_holds_out_a_member_of_every_class_it_can():
    """A class of 2 among classes of 20 got no validation image with 6 held out (the
    docstring promised one on each side); over random class sizes both sides get a member
    of every class of two or more wherever the sizes allow."""
    labels = np.repeat([0, 1, 2], [20, 20, 2])
    kept, held = datasets.stratified_holdout(labels, 6)
    assert np.bincount(labels[held])[2] == 1 and np.bincount(labels[kept])[2] == 1
    rng = np.random.default_rng(0)
    for trial in range(500):
        counts = rng.integers(1, 30, rng.integers(1, 7))
        labels = np.repeat(np.arange(len(counts)), counts)
        n = len(labels)
        if n < 2:
            continue
        size = int(rng.integers(1, n))
        kept, held = datasets.stratified_holdout(labels, size, seed=trial)
        assert len(held) == size and len(np.union1d(kept, held)) == n
        several = counts >= 2
        kept_counts = np.bincount(labels[kept], minlength=len(counts))
        held_counts = np.bincount(labels[held], minlength=len(counts))
        if n - size >= several.sum():
            assert np.all(kept_counts[several] >= 1), (counts, size)
        if size >= several.sum() and n - size >= several.sum():
            assert np.all(held_counts[several] >= 1), (counts, size)


def test_data_loader_takes_a_list_pair_like_a_tuple():
    from pycnn.data.loader import DataLoader
    x = np.zeros((3, 1, 2, 2), np.uint8)
    loader = DataLoader([x, np.array([0, 1, 2])], 2)
    assert len(loader) == 2 and [b[0].shape[0] for b in loader] == [2, 1]
    with pytest.raises(TypeError, match="dataset must be"):
        DataLoader([x], 2)
