"""Datasets as (images, labels) arrays: images uint8 (N, C, H, W), labels int64 (N,).

* ``digits()``: the 1,797 8x8 handwritten digits (UCI, via scikit-learn's bundled copy):
  real data that works offline on a fresh machine.
* ``cifar10_shared(split)``: CIFAR-10 from the project's shared data folder.
* ``read_cifar10_pickle`` / ``read_cifar10_binary`` / ``load_cifar10``: readers of the official
  CIFAR-10 python and binary batches; ``download_cifar10(dest)`` fetches the official tarball
  (MD5-checked).  The python batches are pickles: they are read with a restricted unpickler
  that allows only plain builtins and NumPy's array reconstruction, never arbitrary classes.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

# the checkout is REPO (pycnn/data/datasets.py inside it); the shared data sit beside it
SHARED_CIFAR10 = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10"


def digits():
    """(images uint8 (1797, 1, 8, 8) in 0..255, labels int64 (1797,)); pixel values 0..16
    in the source are scaled by 255/16."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, data.target.astype(np.int64)


def cifar10_dir() -> Path:
    """Where the shared CIFAR-10 copy lives (PYCNN_CIFAR10_DIR overrides)."""
    return Path(os.environ.get("PYCNN_CIFAR10_DIR", SHARED_CIFAR10))


def cifar10_shared(split: str = "train"):
    """CIFAR-10 (images uint8 (N, 3, 32, 32), labels int64) from the shared npz copy."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = cifar10_dir() / f"{split}.npz"
    if not path.exists():
        raise FileNotFoundError(f"CIFAR-10 {split} split not found at {path} (set PYCNN_CIFAR10_DIR)")
    with np.load(path) as data:
        return np.ascontiguousarray(data["x"].transpose(0, 3, 1, 2)), data["y"].astype(np.int64)


def train_test_split(images, labels, test_fraction: float, seed: int = 0):
    """A stratified split: every class keeps the same share in both parts."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        test.append(members[: max(1, int(round(test_fraction * len(members))))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return images[train], labels[train], images[test], labels[test]


def stratified_holdout(labels, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept indices, held-out indices), both sorted: exactly ``size`` indices held out, every
    class in proportion to its share of ``labels`` (largest remainders get the rounding), each
    class keeping at least one member on both sides where it has two or more (on the held-out
    side: where ``size`` is at least the number of such classes)."""
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 0 < size < n:
        raise ValueError(f"size must be an integer in [1, {n - 1}] for {n} labels, got {size!r}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (size / n)
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: size - take.sum()]] += 1
    # keep a member of each class on both sides where possible, moving the surplus elsewhere
    take = np.minimum(take, np.maximum(counts - 1, 0))
    several = counts >= 2
    if size >= several.sum():  # a rare class still gets a held-out member
        take[several] = np.maximum(take[several], 1)
        while take.sum() > size:  # ... paid for by the class most above its share
            over = np.flatnonzero(take > several.astype(np.int64))
            take[over[np.argmax(take[over] - exact[over])]] -= 1
    while take.sum() < size:
        room = np.flatnonzero(take < counts - 1)
        if len(room) == 0:  # a class of one member before the last kept member of another
            room = np.flatnonzero((take < counts) & (counts == 1))
        if len(room) == 0:
            room = np.flatnonzero(take < counts)
        take[room[np.argmax(counts[room] - take[room])]] += 1
    rng = np.random.default_rng(seed)
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(n), held), held


def stratified_folds(labels, folds: int, seed: int = 0) -> list[np.ndarray]:
    """``folds`` disjoint sorted index arrays covering ``labels``, every class spread over the
    folds as evenly as possible (k-fold cross-validation: fold i validates, the rest trains)."""
    labels = np.asarray(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or not 2 <= folds <= len(labels):
        raise ValueError(f"folds must be an integer in [2, {len(labels)}], got {folds!r}")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(folds)]
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for i in range(folds):  # rotate the start so that remainders do not all land in fold 0
            parts[(i + offset) % folds].append(members[i::folds])
        offset += len(members) % folds
    return [np.sort(np.concatenate(p)) for p in parts]


def select_classes(images, labels, classes):
    """Only the images of ``classes`` (a sequence of labels), relabelled 0..len(classes)-1 in
    the order given."""
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must not repeat, got {classes}")
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"labels {missing} do not occur (the labels are {sorted(present)})")
    mapping = np.full(int(max(present | set(classes))) + 1, -1, np.int64)
    mapping[classes] = np.arange(len(classes))
    keep = np.flatnonzero(mapping[labels] >= 0)
    return images[keep], mapping[labels[keep]]


# ------------------------------------------------------------------ CIFAR-10, official formats

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_CIFAR10_SHAPE = (3, 32, 32)
_CIFAR10_PIXELS = 3 * 32 * 32  # 3072 bytes: 1024 R, 1024 G, 1024 B, rows top to bottom


def _numpy_pickle_globals() -> dict:
    """The few NumPy callables a pickled ndarray refers to, under both module spellings
    (Python 2 / NumPy 1 wrote ``numpy.core``, NumPy 2 writes ``numpy._core``)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as Python 3 uses it to pickle bytes at protocol <= 2, limited to
    a str and latin-1."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that refuses every global except the plain builtins (dict, list, bytes,
    str, int), the NumPy array reconstructors (``numpy.ndarray``, ``numpy.dtype``,
    ``_reconstruct``, ``_frombuffer``, ``scalar``) and ``_codecs.encode`` limited to latin-1
    (how Python 3 writes bytes in protocol-2 pickles).  The official CIFAR-10 batches are
    pickles whose ``b"data"`` is a NumPy array, so those few names are needed; anything else
    (``os.system``, arbitrary classes) raises ``pickle.UnpicklingError`` instead of running."""

    _BUILTINS = {name: getattr(builtins, name) for name in ("dict", "list", "bytes", "str", "int")}

    def find_class(self, module, name):
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return self._BUILTINS[name]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        allowed = _numpy_pickle_globals().get((module, name))
        if allowed is not None:
            return allowed
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: CIFAR-10 batches hold only dicts, lists, bytes, "
            "str, int and uint8 NumPy arrays (restricted unpickler)")


def _restricted_load(path: Path):
    with open(path, "rb") as f:
        # encoding="bytes": the official batches were written by Python 2 (keys are b"data" ...)
        return _RestrictedUnpickler(f, encoding="bytes").load()


def read_cifar10_pickle(path) -> tuple[np.ndarray, np.ndarray]:
    """One official python batch (``data_batch_1`` ... ``test_batch``) as (images uint8
    (N, 3, 32, 32), labels int64 (N,)).

    The file is a pickle; it is loaded with a restricted unpickler that only allows the
    builtins dict/list/bytes/str/int and NumPy's array reconstruction, never arbitrary
    classes or functions (see ``_RestrictedUnpickler``)."""
    path = Path(path)
    batch = _restricted_load(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch needs the keys b'data' and b'labels', got {sorted(batch)}")
    data = batch["data"]
    if isinstance(data, (bytes, bytearray)):
        data = np.frombuffer(data, dtype=np.uint8)
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be uint8, got {data.dtype}")
    if data.size % _CIFAR10_PIXELS:
        raise ValueError(f"{path}: b'data' has {data.size} bytes, not a multiple of {_CIFAR10_PIXELS}")
    images = np.ascontiguousarray(data.reshape(-1, *_CIFAR10_SHAPE))
    raw = np.asarray(batch["labels"])
    if raw.dtype.kind not in "iu":  # 1.7 would be truncated to 1
        raise ValueError(f"{path}: labels must be integers, got {raw.dtype}")
    labels = raw.astype(np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"{path}: {len(labels)} labels for {len(images)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must be in 0..9, got {labels.min()}..{labels.max()}")
    return images, labels


def read_cifar10_binary(path) -> tuple[np.ndarray, np.ndarray]:
    """One official binary batch (``data_batch_1.bin`` ... ``test_batch.bin``): records of
    1 label byte + 3072 pixel bytes; returns (images uint8 (N, 3, 32, 32), labels int64)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    record = 1 + _CIFAR10_PIXELS
    if raw.size % record:
        raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR-10 records")
    raw = raw.reshape(-1, record)
    labels = raw[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise ValueError(f"{path}: labels must be in 0..9, got up to {labels.max()}")
    return np.ascontiguousarray(raw[:, 1:].reshape(-1, *_CIFAR10_SHAPE)), labels


def load_cifar10(root, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 from the official files under ``root`` (the folder holding
    ``cifar-10-batches-py/`` or ``cifar-10-batches-bin/``, or either folder itself).
    Python batches are preferred where both are present."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    names = CIFAR10_TRAIN_BATCHES if split == "train" else CIFAR10_TEST_BATCHES
    for folder, suffix, reader in (("cifar-10-batches-py", "", read_cifar10_pickle),
                                   ("cifar-10-batches-bin", ".bin", read_cifar10_binary)):
        for base in (root / folder, root):
            paths = [base / f"{name}{suffix}" for name in names]
            if all(p.is_file() for p in paths):
                parts = [reader(p) for p in paths]
                return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    raise FileNotFoundError(
        f"no CIFAR-10 {split} batches under {root} (looked for cifar-10-batches-py/{names[0]} and "
        f"cifar-10-batches-bin/{names[0]}.bin); download_cifar10({str(root)!r}) fetches them from {CIFAR10_URL}")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_cifar10(dest, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, timeout: float = 60.0) -> Path:
    """Fetch the official python tarball into ``dest``, check its MD5 and unpack it; returns
    the ``cifar-10-batches-py`` folder.  Nothing is fetched when the tarball with the right MD5
    is already there.  Without a network this raises ``ConnectionError`` naming ``url`` (fetch
    the file by hand and put it in ``dest``); a wrong MD5 raises ``ValueError`` and the bad file
    is deleted."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / url.rsplit("/", 1)[-1]
    if not (archive.is_file() and _md5(archive) == md5):
        partial = archive.with_name(archive.name + ".part")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out, length=1 << 20)
        except (OSError, urllib.error.URLError) as exc:
            partial.unlink(missing_ok=True)
            raise ConnectionError(
                f"could not download CIFAR-10 from {url} ({exc}); without a network, fetch that file by "
                f"hand and put it at {archive}") from exc
        actual = _md5(partial)
        if actual != md5:
            partial.unlink()
            raise ValueError(f"MD5 mismatch for {url}: expected {md5}, got {actual} (the download was deleted)")
        partial.replace(archive)
    with tarfile.open(archive, "r:gz") as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse links and absolute paths
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            for member in tar.getmembers():
                target = (dest / member.name).resolve()
                if not (member.isfile() or member.isdir()) or dest.resolve() not in target.parents:
                    raise ValueError(f"{archive}: unsafe member {member.name!r}")
            tar.extractall(dest)
    return dest / "cifar-10-batches-py"
