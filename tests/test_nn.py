"""Layers, initialisation, the optimizer and the training loop."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import initializers as init
from pycnn import nn, optim
from pycnn.autograd import Tensor


def small_net(rng=None):
    rng = rng or np.random.default_rng(0)
    return nn.Sequential(nn.Conv3x3(3, 4, rng=rng), nn.BatchNorm(4), nn.PReLU(4), nn.MaxPool2(),
                         nn.Conv3x3(4, 6, rng=rng), nn.Maxout(2), nn.AvgPool2(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(3 * 2 * 2, 5, rng=rng))


def test_parameters_names_and_count():
    net = small_net()
    names = [name for name, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "4.weight", "4.bias",
                     "9.weight", "9.bias"]
    assert net.num_parameters() == 4 * 27 + 4 + 4 + 4 + 4 + 6 * 36 + 6 + 5 * 12 + 5
    assert "parameters" in repr(net) and "Conv3x3(3, 4, bias=True)" in repr(net)


def test_train_and_eval_modes_reach_every_layer():
    net = small_net()
    net.eval()
    assert all(not m.training for _, m in net.named_modules())
    net.train()
    assert all(m.training for _, m in net.named_modules())


def test_state_dict_round_trip_and_buffers():
    net, other = small_net(np.random.default_rng(1)), small_net(np.random.default_rng(2))
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32))
    net(x)  # updates the running statistics
    state = net.state_dict()
    assert "1.running_mean" in state and not np.allclose(state["1.running_mean"], 0)
    other.load_state_dict(state)
    net.eval(), other.eval()
    np.testing.assert_array_equal(net(x).data, other(x).data)


def test_load_state_dict_rejects_mismatches():
    net = small_net()
    state = net.state_dict()
    state.pop("0.bias")
    with pytest.raises(KeyError, match="missing \\['0.bias'\\]"):
        net.load_state_dict(state)
    state = net.state_dict()
    state["0.weight"] = np.zeros((4, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="0.weight"):
        net.load_state_dict(state)


def test_eval_mode_is_deterministic_and_train_mode_draws_new_masks():
    pycnn.manual_seed(0)
    net = nn.Sequential(nn.Dropout(0.5), nn.RReLU())
    x = Tensor(-np.ones((4, 50), np.float32))
    a, b = net(x).data, net(x).data
    assert not np.array_equal(a, b)
    net.eval()
    np.testing.assert_array_equal(net(x).data, net(x).data)
    np.testing.assert_allclose(net(x).data, -2 / 11 * np.ones((4, 50)), rtol=1e-6)


def test_manual_seed_reproduces_a_run():
    def run():
        pycnn.manual_seed(7)
        net = nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.3), nn.RReLU(), nn.Linear(4, 2))
        x = Tensor(np.linspace(-1, 1, 18, dtype=np.float32).reshape(3, 6))
        return net(x).data
    np.testing.assert_array_equal(run(), run())


@pytest.mark.parametrize("scheme,expected_variance", [
    ("xavier", 1 / 576), ("glorot", 2 / (576 + 576)), ("he", 2 / 576), ("small", 1e-4),
    ("he_uniform", 2 / 576), ("xavier_uniform", 1 / 576), ("glorot_uniform", 2 / (576 + 576))])
def test_initialisation_variances(scheme, expected_variance):
    w = init.initialise(scheme, (64, 64, 3, 3), rng=np.random.default_rng(0))
    assert w.dtype == np.float32
    assert abs(w.var() / expected_variance - 1) < 0.03
    assert abs(w.mean()) < 4 * np.sqrt(expected_variance / w.size)


def test_initialisation_errors_and_zeros():
    assert not init.initialise("zeros", (3, 2)).any()
    with pytest.raises(ValueError, match="init scheme must be one of"):
        init.initialise("lecun", (3, 2))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.initialise("he", (3,))


# ------------------------------------- found by an independent sweep (fifth session)

def test_a_layer_used_twice_is_one_set_of_parameters_updated_once():
    """Sequential(lin, lin) listed the weight twice: SGD applied its gradient twice a step."""
    lin = nn.Linear(3, 3, bias=False)
    lin.weight.data[...] = np.eye(3, dtype=np.float32)
    model = nn.Sequential(lin, lin)
    assert len(model.parameters()) == 1 and model.num_parameters() == 9
    assert [name for name, _ in model.named_parameters()] == ["0.weight"]
    loss = model(Tensor(np.ones((1, 3), np.float32))).sum()
    loss.backward()
    optim.SGD(model.parameters(), lr=0.1).step()
    # d/dW sum(W W x) at W = I, x = 1: 2 for every entry (torch: one update of 0.1 * 2)
    np.testing.assert_allclose(lin.weight.data, np.eye(3) - 0.2, rtol=1e-6)
    with pytest.raises(ValueError, match="list each once"):
        optim.SGD([lin.weight, lin.weight], lr=0.1)
    with pytest.raises(ValueError, match="group 1 position 0 is the parameter already at group 0"):
        optim.SGD([{"params": [lin.weight]}, {"params": [lin.weight]}], lr=0.1)


def test_assigning_to_a_buffer_or_parameter_keeps_it_registered():
    bn = nn.BatchNorm(3)
    bn.running_mean = np.full(3, 2.0, np.float32)  # was dropped from state_dict (and checkpoints)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert bn.state_dict()["running_mean"].tolist() == [2.0, 2.0, 2.0]
    lin = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="weight is a parameter of Linear"):
        lin.weight = Tensor(np.zeros((2, 2), np.float32), requires_grad=True)
    lin.weight = nn.Parameter(np.zeros((2, 2), np.float32))
    assert [name for name, _ in lin.named_parameters()] == ["weight", "bias"]


def test_load_state_dict_checks_everything_before_writing():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    before = model.state_dict()
    state = {name: np.ones_like(value) for name, value in before.items()}
    state["1.weight"] = np.ones((2, 2), np.float32)  # the last key is wrong
    with pytest.raises(ValueError, match="1.weight"):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])  # nothing was overwritten
    state["1.weight"] = np.ones((1, 3), np.complex64)
    with pytest.raises(TypeError, match="real numbers"):
        model.load_state_dict(state)


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_batch_norm_without_scale_and_shift_is_torch_affine_false(backend):
    torch = pytest.importorskip("torch")
    import pycnn.torch as pt
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 5, 5))
    with pycnn.use_backend(backend):
        y = F.batch_norm(pycnn.Tensor(x), None, None)
        y_act = F.batch_norm_act(pycnn.Tensor(x), None, None, activation="relu")
    expected = torch.nn.functional.batch_norm(torch.from_numpy(x), None, None, training=True).numpy()
    np.testing.assert_allclose(y.data, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y_act.data, np.maximum(expected, 0), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="gamma and beta must be arrays"):
        pt.apply_op("batchnorm", torch.from_numpy(x), None, None)
