"""Augmentation: each op against a plain per-image or per-pixel reference (colorsys for the
colour jitter, np.cov for fancy PCA), reproducibility from a seed, dtypes, error messages,
and the cost of a typical pipeline (printed with -s, not asserted)."""
from __future__ import annotations

import colorsys
import time

import numpy as np
import pytest

from pycnn.data import augment as A
from pycnn.data import datasets, images


@pytest.fixture(scope="module")
def cifar_batch():
    """128 real CIFAR-10 train images (N, 3, 32, 32) uint8."""
    path = datasets.cifar10_dir() / "train.npz"
    if not path.exists():
        pytest.skip(f"shared CIFAR-10 copy not found at {path}")
    with np.load(path) as d:
        return np.ascontiguousarray(d["x"][:2000].transpose(0, 3, 1, 2))


def _images(n=6, c=3, h=9, w=11, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    return x if dtype == np.uint8 else (x / 255).astype(dtype)


def test_seeds_and_generators_give_the_same_draws():
    x = _images(32)
    for t in (A.RandomFlip(), A.RandomCrop(2), A.RandomScaleCrop((9, 12)), A.RandomRotation(), A.ColourJitter()):
        a, b = t(x, 7), t(x, np.random.default_rng(7))
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(t(x, 7), t(x, 8)), t
    with pytest.raises(TypeError, match="rng"):
        A.RandomFlip()(x, rng="seed")


def test_flip():
    x = _images(400)
    np.testing.assert_array_equal(A.RandomFlip(p=0)(x, 0), x)
    np.testing.assert_array_equal(A.RandomFlip(p=1)(x, 0), x[..., ::-1])
    out = A.RandomFlip()(x, 1)
    flipped = np.array([np.array_equal(o, i[..., ::-1]) for o, i in zip(out, x)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    assert (flipped ^ kept).all() and 150 < flipped.sum() < 250
    assert out.dtype == np.uint8
    with pytest.raises(ValueError, match="p must"):
        A.RandomFlip(p=1.5)


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_pad_and_crop_takes_a_window_of_the_padded_image(mode):
    x = _images(20, h=8, w=8)
    out = A.RandomCrop(padding=3, mode=mode)(x, 2)
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (0, 0), (3, 3), (3, 3)), mode="constant" if mode == "zero" else "reflect")
    offsets = set()
    for o, p in zip(out, padded):
        found = [(i, j) for i in range(7) for j in range(7) if np.array_equal(o, p[:, i:i + 8, j:j + 8])]
        assert found, "output is not a window of the padded image"
        offsets.add(found[0])
    assert len(offsets) > 5  # offsets differ between images
    np.testing.assert_array_equal(A.RandomCrop(padding=0)(x, 0), x)
    assert A.RandomCrop(padding=0, size=5)(x, 0).shape == (20, 3, 5, 5)
    assert repr(A.RandomCrop(4, mode="reflect")) == "RandomCrop(padding=4, mode='reflect')"


def test_crop_errors_name_the_argument():
    x = _images()
    with pytest.raises(ValueError, match="padding"):
        A.RandomCrop(padding=-1)
    with pytest.raises(ValueError, match="mode"):
        A.RandomCrop(mode="wrap")
    with pytest.raises(ValueError, match="size"):
        A.RandomCrop(padding=1, size=20)(x, 0)
    with pytest.raises(ValueError, match="x must be a batch"):
        A.RandomCrop()(x[0], 0)
    with pytest.raises(TypeError, match="x must be uint8 or floating"):
        A.RandomCrop()(x.astype(np.int32), 0)


def test_bilinear_resize():
    x = _images(3, h=8, w=8, dtype=np.float64)
    half = images.resize_bilinear(x, (4, 4))  # half-pixel centres: each output is a 2x2 block mean
    np.testing.assert_allclose(half, x.reshape(3, 3, 4, 2, 4, 2).mean(axis=(3, 5)), rtol=1e-12)
    np.testing.assert_array_equal(images.resize_bilinear(x, (8, 8)), x)
    constant = np.full((2, 3, 5, 7), 77, np.uint8)
    np.testing.assert_array_equal(images.resize_bilinear(constant, (13, 4)), np.full((2, 3, 13, 4), 77, np.uint8))
    ramp = np.tile(np.arange(8.0), (1, 1, 8, 1))  # linear in x: upsampling keeps it linear inside
    up = images.resize_bilinear(ramp, (8, 16))[0, 0, 0]
    np.testing.assert_allclose(np.diff(up[1:-1]), 0.5)


def test_scale_crop():
    x = _images(50, h=16, w=16)
    np.testing.assert_array_equal(A.RandomScaleCrop((16, 16))(x, 0), x)  # scale 1, offset 0: identity
    out = A.RandomScaleCrop((16, 24))(x, 1)
    assert out.shape == x.shape and out.dtype == np.uint8
    assert sum(np.array_equal(o, i) for o, i in zip(out, x)) < 5
    zoom = A.RandomScaleCrop((32, 32))(x[:1].astype(np.float64), 0)  # 2x: a 8x8 window upsampled
    assert zoom.dtype == np.float64 and zoom.min() >= x.min() / 255 - 1e-12
    assert A.RandomScaleCrop((20, 30), size=12)(x, 0).shape == (50, 3, 12, 12)
    with pytest.raises(ValueError, match="scale"):
        A.RandomScaleCrop((10, 20))(x, 0)  # shorter side 10 < the 16-pixel crop
    with pytest.raises(ValueError, match="scale"):
        A.RandomScaleCrop((30, 20))
    assert repr(A.RandomScaleCrop((32, 40))) == "RandomScaleCrop(scale=(32, 40))"


def test_rotation():
    x = _images(4, h=10, w=10, dtype=np.float64)
    np.testing.assert_allclose(images.rotate(x, 0.0, 1.0), x, atol=1e-12)
    np.testing.assert_allclose(images.rotate(x, 90.0, 1.0), np.rot90(x, 1, axes=(2, 3)), atol=1e-9)  # counter-clockwise
    small = images.rotate(np.ones((1, 1, 10, 10)), 0.0, 0.5)  # shrunk: zero fill at the border
    assert small[0, 0, 0, 0] == 0 and small[0, 0, 5, 5] == 1
    u8 = _images(8)
    out = A.RandomRotation(degrees=30, scale=(0.8, 1.2))(u8, 3)
    assert out.dtype == np.uint8 and out.shape == u8.shape
    draws = A.RandomRotation(degrees=30, scale=(0.8, 1.2)).draw(1000, 0)
    assert np.abs(draws["angle"]).max() <= 30 and 0.8 <= draws["scale"].min() <= draws["scale"].max() <= 1.2
    with pytest.raises(ValueError, match="scale"):
        A.RandomRotation(scale=(0, 1))
    assert repr(A.RandomRotation(10, (0.9, 1.1))) == "RandomRotation(degrees=10, scale=(0.9, 1.1))"


# ------------------------------------------------------------------------------- colour

def _special_pixels():
    rng = np.random.default_rng(5)
    special = [(0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1),
               (1, 0, 1), (0.2, 0.2, 0.9), (0.9, 0.2, 0.2), (0.3, 0.8, 0.3)]
    return np.concatenate([np.array(special), rng.random((52, 3))])  # (64, 3)


def test_hsv_conversions_match_colorsys():
    pixels = _special_pixels()
    rgb = pixels.T.reshape(1, 3, 8, 8)
    hsv = images.rgb_to_hsv(rgb)
    expected = np.array([colorsys.rgb_to_hsv(*p) for p in pixels]).T.reshape(1, 3, 8, 8)
    np.testing.assert_allclose(hsv, expected, atol=1e-12)
    back = images.hsv_to_rgb(hsv)
    expected_back = np.array([colorsys.hsv_to_rgb(*p) for p in expected.reshape(3, -1).T]).T.reshape(1, 3, 8, 8)
    np.testing.assert_allclose(back, expected_back, atol=1e-12)
    np.testing.assert_allclose(back, rgb, atol=1e-12)


def test_colour_jitter_matches_colorsys_per_pixel():
    pixels = _special_pixels()
    x = np.rint(pixels * 255).astype(np.uint8).T.reshape(1, 3, 8, 8).repeat(3, axis=0)  # 3 images
    jitter = A.ColourJitter()
    draws = jitter.draw(3, 11)
    out = jitter(x, 11)
    assert out.dtype == np.float32 and out.shape == x.shape and 0 <= out.min() and out.max() <= 255
    for n in range(3):
        d = {k: v[n] for k, v in draws.items()}
        for k in range(64):
            r, g, b = x[n, :, k // 8, k % 8] / 255.0
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            h = (h + d["hue_shift"]) % 1.0
            s = min(max(s ** d["sat_power"] * d["sat_factor"] + d["sat_shift"], 0.0), 1.0)
            v = min(max(v ** d["val_power"] * d["val_factor"] + d["val_shift"], 0.0), 1.0)
            expected = np.array(colorsys.hsv_to_rgb(h, s, v)) * 255
            np.testing.assert_allclose(out[n, :, k // 8, k % 8], expected, atol=2e-3)
    # the same draws for every pixel of an image, different ones between images
    assert len({round(float(v), 9) for v in draws["hue_shift"]}) == 3
    many = jitter.draw(20000, 0)
    for channel in ("sat", "val"):
        assert 0.25 <= many[f"{channel}_power"].min() and many[f"{channel}_power"].max() <= 4
        assert 0.4 < np.mean(many[f"{channel}_power"] < 1) < 0.6  # log-uniform: as often < 1 as > 1
        assert 0.7 <= many[f"{channel}_factor"].min() and many[f"{channel}_factor"].max() <= 1.4
        assert np.abs(many[f"{channel}_shift"]).max() <= 0.1
    assert np.abs(many["hue_shift"]).max() <= 0.1


def test_colour_jitter_scale_and_hue_wrap():
    x = _images(4, dtype=np.float32)                # float input: RGB in [0, 1]
    out = A.ColourJitter()(x, 0)
    assert out.dtype == np.float32 and out.max() <= 1 + 1e-6
    scaled = A.ColourJitter(scale=255.0)(x * 255, 0)
    np.testing.assert_allclose(scaled, out * 255, atol=1e-3)
    red = np.zeros((1, 3, 1, 1))
    red[0, 0] = 1.0                                 # hue 0; a shift of -0.05 wraps to 0.95
    same = dict(sat_power=1.0, sat_factor=1.0, sat_shift=0.0, val_power=1.0, val_factor=1.0, val_shift=0.0)
    wrapped = images.jitter_hsv(red, hue_shift=-0.05, **same)
    np.testing.assert_allclose(wrapped[0, :, 0, 0], colorsys.hsv_to_rgb(0.95, 1.0, 1.0), atol=1e-12)
    with pytest.raises(ValueError, match="x must have 3"):
        A.ColourJitter()(_images(c=1), 0)
    with pytest.raises(ValueError, match="power"):
        A.ColourJitter(power=(0, 4))
    assert A.ColorJitter is A.ColourJitter
    assert repr(A.ColourJitter()) == ("ColourJitter(power=(0.25, 4), factor=(0.7, 1.4), shift=(-0.1, 0.1), "
                                      "hue_shift=(-0.1, 0.1))")


# ------------------------------------------------------------------------------ fancy PCA

def test_fancy_pca_fit_matches_np_cov(cifar_batch):
    subset = cifar_batch[:300]
    pixels = subset.transpose(0, 2, 3, 1).reshape(-1, 3) / 255.0
    pca = A.FancyPCA().fit(subset, batch=64)
    np.testing.assert_allclose(pca.cov, np.cov(pixels, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(pca.mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pca.cov @ pca.eigvecs, pca.eigvecs * pca.eigvals, atol=1e-12)
    np.testing.assert_allclose(pca.eigvecs.T @ pca.eigvecs, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.sort(pca.eigvals), np.linalg.eigvalsh(np.cov(pixels, rowvar=False)), rtol=1e-9)
    other = A.FancyPCA().fit(subset, batch=7)  # exact integer sums: the batch size does not matter
    np.testing.assert_array_equal(other.cov, pca.cov)
    assert pca.count == 300 * 1024 and "fitted on 307200 pixels" in repr(pca)


def test_fancy_pca_adds_one_colour_offset_per_image():
    x = _images(16, h=8, w=8)
    pca = A.FancyPCA(std=0.1).fit(_images(50, seed=1))
    out = pca(x, 4)
    assert out.dtype == np.float32
    shift = out - x                                  # (N, 3, H, W): constant over pixels
    np.testing.assert_allclose(shift, shift[:, :, :1, :1].repeat(8, 2).repeat(8, 3), atol=1e-4)
    alpha = np.random.default_rng(4).normal(0, 0.1, (16, 3))
    expected = np.stack([pca.eigvecs @ (a * pca.eigvals) for a in alpha]) * 255
    np.testing.assert_allclose(shift[:, :, 0, 0], expected, atol=1e-4)
    rng = np.random.default_rng(0)
    assert not np.array_equal(pca(x, rng), pca(x, rng))  # alpha drawn anew each call
    floats = pca(x / 255.0, 4)                         # float input: [0, 1] scale
    np.testing.assert_allclose(floats * 255, out, atol=1e-3)
    restored = A.FancyPCA.from_state_dict(pca.state_dict())
    np.testing.assert_array_equal(restored(x, 4), out)


def test_fancy_pca_errors():
    with pytest.raises(TypeError, match="images must be uint8"):
        A.FancyPCA().fit(_images(dtype=np.float32))
    with pytest.raises(ValueError, match="images must be RGB"):
        A.FancyPCA().fit(_images(c=1))
    with pytest.raises(ValueError, match="batch"):
        A.FancyPCA().fit(_images(), batch=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        A.FancyPCA()(_images(), 0)
    assert repr(A.FancyPCA()) == "FancyPCA(std=0.1, not fitted)"


# ------------------------------------------------------------------------------ pipelines

def test_compose_and_a_typical_pipeline(cifar_batch):
    pca = A.FancyPCA().fit(cifar_batch, batch=500)
    pipeline = A.Compose([A.RandomFlip(), A.RandomCrop(padding=4), pca, lambda b: b / 255.0])
    assert repr(pipeline).startswith("Compose([\n    RandomFlip(p=0.5),\n    RandomCrop(padding=4, mode='zero'),")
    batch = cifar_batch[:128]
    out = pipeline(batch, 0)
    assert out.shape == (128, 3, 32, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out, pipeline(batch, np.random.default_rng(0)))
    timings = []
    for i in range(20):
        start = time.perf_counter()
        pipeline(batch, i)
        timings.append(time.perf_counter() - start)
    typical = A.Compose([A.RandomFlip(), A.RandomCrop(padding=4), pca])
    typical_times = []
    for i in range(20):
        start = time.perf_counter()
        typical(batch, i)
        typical_times.append(time.perf_counter() - start)
    print(f"\nflip + pad-crop + fancy PCA on a 128x3x32x32 uint8 batch: median "
          f"{np.median(typical_times) * 1e3:.2f} ms (with /255: {np.median(timings) * 1e3:.2f} ms)")
    with pytest.raises(TypeError, match=r"transforms\[1\]"):
        A.Compose([A.RandomFlip(), 3])


def test_cupy_arrays_stay_on_the_device_and_match_numpy():
    cupy = pytest.importorskip("cupy")
    try:
        cupy.zeros(1)
    except Exception:  # pragma: no cover - cupy without a device
        pytest.skip("no CUDA device")
    x = _images(8, h=12, w=12)
    pca = A.FancyPCA().fit(x)
    for t in (A.RandomFlip(), A.RandomCrop(2, mode="reflect"), A.RandomScaleCrop((12, 16)), A.RandomRotation(),
              A.ColourJitter(), pca):
        on_gpu = t(cupy.asarray(x), 5)
        assert isinstance(on_gpu, cupy.ndarray), t
        np.testing.assert_allclose(cupy.asnumpy(on_gpu).astype(np.float64), t(x, 5).astype(np.float64),
                                   atol=1.0 if on_gpu.dtype == np.uint8 else 1e-3)


# ------------------------------------- found by an independent sweep (fifth session)

def test_sizes_are_checked_and_empty_batches_keep_their_shape():
    """size 0 or -1 gave empty images or a NumPy reshape error; a size of 0 in a resize a
    ZeroDivisionError; an empty batch failed in the crops, rotation and resize."""
    x = np.random.default_rng(0).integers(0, 256, (3, 3, 6, 5)).astype(np.uint8)
    for call in (lambda: A.RandomCrop(2, size=0), lambda: A.RandomScaleCrop((4, 4), size=-1),
                 lambda: A.RandomCrop(2, size=(3, 2.5)), lambda: images.resize_bilinear(x, (0, 3)),
                 lambda: images.resize_bilinear(x, 3.5)):
        with pytest.raises(ValueError, match="size must be"):
            call()
    empty = x[:0]
    for transform in (A.RandomCrop(2), A.RandomScaleCrop((6, 8)), A.RandomRotation(), A.RandomFlip()):
        out = transform(empty, 0)
        assert out.shape == (0, 3, 6, 5) and out.dtype == np.uint8, transform
    assert images.resize_bilinear(empty, (3, 4)).shape == (0, 3, 3, 4)


def test_a_callable_gets_the_generator_only_where_it_asks_for_one():
    """f(x, scale=255.0) got the generator as its scale; a keyword rng gets it by keyword;
    f(x, rng) and Transforms positionally."""
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 4, 4)).astype(np.uint8)
    seen = []

    def to_unit(x, scale=255.0):
        return x / scale

    def keyword(x, scale=2.0, rng=None):
        seen.append(("keyword", scale, type(rng).__name__))
        return x

    def positional(x, rng):
        seen.append(("positional", type(rng).__name__))
        return x
    out = A.Compose([A.RandomFlip(), keyword, positional, to_unit])(x, 0)
    assert out.max() <= 1.0
    assert seen == [("keyword", 2.0, "Generator"), ("positional", "Generator")]


def test_fancy_pca_state_keeps_its_scale():
    x = np.random.default_rng(2).integers(0, 256, (4, 3, 5, 5)).astype(np.uint8)
    fitted = A.FancyPCA(0.5, scale=255.0).fit(x)
    restored = A.FancyPCA.from_state_dict(fitted.state_dict())
    assert restored.scale == 255.0
    floats = x.astype(np.float32)
    np.testing.assert_array_equal(restored(floats, 3), fitted(floats, 3))
    assert A.FancyPCA.from_state_dict(A.FancyPCA(0.5).fit(x).state_dict()).scale is None
