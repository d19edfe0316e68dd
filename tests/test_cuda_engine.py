"""The CUDA engine around the kernels: the NumPy 2.5 import fix, the raw launch path's
signatures and PTX cache keys, batch norm's numerics on data far from zero, and the number
of kernels a training step launches.  Runs in Numba's CUDA simulator (no GPU needed);
the raw launch itself is exercised on a real GPU by tests/test_cuda_backend.py and
bench/gpu_step.py, and its ABI against real PTX by test_kernels_compile_to_ptx.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import models
from pycnn.autograd import Context
from pycnn.ops import registry, routing
from tests.test_cuda_backend import HAVE_NUMBA_CUDA, SIMULATED, cuda_backend, needs_cuda, to_device, to_host

ROOT = Path(pycnn.__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed")
def test_numba_cuda_imports_where_numpy_has_no_row_stack():
    """NumPy 2.5 removed numpy.row_stack, which numba-cuda 0.30.4 uses at import: pycnn's
    kernels put the alias back before numba.cuda loads (same function: vstack)."""
    without_alias = "import numpy as np\nif hasattr(np, 'row_stack'): del np.row_stack\n"
    direct = _python(without_alias + "import numba.cuda.np.arrayobj")
    assert direct.returncode != 0 and "row_stack" in direct.stderr  # the failure being fixed
    through_pycnn = _python(without_alias + (
        "from pycnn.ops import cuda_backend\n"
        "cuda_backend.kernel_module('activations')\n"
        "import numba.cuda.np.arrayobj\n"
        "assert np.row_stack is np.vstack\n"))
    assert through_pycnn.returncode == 0, through_pycnn.stderr[-3000:]


@pytest.mark.skipif(not (HAVE_NUMBA_CUDA and SIMULATED), reason="the simulator runs the cuda backend on NumPy arrays")
def test_pycnn_cuda_conv_is_read_once_when_the_backend_is_imported():
    """PYCNN_CUDA_CONV=igemm in a process's environment: auto runs igemm for conv3x3 and
    conv3x3_act; changing the variable later changes nothing."""
    result = subprocess.run([sys.executable, "-c", (
        "import os, numpy as np, pycnn\n"
        "from pycnn.ops import cuda_backend, registry\n"
        "os.environ['PYCNN_CUDA_CONV'] = 'gemm'\n"
        "x, w = np.ones((1, 2, 3, 3), np.float32), np.ones((2, 2, 3, 3), np.float32)\n"
        "with pycnn.use_backend('cuda'):\n"
        "    print(registry.get('conv3x3').resolve((x, w, None), {})[1],\n"
        "          registry.get('conv3x3_act').resolve((x, w, None, None), {'activation': 'relu'})[1])\n")],
        env={**os.environ, "PYCNN_CUDA_CONV": "igemm",
             "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["igemm", "igemm"]


# ------------------------------------------------------------------------ raw launch path

@needs_cuda
def test_raw_launch_signature_and_abi_layout():
    import numba
    from numba import types
    raw = cuda_backend().kernels_package()._rawlaunch
    args = (np.zeros((2, 3), np.float32), np.zeros(4, np.float64)[::2], np.float32(1), True, 7, 2.5)
    assert raw.numba_types(args) == (types.Array(numba.float32, 2, "C"), types.Array(numba.float64, 1, "A"),
                                     numba.float32, numba.boolean, numba.int64, numba.float64)
    # arrays: meminfo, parent, nitems, itemsize, data, shape, strides (8 bytes each)
    assert raw.expected_params(raw.numba_types(args)) == [64] * 9 + [64] * 7 + [32, 8, 64, 64]
    # the packed launch buffer: the same fields as struct codes (native alignment = CUDA's)
    assert raw._param_codes(raw.numba_types(args)) == "qqqqQqqqq" + "qqqqQqq" + "fBqd"


@needs_cuda
def test_raw_launch_rejects_ptx_whose_parameters_differ():
    from numba import types
    raw = cuda_backend().kernels_package()._rawlaunch
    ptx = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .f32 k_param_1\n)\n{\n}\n"
    assert raw.check_ptx_params(ptx, (types.int64, types.float32)) == "k"
    with pytest.raises(RuntimeError, match="do not match"):
        raw.check_ptx_params(ptx, (types.int64, types.float64))


@needs_cuda
def test_every_kernel_has_a_stable_ptx_cache_key():
    """Closure values (dtype, tile size, device functions) are keyed by text without memory
    addresses, so a new process finds the PTX cached by an earlier one; the builds of one
    kernel for each activation differ in name and key, so none is served another's PTX."""
    kernels = cuda_backend().kernels_package()
    raw = kernels._rawlaunch
    from pycnn.kernels import _launch, activations, batchnorm, conv_gemm, conv_igemm, optim, pool, reduce
    f32 = np.dtype(np.float32)
    built = [*vars(activations._build(f32)).values(), *vars(batchnorm._build(f32)).values(),
             *vars(conv_gemm._build(f32)).values(), *vars(optim._build(f32)).values(),  # optim: generated kernels too
             *vars(pool._build(f32)).values(), *vars(conv_igemm._grad_weight_kernels(f32, False)).values(),
             reduce._zero_kernel(f32), reduce._channel_sum(_launch.numba_type(f32), reduce.first)]
    keys = set()
    for name in activations.SPECS:
        per_activation = [*vars(conv_gemm._build_activation(f32, name)).values(),
                          *vars(batchnorm._build_activation(f32, name)).values(),
                          conv_igemm._forward_kernel(f32, False, name)]
        per_activation += list(activations._map_kernels(f32, name)) if name in activations.MAPS else []
        for kernel in per_activation:
            key = (kernel.py_func.__qualname__, raw._closure_key(kernel.py_func))
            assert key not in keys, key
            keys.add(key)
        built += per_activation
    for kernel in built:
        if hasattr(kernel, "py_func") and not getattr(kernel, "_device", False):
            key = raw._closure_key(kernel.py_func)
            assert key is not None and " at 0x" not in key, kernel.py_func.__qualname__


# ------------------------------------------------------------ batch norm far from zero

@needs_cuda
@pytest.mark.parametrize("offset, dtype, rtol", [(1e8, np.float64, 1e-6), (1e3, np.float64, 1e-9),
                                                 (1e3, np.float32, 2e-3)])
def test_cuda_batchnorm_statistics_stay_accurate_far_from_zero(offset, dtype, rtol, monkeypatch):
    """Welford + Chan merging: no E[x^2] - E[x]^2 cancellation; several blocks per channel."""
    rng = np.random.default_rng(3)
    x = (offset + rng.standard_normal((4, 3, 20, 20))).astype(dtype)
    gamma, beta = np.ones(3, dtype), np.zeros(3, dtype)
    running_mean, running_var = np.zeros(3, dtype), np.ones(3, dtype)
    cb = cuda_backend()
    if not SIMULATED:  # 256 threads a block on a GPU: fewer values per thread, more blocks
        monkeypatch.setattr(cb.kernel_module("batchnorm"), "ELEMENTS_PER_THREAD", 1)
    assert cb.kernel_module("batchnorm")._split(x)[3] > 1  # the merge across blocks is exercised
    with pycnn.use_backend("cuda"):
        _, _, impl = registry.get("batchnorm").resolve((to_device(x),), {})
    rm, rv = to_device(running_mean), to_device(running_var)
    y = to_host(impl.forward(Context((True,) * 3), to_device(x), to_device(gamma), to_device(beta),
                             running_mean=rm, running_var=rv))
    exact = x.astype(np.float64)
    mean = exact.mean(axis=(0, 2, 3))
    centred = exact - mean.reshape(1, 3, 1, 1)
    var = (centred ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), np.sqrt(var / (var + 1e-5)), rtol=rtol)
    np.testing.assert_allclose(to_host(rm), 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(to_host(rv), 0.9 + 0.1 * var * 1600 / 1599, rtol=rtol)


# ------------------------------------------------------------------ kernels per training step

# Ops that run as their array-generic reference on cuda (CuPy), with the array operations
# (launches) their reference code makes per pass: linear  y = x @ w.T; y += b  /  grad @ w,
# grad.T @ x, grad.sum(0); flatten a reshape.
CUPY_LAUNCHES = {"linear": (2, 3), "flatten": (0, 0)}
# What the step below measures, with conv3x3 as im2col + cuBLAS (gemm, the default): 81
# launches for 24 layers, 3.38 a layer; 3.33 without the optimizer's one multi-tensor launch
# for all 20 parameters.  As implicit GEMM (igemm, and igemm_tf32 alike; grad_x reads the weight flipped in place): 68,
# 2.83 a layer, grad_weight's sum over pixel splits counted where a GPU-sized batch has them
# (here the last stage's 8 pixels make one split: with all six split, 70, 2.92 a layer).
LAUNCHES_PER_LAYER = {"gemm": 3.4, "igemm": 3.0}
CONV_LAUNCHES = {"gemm": (12, 11, 17), "igemm": (6, 21, 0)}  # forward, backward, cuBLAS products


def _counting_routes(monkeypatch, records):
    """Wrap every route so that each top-level op call records (op, algo, pass, our kernel
    launches, matrix products): chained steps inside a fused op count for the fused op."""
    from pycnn.kernels import _launch
    real_route, depth, gemms = routing.route, [0], [0]
    real_matmul = np.matmul  # conv3x3 'gemm' calls xp.matmul: cuBLAS on a GPU

    def matmul(*a, **k):
        gemms[0] += 1
        return real_matmul(*a, **k)
    monkeypatch.setattr(np, "matmul", matmul)

    def counted(name, algo, phase, run):
        def call(*a, **k):
            depth[0] += 1
            launches, products = _launch.launch_count(), gemms[0]
            try:
                return run(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    records.append((name, algo, phase, _launch.launch_count() - launches, gemms[0] - products))
        return call

    def route(op, inputs, params, algo="auto"):
        r = real_route(op, inputs, params, algo)
        impl = registry.Impl(counted(op.name, r.algo, "forward", r.impl.forward),
                             counted(op.name, r.algo, "backward", r.impl.backward), r.impl.refuses, r.impl.rounding)
        return routing.Route(r.backend, r.algo, impl)
    monkeypatch.setattr(routing, "route", route)


@needs_cuda
@pytest.mark.parametrize("conv_algo", ["gemm", "igemm"])
def test_a_training_step_of_the_readme_net_launches_few_kernels_per_layer(monkeypatch, capsys, request, conv_algo):
    """One step of the README's CIFAR-10 net as ``pycnn train`` builds it (VGG, 3 stages of
    2 x conv3x3 + BN + ReLU, max pooling, dropout, linear; SGD with Nesterov momentum and
    weight decay) on the cuda backend, widths and image shrunk for the simulator (the
    launches do not depend on them).  Counts, per layer: our kernel launches (one counter,
    ``kernels._launch.launch_count``), cuBLAS matrix products, and the CuPy operations of
    the ops that run as references; the optimizer's one multi-tensor launch counts too."""
    from pycnn.kernels import _launch

    from pycnn import optim
    from pycnn.training import config as config_module
    from pycnn.training import pipeline
    cuda_backend()
    for name in ("conv3x3", "conv3x3_act"):
        routing.set_default(name, "cuda", conv_algo)
        request.addfinalizer(lambda name=name: routing.set_default(name, "cuda", None))
    if conv_algo == "igemm":  # grad_weight in 2 pixel splits + their sum, as at batch 256 on a GPU
        monkeypatch.setattr(cuda_backend().kernel_module("conv_igemm"), "splits_for", lambda *args, **kwargs: 2)
    config = config_module.Config(dataset="cifar10", widths=(2, 3, 4), convs_per_stage=2)  # README: 32, 64, 128
    net = models.build(pipeline.model_spec(config, 3, 8, 10), seed=0)
    optimizer = pipeline.make_optimizer(config, net)
    if SIMULATED:  # the fused optimizer kernels take CUDA arrays; the simulator's are NumPy
        monkeypatch.setattr(optim, "is_cuda_array", lambda a: True)
    else:
        net.to("cuda")
    rng = np.random.default_rng(0)
    x = pycnn.Tensor(to_device(rng.standard_normal((2, 3, 8, 8)).astype(np.float32)))
    labels = to_device(np.array([3, 7]))
    records = []
    _counting_routes(monkeypatch, records)
    with pycnn.use_backend("cuda"):
        loss = F.softmax_cross_entropy(net(x), labels)
        optimizer.zero_grad()
        loss.backward()  # + 1 CuPy fill: the seed gradient (ones)
        before = _launch.launch_count()
        optimizer.step()
        optimizer_launches = _launch.launch_count() - before
    parameters = sum(1 for p in net.parameters() if p.requires_grad)
    assert parameters == 20 and len(optimizer.param_groups) == 2
    assert optimizer_launches == 1  # one multi-tensor SGD kernel for every parameter of both groups

    per_op = {}
    for name, algo, phase, ours, products in records:
        entry = per_op.setdefault(name, {"algo": algo, "calls": 0, "forward": 0, "backward": 0, "gemm": 0})
        entry["calls"] += phase == "forward"
        entry[phase] += ours
        entry["gemm"] += products
    reference_ops = {name for name, e in per_op.items() if e["algo"] == "reference"}
    assert reference_ops <= set(CUPY_LAUNCHES), reference_ops  # every other op runs kernels of our own
    assert per_op["batchnorm_act"]["algo"] == "fused" and "batchnorm" not in per_op and "relu" not in per_op
    cupy = sum(per_op[name]["calls"] * sum(CUPY_LAUNCHES[name]) for name in reference_ops) + 1
    layers = len(net)  # the Sequential's modules: conv, BN, ReLU (fused with the BN), pooling, flatten, ...
    total = sum(e["forward"] + e["backward"] + e["gemm"] for e in per_op.values()) + cupy + optimizer_launches
    with capsys.disabled():
        print(f"\nlaunches of one training step, {layers} layers, {parameters} parameters:")
        print("| op | algo | calls | ours fwd | ours bwd | cuBLAS | CuPy |")
        for name, e in per_op.items():
            print(f"| {name} | {e['algo']} | {e['calls']} | {e['forward']} | {e['backward']} | {e['gemm']} | "
                  f"{e['calls'] * sum(CUPY_LAUNCHES.get(name, (0, 0)))} |")
        print(f"| optimizer (SGD, {parameters} parameters) | multi-tensor | 1 | {optimizer_launches} | | | |")
        print(f"total {total} = {total / layers:.2f} per layer "
              f"({(total - optimizer_launches) / layers:.2f} without the optimizer)")
    # exact figures per op and pass, so that a regression says where it is
    assert per_op["conv3x3"]["algo"] == conv_algo
    assert (per_op["conv3x3"]["forward"], per_op["conv3x3"]["backward"], per_op["conv3x3"]["gemm"]) == \
        CONV_LAUNCHES[conv_algo]
    assert (per_op["batchnorm_act"]["forward"], per_op["batchnorm_act"]["backward"]) == (12, 12)
    assert (per_op["max_pool2x2"]["forward"], per_op["max_pool2x2"]["backward"]) == (3, 3)
    assert (per_op["softmax_cross_entropy"]["forward"], per_op["softmax_cross_entropy"]["backward"]) == (1, 1)
    assert total / layers <= LAUNCHES_PER_LAYER[conv_algo], (total, layers)


# --------------------------------------------------------------------------- optimizer

@needs_cuda
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.9, True, 0.01), (0.5, False, 0.0), (0.0, False, 0.1)])
def test_fused_sgd_kernel_matches_the_array_operations(momentum, nesterov, weight_decay):
    """pycnn.kernels.optim.sgd_step (what SGD runs on CUDA parameters) against SGD's own
    array operations on the host, over three steps (the first creates the velocity)."""
    from pycnn import optim
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal((3, 5)).astype(np.float64)
    grads = [rng.standard_normal((3, 5)) for _ in range(3)]
    reference = pycnn.Tensor(w0.copy(), requires_grad=True)
    opt = optim.SGD([reference], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    kernels = cuda_backend().optimizer_kernels()
    w, velocity = to_device(w0.copy()), None
    for step, g in enumerate(grads):
        reference.grad = g.copy()
        opt.step()
        if momentum and velocity is None:
            velocity = to_device(np.full_like(w0, np.nan))
        kernels.sgd_step(w, to_device(g), velocity, 0.1, momentum, weight_decay, nesterov, step == 0)
        np.testing.assert_allclose(to_host(w), reference.data, rtol=1e-12, atol=1e-12)


@needs_cuda
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_fused_adam_kernel_matches_the_array_operations(weight_decay):
    """pycnn.kernels.optim.adam_step (what Adam runs on CUDA parameters) against Adam's own
    array operations on the host, over three steps (the first creates the moments)."""
    from pycnn import optim
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((4, 3)).astype(np.float64)
    grads = [rng.standard_normal((4, 3)) for _ in range(3)]
    reference = pycnn.Tensor(w0.copy(), requires_grad=True)
    opt = optim.Adam([reference], lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    kernels = cuda_backend().optimizer_kernels()
    w = to_device(w0.copy())
    m, v = to_device(np.full_like(w0, np.nan)), to_device(np.full_like(w0, np.nan))
    for step, g in enumerate(grads, start=1):
        reference.grad = g.copy()
        opt.step()
        kernels.adam_step(w, to_device(g), m, v, 0.01, 0.8, 0.99, 1e-6, weight_decay, step)
        np.testing.assert_allclose(to_host(w), reference.data, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_host(m), opt.state[id(reference)]["m"], rtol=1e-12, atol=1e-15)


# Odd and mixed sizes, more parameters than one launch's slots (SGD 20, Adam 15).
MULTI_SHAPES = [(3, 5), (7,), (1,), (2, 3, 3, 3), (301,), (4, 1, 3, 3), (13,), (2,), (5, 7), (1, 1), (33,),
                (6,), (3, 3, 3, 1), (17,), (9, 2), (11,), (1, 3), (8,), (2, 2, 5), (29,), (3,), (4, 4), (5,)]


def _multi_params(dtype, seed):
    """Parameters in three groups of their own lr / weight decay (one with max-norm)."""
    rng = np.random.default_rng(seed)
    params = [pycnn.Tensor(to_device(rng.standard_normal(s).astype(dtype)), requires_grad=True)
              for s in MULTI_SHAPES]
    groups = [{"params": params[:9], "lr": 0.1, "weight_decay": 0.01},
              {"params": params[9:18], "lr": 0.05, "weight_decay": 0.0},
              {"params": params[18:], "lr": 0.2, "weight_decay": 0.003, "max_norm": 1.5}]
    return params, groups


def _multi_grads(dtype, step, seed):
    """Gradients of step ``step``: parameters 3 and 10 have none on step 0 (their state
    starts one step later, in a launch where the others' does not), 5 none on step 2."""
    rng = np.random.default_rng(seed + 100 + step)
    missing = {0: (3, 10), 2: (5,)}.get(step, ())
    return [None if i in missing else to_device(rng.standard_normal(s).astype(dtype))
            for i, s in enumerate(MULTI_SHAPES)]


def _as_cuda_in_the_simulator(monkeypatch):
    from pycnn import optim
    if SIMULATED:  # the optimizer's kernels take CUDA arrays; the simulator's are NumPy
        monkeypatch.setattr(optim, "is_cuda_array", lambda a: True)


def _multi_tensor_setup(monkeypatch, dtype, seed, make_optimizer):
    """(the per-parameter kernels, the parameters, the optimizer over their groups, copies of
    the parameters for the per-parameter reference, (lr, weight decay, max-norm) of each)."""
    _as_cuda_in_the_simulator(monkeypatch)
    kernels = cuda_backend().optimizer_kernels()
    params, groups = _multi_params(dtype, seed=seed)
    reference = [to_device(to_host(p.data).copy()) for p in params]
    hyper = [(g["lr"], g["weight_decay"], g.get("max_norm")) for g in groups for _ in g["params"]]
    return kernels, params, make_optimizer(groups), reference, hyper


def _launches_of_step(opt, params, grads) -> int:
    """The kernels one optimizer step launches, the gradients set first."""
    from pycnn.kernels import _launch
    for p, g in zip(params, grads):
        p.grad = g
    before = _launch.launch_count()
    opt.step()
    return _launch.launch_count() - before


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum, nesterov", [(0.9, True), (0.5, False), (0.0, False)])
def test_multi_tensor_sgd_gives_the_per_parameter_kernels_numbers(dtype, momentum, nesterov, monkeypatch):
    """SGD.step on CUDA parameters (multi-tensor kernels: every parameter of every group in
    ceil(n / 20) launches) against pycnn.kernels.optim.sgd_step run per parameter, bit for
    bit, over three steps: odd and mixed sizes, three groups of their own lr and weight
    decay, parameters without a gradient on some steps, max-norm after the update."""
    from pycnn import optim
    kernels, params, opt, reference, hyper = _multi_tensor_setup(
        monkeypatch, dtype, 6, lambda groups: optim.SGD(groups, lr=0.1, momentum=momentum, nesterov=nesterov))
    velocities = [None] * len(params)
    for step in range(3):
        grads = _multi_grads(dtype, step, seed=6)
        with_grad = sum(g is not None for g in grads)
        assert _launches_of_step(opt, params, grads) == -(-with_grad // (20 if momentum else 28))
        for i, g in enumerate(grads):
            if g is None:
                continue
            lr, decay, max_norm = hyper[i]
            first = momentum and velocities[i] is None
            if first:
                velocities[i] = to_device(np.full(MULTI_SHAPES[i], np.nan, dtype))
            kernels.sgd_step(reference[i], g, velocities[i] if momentum else None, lr, momentum, decay, nesterov,
                             first)
            if max_norm is not None and reference[i].ndim > 1:
                optim._project_rows(reference[i], max_norm)
        for i, p in enumerate(params):
            assert p.data.dtype == dtype
            np.testing.assert_array_equal(to_host(p.data), to_host(reference[i]), err_msg=f"step {step}, param {i}")
            if momentum and velocities[i] is not None:
                np.testing.assert_array_equal(to_host(opt.state[id(p)]["velocity"]), to_host(velocities[i]))


@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_multi_tensor_adam_gives_the_per_parameter_kernels_numbers(dtype, monkeypatch):
    """Adam.step on CUDA parameters (ceil(n / 15) launches, each parameter its own step
    count) against pycnn.kernels.optim.adam_step per parameter, bit for bit, three steps."""
    from pycnn import optim
    kernels, params, opt, reference, hyper = _multi_tensor_setup(
        monkeypatch, dtype, 7, lambda groups: optim.Adam(groups, lr=0.01, betas=(0.8, 0.99), eps=1e-6))
    moments, steps = [None] * len(params), [0] * len(params)
    for step in range(3):
        grads = _multi_grads(dtype, step, seed=7)
        assert _launches_of_step(opt, params, grads) == -(-sum(g is not None for g in grads) // 15)
        for i, g in enumerate(grads):
            if g is None:
                continue
            lr, decay, max_norm = hyper[i]
            steps[i] += 1
            if moments[i] is None:
                moments[i] = [to_device(np.full(MULTI_SHAPES[i], np.nan, dtype)) for _ in range(2)]
            kernels.adam_step(reference[i], g, *moments[i], lr, 0.8, 0.99, 1e-6, decay, steps[i])
            if max_norm is not None and reference[i].ndim > 1:
                optim._project_rows(reference[i], max_norm)
        for i, p in enumerate(params):
            np.testing.assert_array_equal(to_host(p.data), to_host(reference[i]), err_msg=f"step {step}, param {i}")
            if moments[i] is not None:
                assert opt.state[id(p)]["step"] == steps[i]
                np.testing.assert_array_equal(to_host(opt.state[id(p)]["v"]), to_host(moments[i][1]))


@needs_cuda
def test_l1_parameters_keep_the_array_operations_beside_the_multi_tensor_kernel(monkeypatch):
    """A group with L1 runs SGD's array operations; the others' one launch; both as on the
    host (to rounding: the kernel's float64 arithmetic order is the array operations')."""
    from pycnn.kernels import _launch

    from pycnn import optim
    rng = np.random.default_rng(8)
    w0 = [rng.standard_normal(s) for s in ((3, 4), (5,), (2, 3))]
    grads = [[rng.standard_normal(w.shape) for w in w0] for _ in range(3)]

    def run(on_device):
        params = [pycnn.Tensor(to_device(w.copy()) if on_device else w.copy(), requires_grad=True) for w in w0]
        opt = optim.SGD([{"params": params[:2], "weight_decay": 0.01}, {"params": params[2:], "l1": 0.02}],
                        lr=0.1, momentum=0.9, nesterov=True)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = to_device(g.copy()) if on_device else g.copy()
            before = _launch.launch_count()
            opt.step()
            launches = _launch.launch_count() - before
        return [to_host(p.data) for p in params], launches
    host, _ = run(False)
    _as_cuda_in_the_simulator(monkeypatch)
    device, launches = run(True)
    assert launches == 1
    for a, b in zip(device, host):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


# --------------------------------------------------- the trainer's regularisation term

@needs_cuda
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-13)])
def test_regularisation_loss_of_cuda_parameters_reads_the_device_once(dtype, rtol, monkeypatch):
    """The trainer's regularisation term of CUDA parameters: one multi-tensor launch (up to
    32 parameters) and one host read for all of them, not one synchronisation per
    parameter; the value is the host computation's (float64 sums on the device)."""
    from pycnn.kernels import _launch

    from pycnn import optim
    from pycnn.training import trainer
    rng = np.random.default_rng(9)
    shapes = MULTI_SHAPES + [(40,), (3, 7)] * 6  # 35 parameters, 34 regularised: two launches
    host = [rng.standard_normal(s).astype(dtype) for s in shapes]
    spans = [(slice(0, 20), {"weight_decay": 0.01, "l1": 0.003}), (slice(20, 34), {"l1": 0.002}),
             (slice(34, 35), {"weight_decay": 0.0})]

    def optimizer(arrays):
        params = [pycnn.Tensor(a, requires_grad=True) for a in arrays]
        return optim.SGD([{"params": params[span], **extra} for span, extra in spans], lr=0.1)
    expected = trainer.regularisation_loss(optimizer([a.copy() for a in host]))
    opt = optimizer([to_device(a.copy()) for a in host])
    if SIMULATED:
        monkeypatch.setattr(trainer, "is_cuda_array", lambda a: True)
    reads = []
    real_to_host = trainer.to_host
    monkeypatch.setattr(trainer, "to_host", lambda a: reads.append(1) or real_to_host(a))
    before = _launch.launch_count()
    value = trainer.regularisation_loss(opt)
    assert (_launch.launch_count() - before, len(reads)) == (2, 1)
    assert value == pytest.approx(expected, rel=rtol)
    manual = sum(0.5 * extra.get("weight_decay", 0.0) * float((a.astype(np.float64) ** 2).sum())
                 + extra.get("l1", 0.0) * float(np.abs(a.astype(np.float64)).sum())
                 for span, extra in spans for a in host[span])
    assert value == pytest.approx(manual, rel=1e-13)


# ----------------------------------------------------- sigmoid and tanh over the whole range

@needs_cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_sigmoid_and_tanh_keep_relative_accuracy_in_the_tails(dtype):
    """sigmoid(-20) is 2.06e-9, not 0 (the old 0.5 * (tanh(x / 2) + 1)); the backward passes
    read x, so their gradients do not vanish where y rounds to 1 (the old y(1 - y))."""
    x = np.array([-80.0, -20.0, -12.0, -1.0, 0.0, 3.0, 12.0, 20.0], dtype)
    exact = x.astype(np.float64)
    sig = 1 / (1 + np.exp(-exact))
    e = np.exp(-np.abs(exact))
    expected = {"sigmoid": (sig, e / (1 + e) ** 2), "tanh": (np.tanh(exact), 1 / np.cosh(exact) ** 2)}
    for name, (y_exact, dy_exact) in expected.items():
        with pycnn.use_backend("cuda"):
            _, _, impl = registry.get(name).resolve((to_device(x),), {})
        ctx = Context((True,))
        y = to_host(impl.forward(ctx, to_device(x)))
        (grad,) = impl.backward(ctx, to_device(np.ones_like(x)))
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        # the exact values rounded to the dtype (tanh'(-80) = 1.3e-69 is 0 in float32)
        np.testing.assert_allclose(y, y_exact.astype(dtype), rtol=rtol, err_msg=name)
        np.testing.assert_allclose(to_host(grad), dy_exact.astype(dtype), rtol=rtol, err_msg=f"{name} backward")
