"""pycnn.torch.accelerate and the torch-native layers: accelerated models equal torch's in
float64 (logits, every gradient, running statistics), keep their Parameters, state_dict keys,
hooks and modes; torch.compile(fullgraph=True), export, fx and jit see the ops; channels_last,
autocast, empty batches, meta tensors and DDP work; the layers take torch's constructor
signatures and refuse the rest in one line.  torchvision's models where it is installed
(tests/_accelerate_helpers.py), a hand-made model everywhere."""
from __future__ import annotations

import copy
import gc
import io
import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pycnn  # noqa: E402
import pycnn.torch as pt  # noqa: E402
from pycnn._torch import library  # noqa: E402
from pycnn.ops import registry  # noqa: E402
from tests._accelerate_helpers import ddp_batch, ddp_net, ddp_worker, small_net, torchvision_models  # noqa: E402

nn, F = torch.nn, torch.nn.functional
F64 = dict(rtol=1e-12, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_kernel_thread")


def hand_made_model(dtype=torch.float64):
    """Every kind of module accelerate swaps, fuses or leaves: (N, 3, 8, 8) -> (N, 5)."""
    torch.manual_seed(0)
    kw = dict(dtype=dtype)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, **kw), nn.BatchNorm2d(6, **kw), nn.ReLU(inplace=True),            # fused
        nn.Conv2d(6, 6, 3, padding="same", bias=False, **kw), nn.BatchNorm2d(6, affine=False, **kw),
        nn.PReLU(6, **kw),                                                                               # fused
        nn.Conv2d(6, 6, 3, padding=1, **kw), nn.BatchNorm2d(6, momentum=None, **kw), nn.LeakyReLU(0.2),  # fused
        nn.Conv2d(6, 6, 3, padding=1, **kw), nn.BatchNorm2d(6, track_running_stats=False, **kw),
        nn.ELU(0.7), nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, **kw),                                                   # left
        nn.PReLU(**kw), nn.Sigmoid(), nn.Conv2d(6, 6, 3, padding=1, **kw), nn.SiLU(), nn.Tanh(),
        nn.RReLU(),                                                                                      # left
        nn.Conv2d(6, 4, 1, **kw), nn.AvgPool2d(2, 2), nn.Flatten(), nn.Linear(4, 5, **kw))


def _inputs(shape, dtype=torch.float64, seed=1):
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, rel=1e-12, msg=""):
    """Equal to ``rel`` of ``expected``'s largest element (elementwise tolerances fail on
    gradients that cancel to rounding noise), or to ``rel / 10`` absolutely (a gradient that is
    zero in exact arithmetic, such as a conv bias's before a batch norm, is rounding noise)."""
    actual, expected = actual.detach(), expected.detach()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= rel * max(scale, 0.1), f"{msg}: error {error:.3g} over {rel:g} of {scale:.3g}"


def assert_same_model(ours, theirs, x, rel=1e-12):
    """Logits, every gradient and every buffer of ``ours`` equal ``theirs``' (a torch twin)."""
    y_ours, y_theirs = ours(x), theirs(x)
    assert_close(y_ours, y_theirs, rel, "logits")
    upstream = _inputs(y_theirs.shape, y_theirs.dtype, seed=7)
    y_ours.backward(upstream)
    y_theirs.backward(upstream)
    module = getattr(ours, "_orig_mod", ours)  # (a compiled model: its module's)
    theirs_params = dict(theirs.named_parameters())
    for name, p in module.named_parameters():
        assert_close(p.grad, theirs_params[name].grad, rel, name)
    theirs_buffers = dict(theirs.named_buffers())
    for name, b in module.named_buffers():
        assert_close(b.double(), theirs_buffers[name].double(), rel, name)


# ---------------------------------------------------------- a hand-made model (no torchvision)

def test_report_says_what_was_swapped_and_what_was_left():
    model, report = pt.accelerate(hand_made_model())
    actions = {r.path: (r.action, r.detail) for r in report.rows}
    assert actions["0"][0] == "swapped" and actions["1"][0] == "fused" and actions["2"][0] == "fused"
    assert actions["13"] == ("left", "Conv2d(stride=(2, 2)): stride != 1")
    assert actions["19"][0] == "left" and "U(lower, upper)" in actions["19"][1]
    assert actions["20"] == ("left", "Conv2d(kernel_size=(1, 1)): kernel_size != 3")
    assert actions["23"] == ("left", "no pycnn op for it")
    assert isinstance(model[0], pt.Conv3x3) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[7], pt.BatchNormAct2d) and model[7].activation == "leaky_relu"
    assert isinstance(model[12], pt.MaxPool2d) and isinstance(model[21], pt.AvgPool2d)
    assert isinstance(model[16], pt.Conv3x3Act) and model[16].activation == "swish"  # conv + SiLU
    assert actions["17"] == ("fused", "FusedActivation (applied by 16)")
    text = str(report)
    assert "stride != 1" in text and text.splitlines()[0].split() == ["module", "torch", "class", "action", "detail"]
    assert "precision 'default'" in text


def test_convolutions_and_their_activations_fuse():
    kw = dict(padding=1, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = nn.Sequential(nn.Conv2d(3, 4, 3, **kw), nn.PReLU(4, dtype=torch.float64), nn.Conv2d(4, 4, 3, **kw),
                           nn.ELU(0.5), nn.Conv2d(4, 4, 3, bias=False, **kw), nn.PReLU(dtype=torch.float64),
                           nn.Conv2d(4, 4, 3, **kw), nn.LeakyReLU(-0.3), nn.Conv2d(4, 4, 3, **kw), nn.SiLU(),
                           nn.Conv2d(4, 4, 3, **kw), nn.ReLU())
    ours, report = pt.accelerate(copy.deepcopy(theirs), precision="high")
    assert [r.action for r in report.rows] == ["fused"] * 12 and list(ours.state_dict()) == list(theirs.state_dict())
    assert all(type(m) is pt.Conv3x3Act and m.algo == "direct" for m in ours[::2])
    assert ours[0]._prelu is ours[1] and ours[1].weight is not None
    assert_same_model(ours, theirs, _inputs((2, 3, 6, 5)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hand_made_model_equals_torch_in_float64(mode):
    theirs = hand_made_model()
    theirs[19] = nn.LeakyReLU((1 / 8 + 1 / 3) / 2)  # RReLU is random in training: its evaluation slope
    getattr(theirs, mode)()
    if mode == "eval":  # running statistics that are not the initial ones
        theirs.train()(_inputs((4, 3, 8, 8), seed=3))
        theirs.eval()
    ours, _ = pt.accelerate(copy.deepcopy(theirs))
    assert all(m.training == (mode == "train") for m in ours.modules())
    assert_same_model(ours, theirs, _inputs((4, 3, 8, 8)))


def test_parameters_state_dict_and_optimizer_are_kept():
    model = hand_made_model()
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, _ = pt.accelerate(model)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert list(model.state_dict()) == keys
    before = [p.detach().clone() for p in params]
    model(_inputs((2, 3, 8, 8))).sum().backward()
    opt.step()
    for b, p in zip(before, params):  # the optimizer made before accelerate stepped the same Parameters
        torch.testing.assert_close(p.detach(), b - 0.1 * p.grad, **F64)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    twin = hand_made_model()
    twin.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))  # a plain torch model takes it
    model.load_state_dict(twin.state_dict())
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_accelerated_models_pickle_copy_and_convert():
    """torch.save of the whole model, deepcopy and .to(dtype): the fused PReLU's weight stays
    one Parameter, read by the batch norm before it."""
    theirs = hand_made_model(torch.float32)
    theirs[19] = nn.Identity()
    ours, _ = pt.accelerate(copy.deepcopy(theirs))
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    copied = copy.deepcopy(ours)
    for model in (loaded, copied):
        assert model[4]._prelu is model[5] and model[5].weight is not ours[5].weight
        assert_same_model(model.double(), copy.deepcopy(theirs).double(), _inputs((4, 3, 8, 8)))
    bn = pt.BatchNormAct2d(3, "leaky_relu", slope=0.2, momentum=0.5)
    x = _inputs((2, 3, 4, 4), torch.float32)
    torch.testing.assert_close(bn(x), F.leaky_relu(F.batch_norm(x, None, None, training=True), 0.2))
    assert bn.momentum == 0.5


def test_inplace_false_leaves_the_model_alone():
    model = small_net()
    copied, report = pt.accelerate(model, inplace=False)
    assert type(model[0]) is nn.Conv2d and isinstance(copied[0], pt.Conv3x3)
    assert len(report.swapped) == 8 and report.precision == "default"
    again, report = pt.accelerate(copied)
    assert again is copied and not report.swapped  # already pycnn's: nothing to do


def test_modules_used_in_several_places():
    """A batch norm used twice is not fused with what follows one of its uses; an activation
    used twice is the same pycnn module in both places."""
    bn, relu = nn.BatchNorm2d(3, dtype=torch.float64), nn.ReLU()
    theirs = nn.Sequential(bn, relu, nn.Conv2d(3, 3, 3, padding=1, dtype=torch.float64), bn, nn.Tanh(), relu)
    ours, report = pt.accelerate(copy.deepcopy(theirs))
    assert type(ours[0]) is pt.BatchNorm2d and ours[3] is ours[0]
    assert isinstance(ours[1], pt.ReLU) and ours[5] is ours[1]
    assert [r.path for r in report.rows] == ["0", "1", "2", "4"]  # each module once
    assert_same_model(ours, theirs, _inputs((2, 3, 4, 4)))


def test_hooks_go_with_the_modules():
    model = small_net(torch.float64)
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append("conv pre"))
    model[0].register_forward_hook(lambda m, args, out: seen.append("conv"))
    model[3].register_forward_hook(lambda m, args, out: seen.append(("pool", tuple(out.shape))))
    model[6].register_full_backward_hook(lambda m, gin, gout: seen.append("leaky backward"))
    handle = model[2].register_forward_hook(lambda m, args, out: seen.append("relu"))
    model, report = pt.accelerate(model)
    assert isinstance(model[2], pt.ReLU)  # hooked: not fused into the batch norm before it
    assert isinstance(model[6], pt.LeakyReLU) and isinstance(model[7], pt.AvgPool2d)
    model(_inputs((2, 3, 8, 8))).sum().backward()
    assert seen == ["conv pre", "conv", "relu", ("pool", (2, 8, 4, 4)), "leaky backward"]
    handle.remove()
    seen.clear()
    model(_inputs((2, 3, 8, 8)))
    assert "relu" not in seen


def test_contexts_for_backward_live_as_long_as_the_graph():
    """Each op keeps its context for backward in the memory of its handle: freed with the
    graph, never kept under no_grad."""
    model = _accelerated_small_net()
    x = _inputs((2, 3, 8, 8), torch.float32)
    gc.collect()
    before = len(library._kept)
    y = model(x)
    assert len(library._kept) == before + 6  # conv, batch norm + ReLU, max pool, conv, batch norm + leaky, avg pool
    y.sum().backward()
    del y
    gc.collect()
    assert len(library._kept) == before
    with torch.no_grad():
        y = model(x)
    assert len(library._kept) == before and y.shape == (2, 10)


def test_precision_high_runs_the_direct_convolution():
    model, report = pt.accelerate(small_net(), precision="high")
    assert model[0].algo == "direct" and "precision 'high'" in str(report)
    with pycnn.profile() as prof:
        model(_inputs((2, 3, 8, 8), torch.float32))
    assert {algo for (op, _, algo, _) in prof.calls if op == "conv3x3"} == {"direct"}
    with pytest.raises(ValueError, match="precision"):
        pt.accelerate(small_net(), precision="highest")


# ------------------------------------------------------------------ torchvision's models

def _torchvision_model(name):
    models = torchvision_models()
    if models is None:
        pytest.skip("torchvision is not installed")
    torch.manual_seed(0)
    model = getattr(models, name)(num_classes=10)
    if name.startswith("vgg"):  # its 4096-wide classifier (120M weights in float64) tests nothing here
        model.avgpool, model.classifier = nn.AdaptiveAvgPool2d(1), nn.Linear(512, 10)
    return model.double()


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "densenet121"])
def test_torchvision_models_equal_torch_in_float64(name):
    theirs = _torchvision_model(name)
    ours, report = pt.accelerate(copy.deepcopy(theirs))
    assert report.swapped and list(ours.state_dict()) == list(theirs.state_dict())
    x = _inputs((4, 3, 64, 64))  # resnet18's last maps are 2x2: batch norm over 2x2x4 values is well-conditioned
    assert_same_model(ours, theirs, x)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(x), theirs(x))


# -------------------------------------------------------------- torch's compilers and tracers

def _accelerated_small_net():
    model, _ = pt.accelerate(small_net())
    return model


def test_compile_fullgraph_forward_and_backward():
    model = _accelerated_small_net()
    compiled = torch.compile(model, fullgraph=True)
    x = _inputs((4, 3, 8, 8), torch.float32)
    twin = copy.deepcopy(model)
    assert_same_model(compiled, twin, x, rel=1e-5)


def test_export_fx_and_jit_trace():
    model = _accelerated_small_net().eval()
    x = _inputs((2, 3, 8, 8), torch.float32)
    expected = model(x)
    exported = torch.export.export(model, (x,))
    assert "pycnn.conv3x3" in str(exported.graph_module.code) or "pycnn::conv3x3" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), expected)
    traced = torch.fx.symbolic_trace(model)
    assert any("pycnn" in str(node.target) for node in traced.graph.nodes)
    torch.testing.assert_close(traced(x), expected)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, (x,)), buffer)
    loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.parametrize("name", sorted(library.SPECS))
def test_operators_pass_torchs_opcheck(name):
    """Schema, fake kernel and autograd registration of every operator, on the registry's first
    sample (opcheck's aot_dispatch test compares every output of two calls, and the handle is a
    new number at each: torch.compile is tested end to end above instead)."""
    spec = library.SPECS[name]
    sample = registry.get(name).samples(np.random.default_rng(0), np.float64)[0]
    tensors = [None if a is None else torch.tensor(a, requires_grad=bool(d))
               for a, d in zip(sample.inputs, sample.differentiable)]
    tensors += [None] * (len(spec.tensors) - len(tensors))
    mutated = [None if sample.params.get(n) is None else torch.tensor(sample.params[n]) for n in spec.mutated]
    settings = [sample.params.get(n, default) for n, _, default in spec.settings]
    torch.library.opcheck(getattr(torch.ops.pycnn, name), (*tensors, *mutated, *settings),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_double_backward_is_refused():
    """A gradient made with create_graph=True would silently be a constant: refused."""
    x = _inputs((2, 3, 4, 4)).requires_grad_()
    with pytest.raises(RuntimeError, match="relu has no double backward"):
        torch.autograd.grad(pt.relu(x * 1.0).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(pt.relu(x * 1.0).sum(), x)
    torch.testing.assert_close(g, (x > 0).to(x.dtype))


def test_meta_device_forward():
    model = _accelerated_small_net().to("meta")
    y = model(torch.empty(4, 3, 8, 8, device="meta"))
    assert y.device.type == "meta" and y.shape == (4, 10)


# ------------------------------------------------------- layouts, dtypes and empty batches

def test_channels_last_in_channels_last_out_without_weight_copies():
    model = _accelerated_small_net().to(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous() and model[4].weight.is_contiguous()  # as pycnn's kernels read them
    x = _inputs((2, 3, 8, 8), torch.float32).to(memory_format=torch.channels_last)
    h = model[:4](x)
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    plain = copy.deepcopy(model)
    assert_same_model(model, plain, x.contiguous(), rel=1e-5)
    torch.testing.assert_close(model(x), plain(x.contiguous()))


def test_bfloat16_autocast_computes_in_float32():
    """torch's convolutions under autocast hand bfloat16 tensors to pycnn's layers after them
    (the hand-made model's stride-2 and 1x1 convs): computed in float32, cast back."""
    model, _ = pt.accelerate(hand_made_model(torch.float32).eval())
    x = _inputs((2, 3, 8, 8), torch.float32, seed=4)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model[:14](x)
        y = model(x)
    assert h.dtype == torch.bfloat16 and model[14](h).dtype == torch.bfloat16  # PReLU's weight is float32
    assert_close(y.float(), expected, rel=0.05)
    y.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_empty_batches():
    model = _accelerated_small_net()
    x = torch.empty(0, 3, 8, 8, requires_grad=True)
    y = model(x)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape and model[0].weight.grad.abs().sum() == 0
    with torch.no_grad():
        assert model.eval()(torch.empty(0, 3, 8, 8)).shape == (0, 10)


# ----------------------------------------------------------------- DistributedDataParallel

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_give_the_gradient_of_the_combined_batch(tmp_path):
    import torch.multiprocessing as mp
    result = tmp_path / "grads.pt"
    mp.spawn(ddp_worker, args=(2, _free_port(), str(result)), nprocs=2, join=True)
    distributed = torch.load(result)
    model, _ = pt.accelerate(ddp_net())
    x, y = ddp_batch()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert_close(distributed[name], p.grad, msg=name)


# ------------------------------------------------------------------ constructor signatures

def test_layers_take_torchs_constructor_signatures():
    conv = pt.Conv3x3(3, 8, kernel_size=3, stride=1, padding=1, dilation=1, groups=1, bias=False,
                      padding_mode="zeros", device="cpu", dtype=torch.float64)
    assert conv.weight.dtype == torch.float64 and conv.bias is None
    assert pt.Conv3x3(3, 8, 3, padding="same").padding == "same"
    assert pt.Conv3x3(3, 8, (3, 3), (1, 1), (1, 1)).kernel_size == (3, 3)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.float64)
        try:
            assert pt.Conv3x3(2, 2).weight.dtype == torch.float64 and pt.PReLU().weight.dtype == torch.float64
        finally:
            torch.set_default_dtype(torch.float32)
    assert pt.ReLU(inplace=True).inplace and pt.ReLU(True).inplace
    leaky = pt.LeakyReLU(negative_slope=0.2, inplace=True)
    assert leaky.slope == 0.2 and leaky.inplace
    prelu = pt.PReLU(num_parameters=1, init=0.1)
    assert prelu.weight.shape == (1,) and float(prelu.weight.detach()) == pytest.approx(0.1)
    assert pt.ELU(alpha=0.5, inplace=False).alpha == 0.5 and pt.SiLU(inplace=True).inplace
    for pool in (pt.MaxPool2d(2), pt.MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False),
                 pt.MaxPool2(2, None), pt.AvgPool2d(2, 2, 0, False, False), pt.AvgPool2d([2, 2])):
        assert pool(torch.randn(1, 1, 4, 4)).shape == (1, 1, 2, 2)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(pt.PReLU()(x), F.prelu(x, torch.tensor([0.25])))  # one slope for every channel


@pytest.mark.parametrize("make, argument", [
    (lambda: pt.Conv3x3(3, 8, kernel_size=5), "kernel_size=5"),
    (lambda: pt.Conv3x3(3, 8, stride=2), "stride=2"),
    (lambda: pt.Conv3x3(3, 8, padding=0), "padding=0"),
    (lambda: pt.Conv3x3(3, 8, dilation=2), "dilation=2"),
    (lambda: pt.Conv3x3(4, 8, groups=2), "groups=2"),
    (lambda: pt.Conv3x3(3, 8, padding_mode="reflect"), "padding_mode='reflect'"),
    (lambda: pt.MaxPool2d(3), "kernel_size=3"),
    (lambda: pt.MaxPool2d(2, stride=1), "stride=1"),
    (lambda: pt.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
    (lambda: pt.MaxPool2d(2, return_indices=True), "return_indices=True"),
    (lambda: pt.AvgPool2d(2, padding=1), "padding=1"),
    (lambda: pt.AvgPool2d(2, divisor_override=3), "divisor_override=3"),
])
def test_other_values_are_refused_in_one_line(make, argument):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert argument in message and "\n" not in message


def test_batch_norm_layer_is_torchs():
    ours, theirs = pt.BatchNorm2d(4, momentum=None, dtype=torch.float64), nn.BatchNorm2d(4, momentum=None,
                                                                                          dtype=torch.float64)
    assert isinstance(ours, nn.BatchNorm2d) and list(ours.state_dict()) == list(theirs.state_dict())
    for seed in range(3):  # the cumulative average of momentum=None
        assert_same_model(ours, theirs, _inputs((3, 4, 2, 2), seed=seed))
    assert int(ours.num_batches_tracked) == 3
