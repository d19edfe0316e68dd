"""Pre-processing: streamed fits against whole-array NumPy statistics, whitening against its
defining property (identity covariance) on real CIFAR-10 patches, exact state round trips
through an npz file, and error messages."""
from __future__ import annotations

import numpy as np
import pytest

from pycnn.data import datasets
from pycnn.data import preprocess as P


@pytest.fixture(scope="module")
def patches():
    """3000 real CIFAR-10 train images cut to their central 8x8 (3x8x8 = 192 values each,
    so the covariance is cheap and well determined)."""
    path = datasets.cifar10_dir() / "train.npz"
    if not path.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {path}")
    with np.load(path) as d:
        return np.ascontiguousarray(d["x"][:3000, 12:20, 12:20].transpose(0, 3, 1, 2))


def _images(n=40, c=3, h=5, w=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 200, (n, c, h, w), dtype=np.uint8)
    x[:, 0] += 50  # channels differ
    return x


ALL = [P.SubtractMeanImage, P.SubtractChannelMean, lambda: P.Standardise(per="channel"),
       lambda: P.Standardise(per="pixel"), lambda: P.MinMaxScale(per="global"), lambda: P.MinMaxScale(per="channel"),
       lambda: P.PCAWhiten(epsilon=1e-3, n_components=20), lambda: P.ZCAWhiten(epsilon=1e-3, subset=30, seed=1)]


def test_streamed_statistics_match_numpy():
    x = _images()
    f = x.astype(np.float64)
    np.testing.assert_allclose(P.SubtractMeanImage().fit(x, batch=7).mean, f.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(P.SubtractChannelMean().fit(x, batch=3).mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    channel = P.Standardise(per="channel").fit(x, batch=7)
    np.testing.assert_allclose(channel.mean, f.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(channel.std, f.std(axis=(0, 2, 3)), rtol=1e-12)
    pixel = P.Standardise(per="pixel").fit(x, batch=6)
    np.testing.assert_allclose(pixel.std, f.std(axis=0), rtol=1e-12)
    minmax = P.MinMaxScale(per="channel").fit(x, batch=9)
    np.testing.assert_array_equal(minmax.low, f.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(minmax.high, f.max(axis=(0, 2, 3)))
    whitening = P.ZCAWhiten(scale=1.0).fit(x, batch=11)  # the shifted, streamed covariance
    flat = f.reshape(len(f), -1)
    np.testing.assert_allclose(whitening.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.sort(whitening.eigvals), np.linalg.eigvalsh(np.cov(flat, rowvar=False)).clip(0),
                               rtol=1e-8, atol=1e-8)


def test_outputs_on_training_data():
    x = _images(200)
    for per, axis in (("channel", (0, 2, 3)), ("pixel", 0)):
        out = P.Standardise(per=per).fit(x)(x)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out.mean(axis=axis), 0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=axis), 1, atol=1e-4)
    np.testing.assert_allclose(P.SubtractMeanImage().fit(x)(x).mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(P.SubtractChannelMean().fit(x)(x).mean(axis=(0, 2, 3)), 0, atol=1e-3)
    for per, axis in (("global", None), ("channel", (0, 2, 3))):
        out = P.MinMaxScale(per=per).fit(x)(x)
        np.testing.assert_allclose(out.min(axis=axis), -1, atol=1e-6)
        np.testing.assert_allclose(out.max(axis=axis), 1, atol=1e-6)
    constant = np.full((4, 1, 3, 3), 9, np.uint8)  # no spread: no division by zero
    assert np.isfinite(P.Standardise().fit(constant)(constant)).all()
    assert np.isfinite(P.MinMaxScale().fit(constant)(constant)).all()


@pytest.mark.parametrize("kind", [P.PCAWhiten, P.ZCAWhiten])
def test_whitened_training_data_has_identity_covariance(patches, kind):
    white = kind(epsilon=1e-8).fit(patches, batch=256)
    out = white(patches)
    assert out.dtype == np.float32
    assert out.shape == ((3000, 192) if kind is P.PCAWhiten else patches.shape)
    cov = np.cov(out.reshape(len(out), -1).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(cov, np.eye(192), atol=1e-2)
    # with a real epsilon the variances are lambda / (lambda + epsilon) along the components
    eps = 1e-3
    damped = kind(epsilon=eps).fit(patches, batch=256)
    out = damped(patches).reshape(len(patches), -1).astype(np.float64)
    expected = damped.eigvals / (damped.eigvals + eps)  # descending
    if kind is P.PCAWhiten:
        np.testing.assert_allclose(out.var(axis=0, ddof=1), expected, atol=1e-4)
    else:
        variances = np.linalg.eigvalsh(np.cov(out, rowvar=False))[::-1]
        np.testing.assert_allclose(variances, expected, atol=1e-4)


def test_zca_keeps_images_looking_like_images(patches):
    zca = P.ZCAWhiten(epsilon=1e-2).fit(patches)
    pca = P.PCAWhiten(epsilon=1e-2).fit(patches)
    centred = patches.reshape(len(patches), -1) / 255.0 - zca.mean

    def mean_correlation(out):
        out = out.reshape(len(out), -1)
        return np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(out[:300], centred[:300])])

    zca_corr, pca_corr = mean_correlation(zca(patches[:300])), mean_correlation(pca(patches[:300]))
    print(f"\ncorrelation with the centred input: ZCA {zca_corr:.3f}, PCA {pca_corr:.3f}")
    assert zca_corr > 0.7 and abs(pca_corr) < 0.2
    np.testing.assert_allclose(zca.matrix, zca.matrix.T, atol=1e-9)


def test_subset_and_components():
    x = _images(60)
    full = P.ZCAWhiten(scale=1.0).fit(x)
    part = P.ZCAWhiten(scale=1.0, subset=30, seed=2).fit(x)
    np.testing.assert_allclose(part.mean, x[np.sort(np.random.default_rng(2).choice(60, 30, replace=False))]
                               .reshape(30, -1).mean(axis=0), rtol=1e-12)
    assert not np.allclose(part.mean, full.mean)
    assert P.PCAWhiten(n_components=7).fit(x)(x).shape == (60, 7)
    with pytest.raises(ValueError, match="n_components must be <= 90"):
        P.PCAWhiten(n_components=91).fit(x)


@pytest.mark.parametrize("make", ALL)
def test_state_round_trip_through_npz_is_exact(tmp_path, make):
    x = _images(50)
    fitted = make().fit(x, batch=16)
    np.savez(tmp_path / "model.npz", **{f"preprocess.{k}": v for k, v in fitted.state_dict().items()})
    with np.load(tmp_path / "model.npz") as stored:  # no allow_pickle: only plain arrays
        state = {k.split(".", 1)[1]: stored[k] for k in stored.files}
    restored = P.from_state_dict(state)
    assert type(restored) is type(fitted) and repr(restored) == repr(fitted)
    np.testing.assert_array_equal(restored(x), fitted(x))
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in fitted.state_dict().values())


def test_errors_name_the_argument():
    x = _images()
    norm = P.Standardise().fit(x)
    with pytest.raises(ValueError, match=r"x must have images of shape \(3, 5, 6\)"):
        norm(x[:, :, :4])
    with pytest.raises(ValueError, match="x must be a batch"):
        norm(x[0])
    with pytest.raises(TypeError, match="images must be uint8 or floating"):
        P.Standardise().fit(x.astype(np.int32))
    with pytest.raises(RuntimeError, match="Standardise is not fitted"):
        P.Standardise()(x)
    with pytest.raises(ValueError, match="per must be"):
        P.Standardise(per="image")
    with pytest.raises(ValueError, match="per must be"):
        P.MinMaxScale(per="pixel")
    with pytest.raises(ValueError, match="batch"):
        P.SubtractMeanImage().fit(x, batch=0)
    with pytest.raises(ValueError, match="epsilon"):
        P.ZCAWhiten(epsilon=-1)
    with pytest.raises(ValueError, match="subset"):
        P.ZCAWhiten(subset=1)
    with pytest.raises(ValueError, match="not a ZCAWhiten"):
        P.ZCAWhiten.from_state_dict(norm.state_dict())
    with pytest.raises(ValueError, match="unknown pre-processor type"):
        P.from_state_dict({"type": np.array("Nope")})
    assert repr(norm) == "Standardise(per='channel', eps=1e-06, fitted on images (3, 5, 6))"
    assert repr(P.ZCAWhiten()) == "ZCAWhiten(epsilon=0.01, scale=0.00392157, subset=None, seed=0, not fitted)"


def test_floating_point_input_and_use_in_a_loader():
    from pycnn.data import DataLoader
    from pycnn.data.augment import Compose, RandomFlip

    x = _images(32)
    norm = P.Standardise().fit(x.astype(np.float32))
    np.testing.assert_allclose(norm(x.astype(np.float32)), P.Standardise().fit(x)(x), rtol=1e-5, atol=1e-5)
    loader = DataLoader((x, np.zeros(32, np.int64)), 8, transform=Compose([RandomFlip(), norm]))
    batches = [b for b, _ in loader]
    assert all(b.dtype == np.float32 for b in batches)
    np.testing.assert_allclose(np.concatenate(batches).mean(axis=(0, 2, 3)), 0, atol=1e-4)


def test_fitting_refuses_non_finite_images_and_settings():
    """A NaN image made every statistic NaN, silently; scale=inf failed inside LAPACK."""
    from pycnn.data.preprocess import Standardise, ZCAWhiten
    images = np.random.default_rng(0).standard_normal((4, 3, 2, 2))
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="images must be finite to fit"):
        Standardise().fit(images)
    for bad in (dict(scale=np.inf), dict(epsilon=np.inf)):
        with pytest.raises(ValueError, match="must be a finite number"):
            ZCAWhiten(**bad)
