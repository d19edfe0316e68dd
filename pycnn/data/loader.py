"""Feeding a training loop: an in-memory dataset, a batching loader with a background
prefetch thread, and class-balanced sampling.

    from pycnn.data import augment, datasets, preprocess
    from pycnn import data
    images, labels = datasets.cifar10_shared("train")          # uint8 (N, 3, 32, 32), int64
    norm = preprocess.Standardise(per="channel").fit(images)
    loader = data.DataLoader(data.ArrayDataset(images, labels), batch_size=128, seed=0,
                             transform=augment.Compose([augment.RandomFlip(),
                                                        augment.RandomCrop(padding=4), norm]))
    for epoch in range(epochs):
        for x, y in loader:        # x float32 (128, 3, 32, 32), y int64 (128,)
            ...

Conventions: images stay uint8 in memory until a batch is gathered; a batch is made float32
only after the transform ran (so flips and crops move bytes, not floats).  Everything random
is drawn from generators seeded by ``(seed, epoch, batch)``: the same seed gives the same
batches whatever ``prefetch`` is, and never depends on the wall clock.
"""
from __future__ import annotations

import queue
import threading
import weakref

import numpy as np

from pycnn.data.augment import with_rng
from pycnn.device import array_module, to_host
from pycnn.ops import _util

__all__ = ["ArrayDataset", "BalancedSampler", "DataLoader"]


# --------------------------------------------------------------------------------- dataset

class ArrayDataset:
    """Images (N, C, H, W) — uint8 or float — and integer labels (N,), held in memory (NumPy or
    CuPy arrays; they are not copied).  ``dataset[idx]`` gathers (images[idx], labels[idx])."""

    def __init__(self, images, labels, num_classes: int | None = None):
        xp = array_module(images)
        if not hasattr(images, "ndim") or images.ndim != 4:
            raise ValueError(f"images must be a 4-D array (N, C, H, W), got shape {getattr(images, 'shape', None)}")
        if not (images.dtype == np.uint8 or images.dtype.kind == "f"):
            raise TypeError(f"images must be uint8 or floating point, got dtype {images.dtype}")
        if not hasattr(labels, "ndim") or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array (N,), got shape {getattr(labels, 'shape', None)}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"labels has {len(labels)} entries but images has {len(images)}")
        if len(labels) == 0:
            raise ValueError("images and labels are empty")
        low, high = int(labels.min()), int(labels.max())
        if num_classes is None:
            num_classes = high + 1
        if low < 0 or high >= num_classes:
            raise ValueError(f"labels must be in [0, {num_classes}), got values in [{low}, {high}]")
        self.images, self.labels, self.num_classes = images, labels, int(num_classes)
        self.xp = xp

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ArrayDataset({n} images {c}x{h}x{w} {self.images.dtype}, {self.num_classes} classes)"


# --------------------------------------------------------------------------------- sampler

class BalancedSampler:
    """Per-epoch indices in which every class present in ``labels`` appears equally often.

    * ``mode="upsample"``: every class is brought up to the size of the largest; a minority
      class repeats each of its images ``target // n`` times plus a random ``target % n`` of
      them once more (so repeats are spread as evenly as possible);
    * ``mode="downsample"``: every class is cut to the size of the smallest, a fresh random
      subset each epoch.

    The order is shuffled; ``epoch_indices(epoch)`` depends only on (seed, epoch)."""

    def __init__(self, labels, mode: str = "upsample", seed: int = 0):
        if mode not in ("upsample", "downsample"):
            raise ValueError(f"mode must be 'upsample' or 'downsample', got {mode!r}")
        labels = to_host(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D integer array, got shape {labels.shape} "
                             f"dtype {labels.dtype}")
        self.mode, self.seed = mode, int(seed)
        self.classes, inverse = np.unique(labels, return_inverse=True)
        self.members = [np.flatnonzero(inverse == k) for k in range(len(self.classes))]
        counts = [len(m) for m in self.members]
        self.per_class = max(counts) if mode == "upsample" else min(counts)

    def __len__(self) -> int:
        return self.per_class * len(self.classes)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(epoch), 0xBA1A])
        chosen = []
        for members in self.members:
            repeats, extra = divmod(self.per_class, len(members))
            chosen.append(np.tile(members, repeats))
            chosen.append(rng.choice(members, size=extra, replace=False))
        return rng.permutation(np.concatenate(chosen))

    def __repr__(self) -> str:
        return (f"BalancedSampler(mode={self.mode!r}, {len(self.classes)} classes x {self.per_class}, "
                f"seed={self.seed})")


# ------------------------------------------------------------------------------ the loader

class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def _produce(make_batch, count, out: queue.Queue, stop: threading.Event):
    """Worker thread: make batches 0..count-1 in order and put them on ``out`` (bounded, so
    at most ``prefetch`` batches wait); gives up as soon as ``stop`` is set."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for b in range(count):
            if stop.is_set() or not put(make_batch(b)):
                return
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
        put(_Failure(exc))
        return
    put(_END)


def _shutdown(stop: threading.Event, out: queue.Queue, thread: threading.Thread):
    stop.set()
    if thread is threading.current_thread():  # collected inside the worker itself: it is ending
        return
    while True:  # unblock a producer waiting on a full queue
        try:
            out.get_nowait()
        except queue.Empty:
            break
    thread.join(timeout=10)


class _EpochIterator:
    """One pass over the data.  With ``prefetch > 0`` a background thread prepares the next
    batches; ``close()`` (also called when the iterator is exhausted, garbage-collected or used
    as a context manager) stops and joins it."""

    def __init__(self, make_batch, count: int, prefetch: int):
        self._make_batch, self._count, self._next = make_batch, count, 0
        self._thread = None
        if prefetch > 0 and count > 0:
            self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=_produce, args=(make_batch, count, self._queue, self._stop),
                                            name="pycnn-DataLoader-prefetch", daemon=True)
            self._thread.start()
            # the thread holds no reference to self, so an abandoned iterator is collected and
            # this finaliser stops the thread
            self._finalizer = weakref.finalize(self, _shutdown, self._stop, self._queue, self._thread)

    def __iter__(self):
        return self

    def __next__(self):
        if self._next >= self._count:
            self.close()
            raise StopIteration
        if self._thread is None:
            item = self._make_batch(self._next)
        else:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("the DataLoader prefetch thread stopped unexpectedly") from None
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            if item is _END:  # pragma: no cover - count guards this
                self.close()
                raise StopIteration
        self._next += 1
        return item

    def close(self) -> None:
        if self._thread is not None:
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __len__(self) -> int:
        return self._count - self._next


class DataLoader:
    """Mini-batches ``(x float32 (B, C, H, W), labels int64 (B,))`` from a dataset.

    * ``dataset``: an ``ArrayDataset`` (or an ``(images, labels)`` pair, wrapped in one);
    * ``shuffle``: a fresh permutation every epoch, seeded by ``(seed, epoch)``;
    * ``sampler``: an object with ``epoch_indices(epoch)`` (e.g. ``BalancedSampler``); when given
      it decides which indices make an epoch and in which order, and ``shuffle`` is not used;
    * ``transform``: a callable on a batch (images as stored, e.g. uint8), such as
      ``augment.Compose([...])``; when it accepts a generator (``transform(x, rng)`` or an
      ``rng`` keyword) it gets one seeded by ``(seed, epoch, batch index)``, so results do not
      depend on ``prefetch``.  Its output is converted to float32;
    * ``prefetch``: how many batches a background thread prepares ahead of the training step
      (0: none, everything in the caller's thread).  NumPy releases the GIL in most array
      operations, so gathering and augmenting overlap with the step.

    Each ``iter(loader)`` is the next epoch (0, 1, 2, ...); ``set_epoch(e)`` chooses it.
    Abandoning an iteration (``break``) stops its thread: the iterator's ``close()`` runs
    when it is garbage-collected, or use ``with iter(loader) as batches:``."""

    def __init__(self, dataset, batch_size: int, shuffle: bool = True, seed: int = 0, transform=None,
                 drop_last: bool = False, sampler=None, prefetch: int = 2):
        if isinstance(dataset, (tuple, list)) and len(dataset) == 2:  # (images, labels), [images, labels]
            dataset = ArrayDataset(*dataset)
        if isinstance(dataset, (list, tuple)) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            raise TypeError("dataset must be an ArrayDataset or an (images, labels) pair, "
                            f"got {type(dataset).__name__}")
        for name, value, low in (("batch_size", batch_size, 1), ("prefetch", prefetch, 0), ("seed", seed, 0)):
            _util.check_integer(name, value, low)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if sampler is not None and not hasattr(sampler, "epoch_indices"):
            raise TypeError(f"sampler must have an epoch_indices(epoch) method, got {type(sampler).__name__}")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), bool(shuffle), int(seed)
        self.transform, self.drop_last, self.sampler, self.prefetch = transform, bool(drop_last), sampler, int(prefetch)
        self._transform_call = None if transform is None else with_rng(transform)
        self.epoch = 0
        self._start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The epoch the next ``iter(loader)`` runs (it then counts on from there), and the
        batch it starts at (to resume inside an epoch: the batches are the same as those of an
        uninterrupted pass, since everything random depends on (seed, epoch, batch) only)."""
        for name, value in (("epoch", epoch), ("start_batch", start_batch)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        self.epoch, self._start_batch = int(epoch), int(start_batch)

    def _epoch_indices(self, epoch: int) -> np.ndarray:
        if self.sampler is not None:
            return np.asarray(self.sampler.epoch_indices(epoch), dtype=np.int64)
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        return np.arange(len(self.dataset))

    def _count(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return self._count(n)

    def __iter__(self) -> _EpochIterator:
        epoch, start = self.epoch, self._start_batch
        self.epoch, self._start_batch = self.epoch + 1, 0
        order = self._epoch_indices(epoch)
        xp = array_module(self.dataset.images) if hasattr(self.dataset, "images") else np
        dataset, transform = self.dataset, self._transform_call
        seed, size = self.seed, self.batch_size

        def make_batch(b: int):
            b += start
            index = order[b * size:(b + 1) * size]
            images, labels = dataset[index if xp is np else xp.asarray(index)]
            if transform is not None:  # the generator is made whether the transform takes it or not
                images = transform(images, np.random.default_rng([seed, epoch, b, 0xA06]))
            x = images.astype(np.float32, copy=False) if images.dtype != np.float32 else images
            return x, labels.astype(np.int64, copy=False)

        return _EpochIterator(make_batch, max(self._count(len(order)) - start, 0), self.prefetch)

    def __repr__(self) -> str:
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"seed={self.seed}, transform={self.transform!r}, drop_last={self.drop_last}, "
                f"sampler={self.sampler!r}, prefetch={self.prefetch})")
