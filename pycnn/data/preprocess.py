"""Pre-processing fitted on training images and applied to every batch.

Each pre-processor is fitted on training images (N, C, H, W) — uint8, as the data sets keep
them, or float — streamed ``batch`` images at a time (never a float copy of the whole set),
then called on a batch: ``p(x)`` returns float32 on the device of ``x`` (NumPy or CuPy).
Its fitted state is ``p.state_dict()``, a dict of NumPy arrays (``"type"`` names the class),
so it can be stored in an ``.npz`` next to a model's weights;
``preprocess.from_state_dict(state)`` (or ``Class.from_state_dict``) rebuilds it exactly.

    norm = preprocess.Standardise(per="channel").fit(train_images)
    np.savez("model.npz", **{f"preprocess.{k}": v for k, v in norm.state_dict().items()}, ...)

Values are in the units of the fitted data (uint8: 0..255), except the whiteners, which
first multiply by ``scale`` (default 1/255) so that ``epsilon`` reads in [0, 1] units.

* ``SubtractMeanImage``    x - mean image (C, H, W)
* ``SubtractChannelMean``  x - per-channel mean (C,)
* ``Standardise``          (x - mean) / std, per channel or per pixel
* ``MinMaxScale``          affine map of the fitted [min, max] onto [-1, 1] (global or per channel)
* ``PCAWhiten``            projection on the principal components, each scaled to unit variance
* ``ZCAWhiten``            PCA whitening rotated back to pixel space (images still look like images)
"""
from __future__ import annotations

import numpy as np

from pycnn.device import array_module, to_host

__all__ = ["Preprocessor", "SubtractMeanImage", "SubtractChannelMean", "Standardise", "MinMaxScale",
           "PCAWhiten", "ZCAWhiten", "from_state_dict"]

_CLASSES: dict[str, type] = {}


def _check_images(images, name: str = "images"):
    if not hasattr(images, "ndim") or images.ndim != 4:
        raise ValueError(f"{name} must be a batch (N, C, H, W), got shape {getattr(images, 'shape', None)}")
    if not (images.dtype == np.uint8 or images.dtype.kind == "f"):
        raise TypeError(f"{name} must be uint8 or floating point, got dtype {images.dtype}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")


def _check_batch_size(batch):
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")


def _chunks(images, batch: int, index=None):
    """float64 host chunks of ``images`` (or of ``images[index]``), ``batch`` images each."""
    n = len(images) if index is None else len(index)
    for start in range(0, n, batch):
        part = images[start:start + batch] if index is None else images[index[start:start + batch]]
        chunk = to_host(part).astype(np.float64)
        if not np.isfinite(chunk).all():  # a NaN would become every statistic, silently
            raise ValueError("images must be finite to fit a pre-processor: they hold NaN or inf")
        yield chunk


class _Moments:
    """Streaming mean and sum of squared deviations (Chan et al.'s pairwise merge), reducing
    ``axis`` of each chunk."""

    def __init__(self, axis):
        self.axis, self.count, self.mean, self.m2 = axis, 0, None, None

    def add(self, values: np.ndarray) -> None:
        count = values.size // int(np.prod([values.shape[a] for a in range(values.ndim) if a not in self.axis]))
        mean = values.mean(axis=self.axis, keepdims=True)
        m2 = ((values - mean) ** 2).sum(axis=self.axis, keepdims=True)
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * count / total)
        self.count = total

    def result(self):
        """(mean, population variance), with the reduced axes dropped."""
        squeeze = tuple(self.axis)
        return self.mean.squeeze(squeeze), (self.m2 / self.count).squeeze(squeeze)


class Preprocessor:
    """Base class: ``fit(images, batch)``, ``__call__(x)``, ``state_dict()``, ``from_state_dict``.
    Subclasses list their fitted arrays in ``_arrays`` and their settings in ``_settings``."""

    _arrays: tuple[str, ...] = ()
    _settings: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _CLASSES[cls.__name__] = cls

    @property
    def fitted(self) -> bool:
        return all(getattr(self, name, None) is not None for name in self._arrays)

    def _require_fitted(self):
        if not self.fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(images) first")

    def _device(self, xp, name):
        """The fitted array ``name`` as float32 on the device of ``xp`` (cached)."""
        cache = self.__dict__.setdefault("_device_cache", {})
        key = (xp.__name__, name)
        if key not in cache:
            cache[key] = xp.asarray(getattr(self, name).astype(np.float32))
        return cache[key]

    def _check_input(self, x):
        _check_images(x, "x")
        self._require_fitted()
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"x must have images of shape {tuple(self.image_shape)} (as fitted), "
                             f"got {tuple(x.shape[1:])}")
        return array_module(x)

    def state_dict(self) -> dict:
        self._require_fitted()
        state = {"type": np.array(type(self).__name__), "image_shape": np.array(self.image_shape, dtype=np.int64)}
        # a setting that is None is stored as an empty array (npz files hold no Python objects)
        state.update({name: np.array([]) if getattr(self, name) is None else np.array(getattr(self, name))
                      for name in self._settings})
        state.update({name: np.array(getattr(self, name)) for name in self._arrays})
        return state

    @classmethod
    def from_state_dict(cls, state) -> Preprocessor:
        kind = str(state["type"])
        if kind != cls.__name__:
            raise ValueError(f"state is a {kind}, not a {cls.__name__}")
        p = cls(**{name: None if np.asarray(state[name]).size == 0 else np.asarray(state[name]).item()
                   for name in cls._settings})
        p.image_shape = tuple(int(v) for v in state["image_shape"])
        for name in cls._arrays:
            setattr(p, name, np.array(state[name]))
        return p

    def __repr__(self) -> str:
        def show(value):
            return f"{value:g}" if isinstance(value, float) else repr(value)
        settings = ", ".join(f"{name}={show(getattr(self, name))}" for name in self._settings)
        fitted = f"fitted on images {tuple(self.image_shape)}" if self.fitted else "not fitted"
        return f"{type(self).__name__}({settings}{', ' if settings else ''}{fitted})"


def from_state_dict(state) -> Preprocessor:
    """Rebuild any pre-processor from its ``state_dict()`` (also from an ``np.load``-ed npz)."""
    kind = str(state["type"])
    if kind not in _CLASSES:
        raise ValueError(f"unknown pre-processor type {kind!r}; known: {sorted(_CLASSES)}")
    return _CLASSES[kind].from_state_dict(state)


# --------------------------------------------------------------------------- mean and std

class SubtractMeanImage(Preprocessor):
    """x - the mean training image (C, H, W)."""

    _arrays = ("mean",)

    def __init__(self):
        self.mean = None

    def fit(self, images, batch: int = 1024) -> SubtractMeanImage:
        _check_images(images)
        _check_batch_size(batch)
        total = np.zeros(images.shape[1:])
        for chunk in _chunks(images, batch):
            total += chunk.sum(axis=0)
        self.mean, self.image_shape = total / len(images), tuple(images.shape[1:])
        return self

    def __call__(self, x):
        xp = self._check_input(x)
        return x.astype(np.float32) - self._device(xp, "mean")


class SubtractChannelMean(Preprocessor):
    """x - the per-channel mean of the training pixels (C,)."""

    _arrays = ("mean",)

    def __init__(self):
        self.mean = None

    def fit(self, images, batch: int = 1024) -> SubtractChannelMean:
        _check_images(images)
        _check_batch_size(batch)
        total = np.zeros(images.shape[1])
        for chunk in _chunks(images, batch):
            total += chunk.sum(axis=(0, 2, 3))
        n, _, h, w = images.shape
        self.mean, self.image_shape = total / (n * h * w), tuple(images.shape[1:])
        return self

    def __call__(self, x):
        xp = self._check_input(x)
        return x.astype(np.float32) - self._device(xp, "mean")[:, None, None]


class Standardise(Preprocessor):
    """(x - mean) / std with mean and std per channel (``per="channel"``: (C,), over all pixels
    of all images) or per pixel (``per="pixel"``: (C, H, W), over images).  A std below
    ``eps`` counts as ``eps`` (a constant pixel, say a border, is not blown up)."""

    _arrays = ("mean", "std")
    _settings = ("per", "eps")

    def __init__(self, per: str = "channel", eps: float = 1e-6):
        if per not in ("channel", "pixel"):
            raise ValueError(f"per must be 'channel' or 'pixel', got {per!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.per, self.eps = per, float(eps)
        self.mean = self.std = None

    def fit(self, images, batch: int = 1024) -> Standardise:
        _check_images(images)
        _check_batch_size(batch)
        moments = _Moments((0, 2, 3) if self.per == "channel" else (0,))
        for chunk in _chunks(images, batch):
            moments.add(chunk)
        mean, var = moments.result()
        self.mean, self.std, self.image_shape = mean, np.maximum(np.sqrt(var), self.eps), tuple(images.shape[1:])
        return self

    def __call__(self, x):
        xp = self._check_input(x)
        mean, std = self._device(xp, "mean"), self._device(xp, "std")
        if self.per == "channel":
            mean, std = mean[:, None, None], std[:, None, None]
        return (x.astype(np.float32) - mean) / std


class MinMaxScale(Preprocessor):
    """Map the training range [min, max] onto [-1, 1]: ``2 (x - min) / (max - min) - 1``, with
    min and max over everything (``per="global"``) or per channel (``per="channel"``).  New data
    outside the training range lands outside [-1, 1] (no clipping)."""

    _arrays = ("low", "high")
    _settings = ("per",)

    def __init__(self, per: str = "global"):
        if per not in ("global", "channel"):
            raise ValueError(f"per must be 'global' or 'channel', got {per!r}")
        self.per = per
        self.low = self.high = None

    def fit(self, images, batch: int = 1024) -> MinMaxScale:
        _check_images(images)
        _check_batch_size(batch)
        axis = None if self.per == "global" else (0, 2, 3)
        low = high = None
        for chunk in _chunks(images, batch):
            lo, hi = chunk.min(axis=axis), chunk.max(axis=axis)
            low = lo if low is None else np.minimum(low, lo)
            high = hi if high is None else np.maximum(high, hi)
        self.low, self.high, self.image_shape = np.asarray(low), np.asarray(high), tuple(images.shape[1:])
        return self

    def __call__(self, x):
        xp = self._check_input(x)
        low, high = self._device(xp, "low"), self._device(xp, "high")
        if self.per == "channel":
            low, high = low[:, None, None], high[:, None, None]
        span = xp.where(high > low, high - low, 1)
        return (x.astype(np.float32) - low) * (2 / span) - 1


# ------------------------------------------------------------------------------ whitening

class _Whitening(Preprocessor):
    """Covariance of the flattened images (D = C*H*W values, times ``scale``), streamed:
    each chunk adds X^T X to a D x D float64 sum (shifted by the first chunk's mean, for
    accuracy).  ``subset`` fits on that many images chosen at random (``seed``).

    Cost for CIFAR-10 (D = 3072): the covariance holds D^2 = 9.4 M numbers (75 MB in
    float64); accumulating it costs N D^2 = 4.7e11 multiply-adds for all 50,000 images (tens
    of seconds on a few cores: ``subset=10000`` is 5x cheaper and plenty for 3072 dims);
    the eigendecomposition is O(D^3) = 2.9e10 (seconds); the whitening matrix is D^2 float32
    = 38 MB, and applying it costs 2 D^2 = 19 MFLOP per image (as much as a small conv
    layer: ~2.4 GFLOP per 128-image batch)."""

    _arrays = ("mean", "matrix", "eigvals")
    _settings = ("epsilon", "scale", "subset", "seed")

    def __init__(self, epsilon: float = 1e-2, scale: float = 1 / 255, subset: int | None = None, seed: int = 0):
        if not 0 <= epsilon < np.inf:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
        if not 0 < scale < np.inf:
            raise ValueError(f"scale must be a finite number > 0, got {scale}")
        if subset is not None and (isinstance(subset, bool) or not isinstance(subset, (int, np.integer))
                                   or subset < 2):
            raise ValueError(f"subset must be None or an integer >= 2, got {subset!r}")
        self.epsilon, self.scale, self.subset, self.seed = float(epsilon), float(scale), subset, int(seed)
        self.mean = self.matrix = self.eigvals = None

    def _covariance(self, images, batch: int):
        _check_images(images)
        _check_batch_size(batch)
        index = None
        if self.subset is not None and self.subset < len(images):
            index = np.sort(np.random.default_rng(self.seed).choice(len(images), self.subset, replace=False))
        count, shift, sums, products = 0, None, None, None
        for chunk in _chunks(images, batch, index):
            flat = chunk.reshape(len(chunk), -1) * self.scale  # (b, D)
            if shift is None:
                shift = flat.mean(axis=0)
                sums, products = np.zeros_like(shift), np.zeros((flat.shape[1],) * 2)
            flat -= shift
            sums += flat.sum(axis=0)
            products += flat.T @ flat
            count += len(flat)
        if count < 2:
            raise ValueError("images must hold at least 2 images to estimate a covariance")
        mean = sums / count
        cov = (products - count * np.outer(mean, mean)) / (count - 1)
        self.image_shape = tuple(images.shape[1:])
        return shift + mean, cov

    def _check_invertible(self, eigvals) -> None:
        """epsilon = 0 divides by every kept eigenvalue: refused where one is zero to rounding
        (fewer images than values per image, or constant pixels)."""
        if self.epsilon == 0:
            tiny = float(np.max(eigvals, initial=0.0)) * 1e-12  # eigh's rounding, relative to the largest
            singular = int(np.sum(eigvals <= tiny))
            if singular:
                raise ValueError(f"epsilon=0 needs a full-rank covariance, but {singular} of its {len(eigvals)} "
                                 "eigenvalues are 0 (fewer images than values per image, or constant pixels): "
                                 "use epsilon > 0 (e.g. 1e-2) or fewer n_components")

    def _flat(self, x):
        xp = self._check_input(x)
        return xp, x.reshape(len(x), -1).astype(np.float32) * np.float32(self.scale) - self._device(xp, "mean")


class PCAWhiten(_Whitening):
    """PCA whitening: ``((x * scale - mean) @ U_k) / sqrt(eigval_k + epsilon)`` for the
    ``n_components`` leading eigenvectors U_k of the covariance (all D by default).  The
    output is flat, (N, k): principal components are not images.""" + _Whitening.__doc__

    _settings = _Whitening._settings + ("n_components",)

    def __init__(self, epsilon: float = 1e-2, scale: float = 1 / 255, subset: int | None = None, seed: int = 0,
                 n_components: int | None = None):
        super().__init__(epsilon, scale, subset, seed)
        if n_components is not None and (not isinstance(n_components, (int, np.integer))
                                         or isinstance(n_components, bool) or n_components < 1):
            raise ValueError(f"n_components must be None or a positive integer, got {n_components!r}")
        self.n_components = n_components

    def fit(self, images, batch: int = 512) -> PCAWhiten:
        mean, cov = self._covariance(images, batch)
        k = cov.shape[0] if self.n_components is None else self.n_components
        if k > cov.shape[0]:
            raise ValueError(f"n_components must be <= {cov.shape[0]} (values per image), got {k}")
        eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals, eigvecs = np.maximum(eigvals[::-1][:k], 0), eigvecs[:, ::-1][:, :k]  # descending
        self._check_invertible(eigvals)
        self.mean, self.eigvals = mean, eigvals
        self.matrix = eigvecs / np.sqrt(eigvals + self.epsilon)  # (D, k)
        return self

    def __call__(self, x):
        xp, flat = self._flat(x)
        return flat @ self._device(xp, "matrix")


class ZCAWhiten(_Whitening):
    """ZCA whitening: ``(x * scale - mean) @ U diag(1 / sqrt(eigval + epsilon)) U^T``, reshaped
    back to (N, C, H, W).  The rotation back to pixel space keeps each output as close as
    possible to its input (images still look like images, with edges emphasised).""" \
        + _Whitening.__doc__

    def fit(self, images, batch: int = 512) -> ZCAWhiten:
        mean, cov = self._covariance(images, batch)
        eigvals, eigvecs = np.linalg.eigh(cov)
        eigvals = np.maximum(eigvals, 0)
        self._check_invertible(eigvals)
        self.mean, self.eigvals = mean, eigvals[::-1]
        self.matrix = (eigvecs / np.sqrt(eigvals + self.epsilon)) @ eigvecs.T  # (D, D), symmetric
        return self

    def __call__(self, x):
        xp, flat = self._flat(x)
        return (flat @ self._device(xp, "matrix")).reshape(x.shape)
