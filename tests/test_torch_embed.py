"""pycnn inside PyTorch (``pycnn.torch``): every registry op as a torch.autograd.Function
(float64 gradcheck), the layers as torch.nn.Modules against pure torch, zero-copy
conversions, aliasing and in-place safety, a few SGD steps of a small net against pure
torch, and the cuda backend reached from torch tensors (simulator) — the CUDA tensor path
itself (DLPack, torch's stream) is tested only where a real GPU is present."""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pycnn  # noqa: E402
import pycnn.torch as pt  # noqa: E402
from pycnn import nn as pnn  # noqa: E402
from pycnn.ops import _util, registry  # noqa: E402
from tests.torch_equivalents import TORCH_EQUIVALENTS  # noqa: E402

F = torch.nn.functional
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
# float32: the kernels' own accuracy is tested elsewhere; here the wiring (summation orders differ)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


pytestmark = pytest.mark.usefixtures("one_kernel_thread")


def _torch_sample(sample, dtype=torch.float64, requires_grad=True):
    """A registry sample's inputs as torch tensors (leaves that require grad where the
    sample differentiates them); params are left as they are (NumPy labels, statistics)."""
    inputs = tuple(None if x is None else torch.tensor(x, dtype=dtype, requires_grad=requires_grad and bool(d))
                   for x, d in zip(sample.inputs, sample.differentiable))
    return inputs, copy.deepcopy(sample.params)


def _assert_close(actual, expected, dtype=torch.float64):
    torch.testing.assert_close(actual, expected, **TOL[dtype])


# ------------------------------------------------------------------ every op: gradcheck

@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_gradcheck_float64(name):
    """torch.autograd.gradcheck of the op's torch Function on every test sample of the
    registry (odd sizes; rrelu/dropout with fixed seeds; pool inputs are distinct normals)."""
    op = registry.get(name)
    samples = op.samples(np.random.default_rng(0), np.float64)
    for sample in samples:
        inputs, params = _torch_sample(sample)
        if not sample.gradcheck or not any(x is not None and x.requires_grad for x in inputs):
            continue  # (not gradcheck: infinities or NaN)
        if name == "max_pool2x2":  # distinct values: no tie within half a step of gradcheck's eps
            assert all(len(np.unique(x.detach().numpy())) == x.numel() for x in inputs)
        def f(*xs, params=params):
            return pt.apply_op(name, *xs, **params)
        assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_layers_and_functions():
    """The named functions and the layers' parameters (PReLU's slope, Conv3x3Act's weights)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    slopes = torch.rand(3, dtype=torch.float64, requires_grad=True)
    cases = [
        (lambda x: pt.rrelu(x, training=True, seed=11), (x,)),
        (lambda x: pt.rrelu(x, training=False), (x,)),
        (lambda x: pt.dropout(x, 0.3, training=True, seed=5), (x,)),
        (lambda x: pt.maxout(x, 2), (x,)),
        (lambda x, w: pt.conv3x3(x, w, None, algo="direct"), (x, w)),
        (lambda x, w, b, s: pt.conv3x3_act(x, w, b, s, activation="prelu"), (x, w, b, slopes)),
        (lambda x, w, b: pt.conv3x3_act(x, w, b, activation="leaky_relu", slope=0.2), (x, w, b)),
    ]
    for f, args in cases:
        assert torch.autograd.gradcheck(f, args)


# --------------------------------------------------------- every op: against pure torch

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(registry.REGISTRY))
def test_forward_and_backward_match_pure_torch(name, dtype):
    op = registry.get(name)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    for sample in op.samples(np.random.default_rng(1), np_dtype):
        if not sample.torch_agrees:
            continue  # PyTorch differs there on purpose (the spec says why)
        inputs, params = _torch_sample(sample, dtype)
        twins = tuple(None if x is None else x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
        torch_params = copy.deepcopy(params)
        ours = pt.apply_op(name, *inputs, **params)
        theirs = TORCH_EQUIVALENTS[name](*twins, **torch_params)
        _assert_close(ours, theirs.to(ours.dtype), dtype)
        if not ours.requires_grad:
            continue
        upstream = torch.randn(ours.shape, dtype=ours.dtype, generator=torch.Generator().manual_seed(3))
        ours.backward(upstream)
        theirs.backward(upstream.to(theirs.dtype))
        for x, twin in zip(inputs, twins):
            if x is not None and x.requires_grad:
                _assert_close(x.grad, twin.grad.to(x.dtype), dtype)


# ------------------------------------------------------------------- the Function wrapper

def test_inputs_and_outputs_are_not_copied(monkeypatch):
    """The op reads the torch tensors' memory and torch gets the op's output array."""
    op = registry.get("relu")
    backend, algo, impl = op.resolve((np.zeros(1, np.float32),), {})
    seen = {}

    def forward(ctx, x):
        seen["x"], seen["y"] = x, impl.forward(ctx, x)
        return seen["y"]

    monkeypatch.setitem(op.impls, (backend, algo), registry.Impl(forward, impl.backward))
    x = torch.randn(4, 5)
    y = pt.relu(x)
    assert seen["x"].__array_interface__["data"][0] == x.data_ptr()
    assert seen["y"].__array_interface__["data"][0] == y.data_ptr()


def test_needs_input_grad_reaches_the_op(monkeypatch):
    op = registry.get("conv3x3")
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3, requires_grad=True)
    backend, algo, impl = op.resolve((x.numpy(), w.detach().numpy()), {})
    needs = []

    def backward(ctx, grad):
        needs.append(tuple(ctx.needs_input_grad))
        return impl.backward(ctx, grad)

    monkeypatch.setitem(op.impls, (backend, algo), registry.Impl(impl.forward, backward))
    pt.conv3x3(x, w).sum().backward()
    assert needs == [(False, True, False)]
    assert x.grad is None and w.grad is not None


def test_non_contiguous_inputs_and_gradients():
    torch.manual_seed(1)
    base = torch.randn(2, 5, 6, 3)
    x = base.permute(0, 3, 1, 2).requires_grad_()           # (2, 3, 5, 6), channels last in memory
    w = torch.randn(3, 4, 3, 3).transpose(0, 1).requires_grad_()  # (4, 3, 3, 3), not contiguous
    y = pt.conv3x3(x, w)
    xt, wt = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _assert_close(y, F.conv2d(xt, wt, padding=1), torch.float32)
    y.sum().backward()                                     # upstream gradient: an expanded 1, stride 0
    F.conv2d(xt, wt, padding=1).sum().backward()
    _assert_close(x.grad, xt.grad, torch.float32)
    _assert_close(w.grad, wt.grad, torch.float32)


def test_output_that_aliases_an_input_is_a_torch_view():
    x = torch.randn(3, 4, requires_grad=True)
    y = pt.dropout(x, 0.5, training=False)                 # the op returns its input
    assert y.data_ptr() == x.data_ptr() and y._base is x
    with pytest.raises(RuntimeError, match="view"):
        y.mul_(2)                                          # torch forbids it, as for its own views
    flat = pt.apply_op("flatten", torch.randn(2, 3, 2, 2, requires_grad=True))
    assert flat._base is not None and flat.shape == (2, 12)


def test_changing_a_saved_tensor_in_place_before_backward_raises():
    x = torch.randn(3, 4, requires_grad=True)
    h = x * 1.0
    y = pt.relu(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_gradients_that_share_memory_accumulate_apart():
    """add's backward hands the same array to both inputs: their .grad must stay separate."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    upstream = torch.ones(3)  # contiguous, so torch would keep the very tensor it is handed as .grad
    for _ in range(2):
        pt.apply_op("add", a, b).backward(upstream)
    assert len({a.grad.data_ptr(), b.grad.data_ptr(), upstream.data_ptr()}) == 3
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(b.grad, torch.full((3,), 2.0))
    torch.testing.assert_close(upstream, torch.ones(3))


def test_no_grad_and_inputs_without_grad_record_nothing():
    x = torch.randn(2, 3)
    assert pt.relu(x).grad_fn is None
    xg = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        assert pt.relu(xg).grad_fn is None
    assert pt.relu(xg).grad_fn is not None


def test_argument_checks_run():
    with pytest.raises(ValueError, match="input channels"):
        pt.conv3x3(torch.randn(1, 2, 4, 4), torch.randn(3, 5, 3, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        pt.relu(torch.ones(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="one dtype"):
        pt.prelu(torch.randn(2, 3), torch.rand(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="bfloat16"):
        pt.apply_op("relu", torch.ones(3, dtype=torch.bfloat16))  # the generic path takes what NumPy holds
    with pytest.raises(ValueError, match="pieces"):
        pt.maxout(torch.randn(2, 3, 2, 2), 2)


def test_params_that_are_tensors_share_memory():
    """Labels and running statistics given as torch tensors: batch norm updates the torch
    buffers in place; the loss reads torch labels."""
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    pt.apply_op("batchnorm", x, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                running_mean=mean, running_var=var, training=True, momentum=0.5)
    torch.testing.assert_close(mean, 0.5 * x.mean(dim=(0, 2, 3)))
    logits, labels = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 4, 2, 1])
    loss = pt.apply_op("softmax_cross_entropy", logits, labels=labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))


def test_the_pycnn_profiler_sees_ops_called_from_torch():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    with pycnn.profile() as prof:
        pt.max_pool2x2(x).sum().backward()
    phases = {(op, phase) for (op, _, _, phase) in prof.calls}
    assert {("max_pool2x2", "forward"), ("max_pool2x2", "backward")} <= phases


def test_numbers_and_arrays_as_inputs():
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = pt.apply_op("mul", x, 2.0)
    assert y.dtype == torch.float64
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch tensors, NumPy arrays or numbers"):
        pt.apply_op("relu", [1.0, 2.0])


# ------------------------------------------------------------------------------ the layers

def _pure_torch_twin(module):
    """The pure-torch layer computing what a pycnn.torch layer does (with its parameters)."""
    if isinstance(module, pt.Conv3x3Act):
        conv = torch.nn.Conv2d(module.in_channels, module.out_channels, 3, padding=1, bias=module.bias is not None)
        conv.weight.data = module.weight.detach().clone()
        if module.bias is not None:
            conv.bias.data = module.bias.detach().clone()
        act = {"relu": torch.nn.ReLU(), "leaky_relu": torch.nn.LeakyReLU(module.slope),
               "elu": torch.nn.ELU(module.alpha)}
        if module.activation == "prelu":
            act = torch.nn.PReLU(module.out_channels)
            act.weight.data = module.prelu_weight.detach().clone()
            return torch.nn.Sequential(conv, act)
        return torch.nn.Sequential(conv, act[module.activation])
    if isinstance(module, pt.Conv3x3):
        conv = torch.nn.Conv2d(module.in_channels, module.out_channels, 3, padding=1, bias=module.bias is not None)
        conv.load_state_dict(module.state_dict())
        return conv
    if isinstance(module, pt.PReLU):
        twin = torch.nn.PReLU(module.weight.shape[0])
        twin.load_state_dict(module.state_dict())
        return twin
    simple = {pt.MaxPool2: lambda m: torch.nn.MaxPool2d(2), pt.AvgPool2: lambda m: torch.nn.AvgPool2d(2),
              pt.ReLU: lambda m: torch.nn.ReLU(), pt.LeakyReLU: lambda m: torch.nn.LeakyReLU(m.slope),
              pt.ELU: lambda m: torch.nn.ELU(m.alpha), pt.Sigmoid: lambda m: torch.nn.Sigmoid(),
              pt.Tanh: lambda m: torch.nn.Tanh(),
              pt.Maxout: lambda m: (lambda x: TORCH_EQUIVALENTS["maxout"](x, m.pieces)),
              pt.RReLU: lambda m: torch.nn.LeakyReLU(2.0 / (m.lower + m.upper)),  # evaluation
              pt.Dropout: lambda m: torch.nn.Identity()}                         # evaluation
    return simple[type(module)](module)


LAYERS = [
    lambda: pt.Conv3x3(3, 4), lambda: pt.Conv3x3(3, 4, bias=False, algo="direct"),
    lambda: pt.Conv3x3Act(3, 4, "relu"), lambda: pt.Conv3x3Act(3, 4, "leaky_relu", slope=0.1),
    lambda: pt.Conv3x3Act(3, 4, "prelu"), lambda: pt.Conv3x3Act(3, 4, "elu", alpha=0.5),
    pt.MaxPool2, pt.AvgPool2, pt.ReLU, lambda: pt.LeakyReLU(0.2), lambda: pt.PReLU(3), lambda: pt.ELU(0.7),
    pt.Sigmoid, pt.Tanh, lambda: pt.Maxout(3), lambda: pt.RReLU(3, 8).eval(), lambda: pt.Dropout(0.5).eval(),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make", LAYERS)
def test_layer_forward_and_backward_match_pure_torch(make, dtype):
    pycnn.manual_seed(0)
    layer = make().to(dtype)
    twin = _pure_torch_twin(layer)
    if isinstance(twin, torch.nn.Module):
        twin = twin.to(dtype)
    x = torch.randn(2, 3, 7, 6, dtype=dtype, generator=torch.Generator().manual_seed(2), requires_grad=True)
    xt = x.detach().clone().requires_grad_()
    y, yt = layer(x), twin(xt)
    _assert_close(y, yt, dtype)
    upstream = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    y.backward(upstream)
    yt.backward(upstream)
    _assert_close(x.grad, xt.grad, dtype)
    ours = dict(layer.named_parameters())
    theirs = dict(twin.named_parameters()) if isinstance(twin, torch.nn.Module) else {}
    if isinstance(layer, pt.Conv3x3Act):  # twin is Sequential(conv, act)
        theirs = {"weight": twin[0].weight, "bias": twin[0].bias, "prelu_weight": twin[1].weight
                  if layer.activation == "prelu" else None}
    for name, p in ours.items():
        _assert_close(p.grad, theirs[name].grad, dtype)


def test_conv_initialises_like_torch_or_like_pycnn_nn():
    """By default torch.nn.Conv2d's reset_parameters (torch's generator, default dtype); with
    init_scheme='he' pycnn.nn.Conv3x3's He initialisation from pycnn's generator."""
    torch.manual_seed(3)
    ours = pt.Conv3x3(5, 7)
    torch.manual_seed(3)
    twin = torch.nn.Conv2d(5, 7, 3, padding=1)
    torch.testing.assert_close(ours.weight, twin.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, twin.bias, rtol=0, atol=0)
    assert isinstance(ours, torch.nn.Conv2d)
    pycnn.manual_seed(3)
    he = pt.Conv3x3(5, 7, init_scheme="he")
    pycnn.manual_seed(3)
    theirs = pnn.Conv3x3(5, 7)
    np.testing.assert_array_equal(he.weight.detach().numpy(), theirs.weight.data)
    np.testing.assert_array_equal(he.bias.detach().numpy(), theirs.bias.data)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]  # as torch.nn.Conv2d
    assert ours.weight.dtype == torch.float32 and pt.Conv3x3(1, 1, dtype=torch.float64).weight.dtype == torch.float64
    big = pt.Conv3x3(64, 64, init_scheme="he", rng=np.random.default_rng(0))
    assert abs(float(big.weight.detach().std()) / np.sqrt(2 / (64 * 9)) - 1) < 0.02  # He: std sqrt(2 / fan_in)
    np.testing.assert_array_equal(pt.PReLU(4).weight.detach().numpy(), np.full(4, 0.25, np.float32))
    assert pt.Conv3x3Act(2, 3, "relu").prelu_weight is None
    with pytest.raises(ValueError, match="activation"):
        pt.Conv3x3Act(2, 3, "tanh")
    with pytest.raises(TypeError, match="dtype"):
        pt.Conv3x3(2, 3, dtype=torch.float16)


@pytest.mark.parametrize("layer_type", [pt.RReLU, pt.Dropout])
def test_random_layers_follow_training_mode_and_draw_a_seed_per_call(layer_type):
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    layer = layer_type()
    pycnn.manual_seed(7)
    first, second = layer(x), layer(x)
    assert not torch.equal(first, second)                 # a new draw per call
    pycnn.manual_seed(7)
    torch.testing.assert_close(layer(x), first, rtol=0, atol=0)  # pycnn.manual_seed reproduces it
    pycnn.manual_seed(7)
    seed = pycnn.random.next_seed()
    u = torch.as_tensor(_util.uniform(seed, x.numel(), np.dtype(np.float64))).reshape(x.shape)
    if layer_type is pt.RReLU:
        expected = torch.where(x > 0, x, x / (3.0 + 5.0 * u))
    else:
        expected = x * (u >= 0.5) / 0.5
    torch.testing.assert_close(first, expected)
    layer.eval()
    evaluated = layer(x)
    torch.testing.assert_close(evaluated, x if layer_type is pt.Dropout else F.leaky_relu(x, 2 / 11))


# ------------------------------------------------------------- a small net, a few SGD steps

def _small_net(variant: str, dtype):
    """conv-BN-act-pool twice, flatten, linear; pycnn's conv/pool/activation or torch's."""
    torch.manual_seed(0)
    layers = []
    for c_in, c_out in ((3, 8), (8, 16)):
        if variant == "pycnn":
            layers += [pt.Conv3x3(c_in, c_out, dtype=dtype), torch.nn.BatchNorm2d(c_out, dtype=dtype), pt.ReLU(),
                       pt.MaxPool2()]
        else:
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1, dtype=dtype),
                       torch.nn.BatchNorm2d(c_out, dtype=dtype), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
    layers += [torch.nn.Flatten(), torch.nn.Linear(16 * 2 * 2, 10, dtype=dtype)]
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sgd_steps_match_pure_torch(dtype):
    ours, theirs = _small_net("pycnn", dtype), _small_net("torch", dtype)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # interchangeable weights
    theirs.load_state_dict(ours.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ours, theirs)]
    gen = torch.Generator().manual_seed(5)
    for _ in range(4):
        x = torch.randn(8, 3, 8, 8, dtype=dtype, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        losses = []
        for model, opt in zip((ours, theirs), opts):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert abs(losses[0] - losses[1]) <= tol * abs(losses[1])
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9 if dtype == torch.float64 else 1e-4, atol=1e-12 if
                                   dtype == torch.float64 else 1e-5, msg=name)


# --------------------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not SIMULATED, reason="needs NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator)")
def test_cuda_backend_from_torch_tensors_in_the_simulator():
    """The cuda kernels (Numba, simulated on host memory) run from torch CPU tensors with the
    backend forced; same results as the CPU path.  The CUDA-tensor conversions are not
    exercised here (they need a GPU)."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with pycnn.use_backend("cuda"), pycnn.profile() as prof:
        out = pt.max_pool2x2(pt.relu(pt.conv3x3(x, w)))
        out.sum().backward()
    ref = pt.max_pool2x2(pt.relu(pt.conv3x3(x2, w2)))
    ref.sum().backward()
    assert {backend for (_, backend, _, _) in prof.calls} == {"cuda"}
    _assert_close(out, ref)
    _assert_close(x.grad, x2.grad)
    _assert_close(w.grad, w2.grad)


def _cuda_ready() -> bool:
    if SIMULATED or not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a real GPU with torch CUDA and CuPy")
def test_cuda_tensors_on_torchs_stream(monkeypatch):
    import cupy
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: pt.relu(pt.conv3x3(x, w)), (x, w))
    assert torch.autograd.gradcheck(pt.max_pool2x2, (x,))
    op = registry.get("relu")
    backend, algo, impl = op.resolve((cupy.zeros(1),), {})
    streams = []

    def forward(ctx, x):
        assert isinstance(x, cupy.ndarray)
        streams.append(cupy.cuda.get_current_stream().ptr)
        return impl.forward(ctx, x)

    def backward(ctx, grad):
        streams.append(cupy.cuda.get_current_stream().ptr)
        return impl.backward(ctx, grad)

    monkeypatch.setitem(op.impls, (backend, algo), registry.Impl(forward, backward))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        with pycnn.profile() as prof:
            y = pt.max_pool2x2(pt.relu(pt.conv3x3(x, w)))
        y.sum().backward()
    stream.synchronize()
    assert streams == [stream.cuda_stream] * 2  # forward and backward ran on torch's stream
    assert {backend for (_, backend, _, _) in prof.calls} == {"cuda"}
    assert y.device.type == "cuda"
    xt, wt = x.detach().requires_grad_(), w.detach().requires_grad_()
    _assert_close(y, F.max_pool2d(F.relu(F.conv2d(xt, wt, padding=1)), 2))
    layer = pt.Conv3x3(3, 4, device=dev)
    assert layer.weight.device.type == "cuda" and layer(x.float().detach()).device.type == "cuda"


def test_settings_passed_by_position_get_no_gradient():
    """fancy_pca's eigenvectors, eigenvalues and alphas passed by position ran forward and
    then failed in backward ("1 gradients for 4 inputs"); now they are settings, and asking
    for their gradient says in one line what to do."""
    images = torch.rand(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    settings = [torch.eye(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                torch.full((2, 3), 0.1, dtype=torch.float64)]
    pt.apply_op("fancy_pca", images, *settings).sum().backward()
    np.testing.assert_array_equal(images.grad.numpy(), np.ones((2, 3, 4, 4)))
    settings[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="only its first 1 inputs are differentiable"):
        pt.apply_op("fancy_pca", images, *settings).sum().backward()
