"""Property-based tests (hypothesis) of every C++ op against its NumPy reference, and against
PyTorch where it computes the same function.

Each example draws a shape, a dtype (float32 / float64), a memory layout for every input and
for the incoming gradient (contiguous, transposed, sliced, negative strides, unaligned,
big-endian, read-only) and a magnitude (1e-3 .. 1e8, with large negative offsets).  The C++
result, its outputs pre-filled with NaN, is compared with the reference evaluated in float64
on the same (rounded) inputs:
  * maps (the rectifiers, sigmoid, tanh, dropout, fancy PCA): elementwise, relatively
    (a few ulps; subnormal results to within a few subnormal spacings);
  * conv3x3, pooling, batch norm: against the same op evaluated on absolute values (the sum of
    the magnitudes of the terms), so cancellation is allowed for but a forgotten or misplaced
    term is not.
Examples are derandomised (the same on every run) and few enough for the whole file to take
well under a minute on two cores.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

C = pytest.importorskip("pycnn._C")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pycnn.ops  # noqa: E402,F401  (declares every op)
from pycnn.autograd import Context  # noqa: E402
from pycnn.ops import _util, registry  # noqa: E402
from pycnn.ops.conv import CONV_ACTIVATIONS  # noqa: E402
from tests.conftest import omp_threads  # noqa: E402

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(PROPERTY, max_examples=25)

DTYPES = st.sampled_from([np.dtype(np.float32), np.dtype(np.float64)])
SCALES = st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e8])
OFFSETS = st.sampled_from([0.0, 0.0, -4.0, 3.0])  # in units of the scale: large negative inputs too
SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------- layouts
# Each returns an array with the values of `a` (same shape and dtype up to byte order).

def _transposed(a):
    return np.ascontiguousarray(a.T).T if a.ndim > 1 else a.copy()


def _sliced(a):
    if a.ndim == 0:
        return a.copy()
    buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    buf[..., ::2] = a
    return buf[..., ::2]


def _negative_strides(a):
    if a.ndim == 0:
        return a.copy()
    return np.ascontiguousarray(a[::-1, ...])[::-1, ...]


def _unaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)[1:]
    out = buf.view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _read_only(a):
    out = a.copy()
    out.flags.writeable = False
    return out


LAYOUTS = {
    "contiguous": lambda a: a.copy(),
    "transposed": _transposed,
    "sliced": _sliced,
    "negative strides": _negative_strides,
    "unaligned": _unaligned,
    "big-endian": lambda a: a.astype(a.dtype.newbyteorder(">")),
    "read-only": _read_only,
}
LAYOUT_NAMES = st.sampled_from(sorted(LAYOUTS))


def test_layouts_keep_the_values_and_change_the_memory():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for change in LAYOUTS.values():
        b = change(a)
        np.testing.assert_array_equal(b, a)
        assert b.shape == a.shape
    assert not LAYOUTS["transposed"](a).flags.c_contiguous
    assert not LAYOUTS["sliced"](a).flags.c_contiguous
    assert LAYOUTS["negative strides"](a).strides[0] < 0
    assert not LAYOUTS["unaligned"](a).flags.aligned
    assert not LAYOUTS["big-endian"](a).dtype.isnative
    assert not LAYOUTS["read-only"](a).flags.writeable


# ---------------------------------------------------------------------------- helpers

def cpp(name, algo="default"):
    op = registry.get(name)
    assert algo in op.algorithms("cpp"), f"{name} has no cpp/{algo} implementation"
    return op.impls[("cpp", algo)]


def run(implementation, inputs, params, grad=None, needs=None):
    """(output, gradients) of one implementation; every output it allocates is NaN-filled."""
    ctx = Context(needs or tuple(x is not None for x in inputs))
    with _util.nan_filled_outputs():
        y = np.array(implementation.forward(ctx, *inputs, **params), copy=True)
        grads = None
        if grad is not None:
            grads = tuple(None if g is None else np.array(g) for g in implementation.backward(ctx, grad))
    return y, grads


def as64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def draw_array(rng, shape, dtype, scale, offset=0.0):
    return (scale * (rng.standard_normal(shape) + offset)).astype(dtype)


def both(name, inputs, params, grad, layouts, algo="default", needs=None):
    """The C++ result on `inputs` in the drawn layouts, and the reference in float64."""
    moved = tuple(None if x is None or x.dtype.kind != "f" else LAYOUTS[next(layouts)](x) for x in inputs)
    moved = tuple(m if m is not None else x for m, x in zip(moved, inputs))
    got = run(cpp(name, algo), moved, copy.deepcopy(params), LAYOUTS[next(layouts)](grad), needs)
    want = run(registry.get(name).reference, tuple(as64(x) if x is not None and x.dtype.kind == "f" else x
                                                   for x in inputs), _params64(params), as64(grad), needs)
    return got, want


def _params64(params):
    return {k: as64(v) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v for k, v in params.items()}


def ulp_tolerance(dtype):
    """(rtol, atol) of an elementwise map: a few ulps, and a few subnormal spacings."""
    finfo = np.finfo(dtype)
    return 16 * finfo.eps, 8 * finfo.smallest_subnormal


def assert_close_to(got, want, bound, tol, what):
    """|got - want| <= tol * bound elementwise (bound >= |want|: the magnitudes of the terms)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN (an element the kernel did not write?)"
    err = np.abs(got.astype(np.float64) - want)
    limit = tol * bound + np.finfo(got.dtype).smallest_subnormal * 8
    worst = np.argmax(err - limit)
    assert np.all(err <= limit), (f"{what}: error {err.flat[worst]:.3g} > {limit.flat[worst]:.3g} "
                                  f"(got {got.flat[worst]!r}, want {want.flat[worst]!r})")


# ------------------------------------------------------------------------- maps

MAPS = {  # name -> params drawn from a float in [0, 1)
    "relu": lambda u: {},
    "leaky_relu": lambda u: {"slope": [0.01, 0.3, -0.5][int(3 * u)]},
    "elu": lambda u: {"alpha": [1.0, 0.5, 2.0][int(3 * u)]},
    "sigmoid": lambda u: {},
    "tanh": lambda u: {},
    "rrelu": lambda u: {"training": u < 0.5, "seed": int(u * 1e6)},
    "dropout": lambda u: {"p": [0.1, 0.5, 0.9][int(3 * u)], "seed": int(u * 1e6)},
}


@PROPERTY
@given(name=st.sampled_from(sorted(MAPS)), dtype=DTYPES, shape=st.lists(st.integers(0, 6), min_size=1, max_size=4),
       scale=SCALES, offset=OFFSETS, u=st.floats(0, 0.999), seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=2))
def test_maps_match_the_reference_elementwise(name, dtype, shape, scale, offset, u, seed, layouts):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, shape, dtype, scale, offset)
    g = draw_array(rng, shape, dtype, 1.0)
    (y, (gx,)), (y64, (gx64,)) = both(name, (x,), MAPS[name](u), g, iter(layouts * 2))
    rtol, atol = ulp_tolerance(dtype)
    assert y.dtype == dtype and gx.dtype == dtype
    np.testing.assert_allclose(y, y64, rtol=rtol, atol=atol, err_msg=f"{name} forward")
    np.testing.assert_allclose(gx, gx64, rtol=rtol, atol=atol, err_msg=f"{name} backward")


@PROPERTY
@given(dtype=DTYPES, n=st.integers(1, 3), c=st.integers(1, 5), spatial=st.lists(st.integers(1, 5), max_size=2),
       scale=SCALES, offset=OFFSETS, seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=3))
def test_prelu_matches_the_reference(dtype, n, c, spatial, scale, offset, seed, layouts):
    rng = np.random.default_rng(seed)
    shape = (n, c) + tuple(spatial)
    x = draw_array(rng, shape, dtype, scale, offset)
    w = rng.uniform(-0.5, 0.5, c).astype(dtype)
    g = draw_array(rng, shape, dtype, 1.0)
    (y, (gx, gw)), (y64, (gx64, gw64)) = both("prelu", (x, w), {}, g, iter(layouts * 2))
    rtol, atol = ulp_tolerance(dtype)
    np.testing.assert_allclose(y, y64, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gx, gx64, rtol=rtol, atol=atol)
    axes = (0,) + tuple(range(2, len(shape)))  # grad_w[c] = sum over x <= 0 of g * x: bound sum |g x|
    bound = np.abs(g.astype(np.float64) * x).sum(axis=axes)
    assert_close_to(gw, gw64, bound, 8 * len(x.flat) * np.finfo(dtype).eps, "prelu grad_weight")


@PROPERTY
@given(dtype=DTYPES, n=st.integers(1, 3), c=st.integers(1, 3), pieces=st.integers(1, 4),
       spatial=st.lists(st.integers(1, 5), max_size=2), scale=SCALES, seed=SEEDS,
       layouts=st.lists(LAYOUT_NAMES, min_size=2))
def test_maxout_matches_the_reference(dtype, n, c, pieces, spatial, scale, seed, layouts):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (n, c * pieces) + tuple(spatial), dtype, scale)
    g = draw_array(rng, (n, c) + tuple(spatial), dtype, 1.0)
    (y, (gx,)), (y64, (gx64,)) = both("maxout", (x,), {"pieces": pieces}, g, iter(layouts * 2))
    np.testing.assert_array_equal(y, y64)  # a max and a routing: exact
    np.testing.assert_array_equal(gx, gx64)


@PROPERTY
@given(image_dtype=st.sampled_from([np.uint8, np.float32, np.float64]), n=st.integers(1, 3), h=st.integers(1, 5),
       w=st.integers(1, 6), seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=2))
def test_fancy_pca_matches_the_reference(image_dtype, n, h, w, seed, layouts):
    rng = np.random.default_rng(seed)
    images = (rng.uniform(0, 255, (n, 3, h, w)) if image_dtype == np.uint8 else rng.uniform(0, 1, (n, 3, h, w)))
    images = images.astype(image_dtype)
    eigvecs = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    params = {"eigvecs": LAYOUTS[layouts[0]](eigvecs), "eigvals": rng.uniform(0, 0.2, 3),
              "alphas": LAYOUTS[layouts[1]](rng.normal(0, 0.1, (n, 3)))}
    moved = LAYOUTS[layouts[0]](images)
    y, _ = run(cpp("fancy_pca"), (moved,), copy.deepcopy(params))
    y_ref, _ = run(registry.get("fancy_pca").reference, (images,), copy.deepcopy(params))
    assert y.dtype == y_ref.dtype
    rtol = 4 * np.finfo(y.dtype).eps
    np.testing.assert_allclose(y, y_ref, rtol=rtol, atol=rtol * (255 if image_dtype == np.uint8 else 1))


# ----------------------------------------------------------------------- pooling

@PROPERTY
@given(name=st.sampled_from(["max_pool2x2", "avg_pool2x2"]), dtype=DTYPES, n=st.integers(1, 2), c=st.integers(1, 3),
       h=st.integers(2, 9), w=st.integers(2, 9), scale=SCALES, offset=OFFSETS, seed=SEEDS,
       layouts=st.lists(LAYOUT_NAMES, min_size=2))
def test_pooling_matches_the_reference(name, dtype, n, c, h, w, scale, offset, seed, layouts):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (n, c, h, w), dtype, scale, offset)
    g = draw_array(rng, (n, c, h // 2, w // 2), dtype, 1.0)
    (y, (gx,)), (y64, (gx64,)) = both(name, (x,), {}, g, iter(layouts * 2))
    if name == "max_pool2x2":
        np.testing.assert_array_equal(y, y64)
        np.testing.assert_array_equal(gx, gx64)
    else:  # bound: the average of |x|
        bound, _ = run(registry.get(name).reference, (np.abs(as64(x)),), {})
        assert_close_to(y, y64, bound, 4 * np.finfo(dtype).eps, "avgpool forward")
        np.testing.assert_allclose(gx, gx64, rtol=np.finfo(dtype).eps)


# ----------------------------------------------------------------------- conv3x3 (+ activation)

CONV_TOL = {  # (direct, winograd) multiples of eps times the sum of |terms|
    np.dtype(np.float32): (4e-6, 4e-5), np.dtype(np.float64): (1e-14, 1e-13)}


def _conv_bounds(x, w, b, gz):
    """Elementwise bounds: conv3x3 on |x|, |w|, |b| and its backward with |grad| (float64)."""
    ref = registry.get("conv3x3").reference
    ax, aw, ab = np.abs(as64(x)), np.abs(as64(w)), None if b is None else np.abs(as64(b))
    y, grads = run(ref, (ax, aw, ab), {}, np.abs(as64(gz)))
    return y, grads


@PROPERTY
@given(algo=st.sampled_from(["direct", "winograd"]), dtype=DTYPES, n=st.integers(1, 2), c=st.integers(1, 4),
       k=st.integers(1, 4), h=st.integers(1, 7), w=st.integers(1, 8), bias=st.booleans(), scale=SCALES,
       seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=4))
def test_conv3x3_matches_the_reference(algo, dtype, n, c, k, h, w, bias, scale, seed, layouts):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (n, c, h, w), dtype, scale)
    weight = draw_array(rng, (k, c, 3, 3), dtype, 1.0 / 3)
    b = draw_array(rng, (k,), dtype, scale) if bias else None
    g = draw_array(rng, (n, k, h, w), dtype, 1.0)
    (y, grads), (y64, grads64) = both("conv3x3", (x, weight, b), {}, g, iter(layouts * 2), algo=algo)
    tol = CONV_TOL[np.dtype(dtype)][algo == "winograd"]
    bound_y, bounds = _conv_bounds(x, weight, b, g)
    assert_close_to(y, y64, bound_y, tol, f"conv3x3/{algo} forward")
    for i, (got, want, bound) in enumerate(zip(grads, grads64, bounds)):
        if want is not None:
            assert_close_to(got, want, bound, tol, f"conv3x3/{algo} gradient {i}")


# every activation conv3x3_act applies (the specs), and parameters of both signs
ACTIVATIONS = st.sampled_from([(name, {}) for name in CONV_ACTIVATIONS] + [
    ("leaky_relu", {"slope": 0.1}), ("leaky_relu", {"slope": -0.4}), ("elu", {"alpha": 0.5}),
    ("elu", {"alpha": -0.5})])


@PROPERTY
@given(algo=st.sampled_from(["direct", "winograd"]), dtype=DTYPES, n=st.integers(1, 2), c=st.integers(1, 3),
       k=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 7), activation=ACTIVATIONS,
       depth=st.sampled_from([0.0, -3.0, -12.0, -25.0]), seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=5))
def test_conv3x3_act_matches_the_reference(algo, dtype, n, c, k, h, w, activation, depth, seed, layouts):
    # the bias puts the pre-activations around `depth`: elu far on its flat side included
    name, params = activation
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (n, c, h, w), dtype, 0.3)
    weight = draw_array(rng, (k, c, 3, 3), dtype, 1.0 / 3)
    b = (depth + rng.standard_normal(k)).astype(dtype)
    pw = rng.uniform(-0.3, 0.5, k).astype(dtype) if name == "prelu" else None
    g = draw_array(rng, (n, k, h, w), dtype, 1.0)
    params = dict(params, activation=name)
    (y, grads), (y64, grads64) = both("conv3x3_act", (x, weight, b, pw), params, g, iter(layouts * 2), algo=algo)
    # z = conv + b has an absolute error of tol * bound_z; act is Lipschitz with constant lip, and
    # act' (elu: alpha exp(z)) moves by |act''| <= |act'| * that error (relative to act' itself)
    tol = CONV_TOL[np.dtype(dtype)][algo == "winograd"]
    z64, _ = run(registry.get("conv3x3").reference, (as64(x), as64(weight), as64(b)), {})
    lip = max(1.0, abs(params.get("slope", 0)), abs(params.get("alpha", 0)), 0 if pw is None else np.abs(pw).max())
    bound_z, _ = _conv_bounds(x, weight, b, g)
    assert_close_to(y, y64, lip * bound_z + np.abs(y64), tol, f"conv3x3_act/{algo}/{name} forward")
    # gz = g * act'(z): relative error tol * (1 + bound_z) where act' is smooth (elu), exact elsewhere
    act_inputs = (z64,) if pw is None else (z64, as64(pw))
    act_params = {key: v for key, v in params.items() if key in ("slope", "alpha")}
    gz64 = run(registry.get(name).reference, act_inputs, act_params, as64(g))[1][0]
    _, bounds = _conv_bounds(x, weight, b, np.abs(gz64) * (1 + bound_z))
    for i, (got, want, bound) in enumerate(zip(grads[:3], grads64[:3], bounds)):
        assert_close_to(got, want, bound, 4 * tol, f"conv3x3_act/{algo}/{name} gradient {i}")
    if pw is not None:  # grad_prelu[k] = sum over z <= 0 of g * z
        bound = (np.abs(as64(g)) * (np.abs(z64) + bound_z)).sum(axis=(0, 2, 3))
        assert_close_to(grads[3], grads64[3], bound, 4 * tol, f"conv3x3_act/{algo} grad_prelu")


# ----------------------------------------------------------------------- batch norm

@PROPERTY
@given(dtype=DTYPES, shape=st.sampled_from([(7, 3), (64, 5), (9, 70), (3, 2, 4, 5), (2, 3, 1, 1), (4, 2, 9, 7),
                                            (2, 2, 65, 66)]),  # (N, C) with C > 64; rows > 4096 values
       centre=st.sampled_from([0.0, 1e3, -1e3, 1e5, 1e8]), spread=st.sampled_from([1e-3, 1.0, 1e3]),
       training=st.booleans(), seed=SEEDS, layouts=st.lists(LAYOUT_NAMES, min_size=4))
def test_batchnorm_matches_the_reference(dtype, shape, centre, spread, training, seed, layouts):
    rng = np.random.default_rng(seed)
    c = shape[1]
    if dtype == np.float32 and abs(centre) / spread > 1e4:
        centre = np.sign(centre) * 1e4 * spread  # beyond that float32 data are mostly rounding
    x = (centre + spread * rng.standard_normal(shape)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    g = draw_array(rng, shape, dtype, 1.0)
    params = {"training": training, "running_mean": (centre + rng.standard_normal(c)).astype(dtype),
              "running_var": (spread ** 2 * rng.uniform(0.5, 2, c)).astype(dtype)}
    (y, grads), (y64, grads64) = both("batchnorm", (x, gamma, beta), params, g, iter(layouts * 2))
    eps = np.finfo(dtype).eps
    # x - mean loses |centre| / spread digits in any precision (the mean is rounded to x's dtype)
    cond = 1 + abs(centre) / spread
    assert_close_to(y, y64, np.abs(y64) + cond * (np.abs(as64(gamma)) * 10).max(), 64 * eps, "forward")
    for i, (got, want) in enumerate(zip(grads, grads64)):
        scale = np.abs(want).max() + np.abs(as64(g)).sum() / g.shape[1] * (np.abs(as64(gamma)).max() / spread + 10)
        assert_close_to(got, want, np.full(want.shape, scale), 64 * eps * cond, f"gradient {i}")


@FEW
@given(dtype=DTYPES, shape=st.sampled_from([(64, 5), (3, 2, 4, 5)]), centre=st.sampled_from([0.0, 1e3, 1e8]),
       seed=SEEDS)
def test_batchnorm_running_statistics_match_the_reference(dtype, shape, centre, seed):
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        centre = min(centre, 1e4)
    x = (centre + rng.standard_normal(shape)).astype(dtype)
    c = shape[1]
    stats = {}
    for backend, implementation, data in (("cpp", cpp("batchnorm"), x),
                                          ("numpy", registry.get("batchnorm").reference, as64(x))):
        rm, rv = np.zeros(c, data.dtype), np.ones(c, data.dtype)
        run(implementation, (data, np.ones(c, data.dtype), np.zeros(c, data.dtype)),
            {"running_mean": rm, "running_var": rv, "momentum": 0.3})
        stats[backend] = rm, rv
    eps = np.finfo(dtype).eps
    # the mean to a few ulps of |centre| + spread (spread = 1), the unbiased variance relatively
    np.testing.assert_allclose(stats["cpp"][0], stats["numpy"][0], rtol=4 * eps, atol=16 * eps * (centre + 1))
    np.testing.assert_allclose(stats["cpp"][1], stats["numpy"][1], rtol=64 * eps * (1 + centre * eps ** 0.5))


@FEW
@given(dtype=DTYPES, shape=st.sampled_from([(700, 70), (9, 13, 33, 17), (3000, 11)]),
       centre=st.sampled_from([0.0, 1e3, 1e8]), seed=SEEDS)
def test_batchnorm_statistics_do_not_depend_on_the_thread_count(dtype, shape, centre, seed):
    # >= 32768 elements: the kernels run on the OpenMP team; C = 70 is not a multiple of the
    # 64-channel blocks of the (N, C) layout
    x = (centre + np.random.default_rng(seed).standard_normal(shape)).astype(dtype)
    results = []
    for threads in (1, 2, 3):
        mean, var = np.full(shape[1], np.nan, dtype), np.full(shape[1], np.nan, dtype)
        with omp_threads(threads):
            C.batchnorm_stats(x, mean, var)
        results.append((mean, var))
    for mean, var in results[1:]:
        np.testing.assert_array_equal(mean, results[0][0])
        np.testing.assert_array_equal(var, results[0][1])


# ----------------------------------------------------------------------- float64 finite differences

def _finite_differences(implementation, inputs, params, g, index, step):
    """Central differences of sum(g * f(inputs)) with respect to inputs[index], relative steps."""
    x = inputs[index]
    out = np.zeros(x.shape)
    for j in range(x.size):
        h = step * max(1.0, abs(x.flat[j]))
        values = []
        for sign in (1, -1):
            moved = [a.copy() if a is not None else None for a in inputs]
            moved[index].flat[j] += sign * h
            y, _ = run(implementation, tuple(moved), copy.deepcopy(params), needs=(False,) * len(inputs))
            values.append(float((g * y).sum()))
        out.flat[j] = (values[0] - values[1]) / (2 * h)
    return out


# the elementwise family (the specs with ``elementwise``) and a few others
ELEMENTWISE = [op.name for op in registry.all_ops() if op.elementwise is not None]
GRADCHECK_OPS = st.sampled_from([(name, {}) for name in ELEMENTWISE] + [
    ("leaky_relu", {"slope": -0.3}), ("elu", {"alpha": 1.5}), ("batchnorm", {}), ("batchnorm", {"training": False}),
    ("conv3x3_act", {"activation": "elu"}), ("conv3x3_act", {"activation": "swish"}), ("avg_pool2x2", {})])


@FEW
@given(op=GRADCHECK_OPS, scale=st.sampled_from([0.1, 1.0, 8.0]), offset=st.sampled_from([0.0, -2.0, 2.0]),
       seed=SEEDS)
def test_cpp_backward_matches_float64_finite_differences(op, scale, offset, seed):
    name, params = op
    params = dict(params)
    rng = np.random.default_rng(seed)
    if name == "batchnorm":
        x = draw_array(rng, (4, 2, 2, 3), np.float64, scale, offset)
        inputs = (x, rng.uniform(0.5, 2, 2), rng.standard_normal(2))
        if not params.get("training", True):
            params.update(running_mean=rng.standard_normal(2), running_var=rng.uniform(0.5, 2, 2))
    elif name == "conv3x3_act":
        inputs = (draw_array(rng, (1, 2, 3, 4), np.float64, scale, offset),
                  draw_array(rng, (2, 2, 3, 3), np.float64, 0.5),
                  draw_array(rng, (2,), np.float64, scale, offset), None)
    elif name == "avg_pool2x2":
        inputs = (draw_array(rng, (1, 2, 4, 5), np.float64, scale, offset),)
    else:
        x = draw_array(rng, (3, 7), np.float64, scale, offset)
        inputs = (np.where(np.abs(x) < 1e-3, 1e-3, x),)  # away from the kinks at 0
    implementation = cpp(name, "direct" if name == "conv3x3_act" else "default")
    y, _ = run(implementation, inputs, copy.deepcopy(params))
    g = rng.standard_normal(y.shape)
    _, grads = run(implementation, inputs, copy.deepcopy(params), g)
    for i, analytic in enumerate(grads):
        if analytic is None or inputs[i] is None:
            continue
        numeric = _finite_differences(implementation, inputs, params, g, i, 1e-6)
        np.testing.assert_allclose(analytic, numeric, rtol=2e-5, atol=2e-6 * max(1.0, np.abs(numeric).max()),
                                   err_msg=f"{name} gradient {i}")


# ----------------------------------------------------------------------- PyTorch

def _torch_run(name, inputs, params, g):
    """forward and input gradients of the PyTorch equivalent (the spec's ``torch``), float64."""
    torch = pytest.importorskip("torch")

    tensors = [None if a is None else torch.tensor(as64(a), requires_grad=True) for a in inputs]
    y = registry.get(name).torch(*tensors, **params)
    y.backward(torch.tensor(as64(g)))
    return y.detach().numpy(), [None if t is None else t.grad.numpy() for t in tensors]


TORCH_OPS = st.sampled_from(ELEMENTWISE + ["prelu", "max_pool2x2", "avg_pool2x2", "conv3x3", "batchnorm"])


@FEW
@given(name=TORCH_OPS, dtype=DTYPES, scale=st.sampled_from([1e-3, 1.0, 30.0]), offset=OFFSETS, seed=SEEDS,
       layouts=st.lists(LAYOUT_NAMES, min_size=3))
def test_cpp_matches_pytorch(name, dtype, scale, offset, seed, layouts):
    rng = np.random.default_rng(seed)
    x = draw_array(rng, (2, 3, 4, 6), dtype, scale, offset)
    params = {"leaky_relu": {"slope": 0.2}, "elu": {"alpha": 0.7}}.get(name, {})
    if name == "prelu":
        inputs = (x, rng.uniform(-0.3, 0.5, 3).astype(dtype))
    elif name == "conv3x3":
        inputs = (x, draw_array(rng, (4, 3, 3, 3), dtype, 0.3), draw_array(rng, (4,), dtype, scale))
    elif name == "batchnorm":
        inputs = (x, rng.uniform(0.5, 2, 3).astype(dtype), rng.standard_normal(3).astype(dtype))
    else:
        inputs = (x,)
    y, _ = run(cpp(name, "direct" if name == "conv3x3" else "default"), inputs, params)
    g = draw_array(rng, y.shape, dtype, 1.0)
    moved = tuple(LAYOUTS[lay](a) for lay, a in zip(layouts, inputs))
    y, grads = run(cpp(name, "direct" if name == "conv3x3" else "default"), moved, params, LAYOUTS[layouts[-1]](g))
    y_torch, grads_torch = _torch_run(name, inputs, params, g)
    # normwise: PyTorch's sigmoid' and tanh' come from the output (1 - y^2 is 0 once y rounds to
    # 1), so they are only accurate relative to the scale of the incoming gradient (1)
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(y, y_torch, rtol=rtol, atol=rtol * np.abs(y_torch).max())
    for got, want in zip(grads, grads_torch):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * (np.abs(want).max() + 1))


# ----------------------------------------------------------------------- inputs the wrappers refuse

@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.int64, np.uint8, np.complex64])
def test_inputs_that_are_not_float32_or_float64_raise_one_error_naming_them(dtype):
    import pycnn.functional as F

    x = np.ones((2, 3, 4, 4), dtype)
    w = np.ones((2, 3, 3, 3), np.float32)
    for call, name in ((lambda: F.relu(x), "x"), (lambda: F.sigmoid(x), "x"), (lambda: F.conv3x3(x, w), "x"),
                       (lambda: F.conv3x3(w[:, :, :2], x[:2, :, :3, :3]), "weight"), (lambda: F.max_pool2x2(x), "x"),
                       (lambda: F.batch_norm(x, w[0, :, 0, 0], w[0, :, 0, 0]), "x")):
        with pytest.raises(TypeError, match=f"{name} must be float32 or float64, got {np.dtype(dtype)}"):
            call()


@pytest.mark.parametrize("name,shape", [("relu", (0, 3)), ("sigmoid", (4, 0)), ("tanh", (0,)), ("elu", (0, 2, 3, 3)),
                                        ("dropout", (0, 5)), ("leaky_relu", (2, 0, 1))])
def test_empty_inputs_give_empty_outputs_and_gradients(name, shape):
    x = np.ones(shape, np.float32)
    y, (gx,) = run(cpp(name), (x,), {}, np.ones(shape, np.float32))
    assert y.shape == shape and gx.shape == shape and y.dtype == gx.dtype == np.float32
