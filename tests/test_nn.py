"""Layers, initialisation, the optimiser and the training loop."""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
from pycnn import initializers as init, nn, optim
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
