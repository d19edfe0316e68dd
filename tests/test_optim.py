"""Optimizers, regularisers and learning-rate schedules."""
from __future__ import annotations

import numpy as np
import pytest

from pycnn import nn, optim, schedules


def _run(opt_factory, torch_factory, steps=5):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((3, 4))
    grads = [rng.standard_normal((3, 4)) for _ in range(steps)]
    p = nn.Parameter(w0.copy())
    opt = opt_factory([p])
    t = torch.tensor(w0.copy(), requires_grad=True)
    topt = torch_factory(torch.optim, [t])
    for g in grads:
        p.grad = g.copy()
        opt.step()
        t.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sgd_nesterov_with_weight_decay_matches_pytorch():
    _run(lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
         lambda torch_optim, ps: torch_optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01))


def test_sgd_classical_momentum_matches_pytorch():
    _run(lambda ps: optim.SGD(ps, lr=0.05, momentum=0.5),
         lambda torch_optim, ps: torch_optim.SGD(ps, lr=0.05, momentum=0.5))


def test_adam_matches_pytorch():
    _run(lambda ps: optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
         lambda torch_optim, ps: torch_optim.Adam(ps, lr=0.01, betas=(0.8, 0.99), weight_decay=0.1))


def test_l1_and_elastic_net_add_sign_and_weight():
    w = np.array([[1.0, -2.0, 0.0]])
    p = nn.Parameter(w.copy())
    p.grad = np.zeros_like(w)
    optim.SGD([p], lr=0.1, l1=0.5, weight_decay=0.2).step()
    np.testing.assert_allclose(p.data, w - 0.1 * (0.5 * np.sign(w) + 0.2 * w))


def test_max_norm_projects_each_filter_onto_the_ball():
    w = np.zeros((3, 2, 3, 3))
    w[0] = 1.0  # norm sqrt(18) > 3: projected
    w[1] = 0.1  # norm 0.42: untouched
    p = nn.Parameter(w.copy())
    p.grad = np.zeros_like(w)
    optim.SGD([p], lr=0.1, max_norm=3.0).step()
    norms = np.sqrt((p.data.reshape(3, -1) ** 2).sum(axis=1))
    np.testing.assert_allclose(norms, [3.0, np.sqrt(18) * 0.1, 0.0], rtol=1e-12)


def test_param_groups_exclude_biases_and_batch_norm():
    model = nn.Sequential(nn.Conv3x3(1, 2), nn.BatchNorm(2), nn.Flatten(), nn.Linear(2, 3))
    groups = optim.param_groups(model, weight_decay=5e-4, max_norm=4.0)
    assert [p.shape for p in groups[0]["params"]] == [(2, 1, 3, 3), (3, 2)]
    assert len(groups[1]["params"]) == 4 and groups[1]["weight_decay"] == 0 and groups[1]["max_norm"] is None


def test_per_group_learning_rates_and_bad_values():
    a, b = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2))
    opt = optim.SGD([{"params": [a], "lr": 0.01}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = np.ones(2), np.ones(2)
    opt.step()
    np.testing.assert_allclose(a.data, 0.99)
    np.testing.assert_allclose(b.data, 0.9)
    with pytest.raises(ValueError, match="weight_decay must be"):
        optim.SGD([a], lr=0.1, weight_decay=-1)
    with pytest.raises(ValueError, match="max_norm must be"):
        optim.SGD([a], lr=0.1, max_norm=0)
    with pytest.raises(ValueError, match="params must not be empty"):
        optim.Adam([])


def test_optimizer_state_round_trip():
    p = nn.Parameter(np.ones(3))
    opt = optim.Adam([p], lr=0.1)
    p.grad = np.array([1.0, -1.0, 0.5])
    opt.step()
    state = opt.state_dict()
    q = nn.Parameter(p.data.copy())
    other = optim.Adam([q], lr=0.1)
    other.load_state_dict(state)
    p.grad = q.grad = np.array([0.3, 0.2, 0.1])
    opt.step(), other.step()
    np.testing.assert_array_equal(p.data, q.data)


def _sgd(lr=1.0):
    return optim.SGD([nn.Parameter(np.zeros(1))], lr=lr)


def test_step_and_cosine_schedules():
    step = schedules.StepLR(_sgd(), step_size=2, gamma=0.5)
    lrs = []
    for _ in range(5):
        step.step_epoch()
        lrs.append(step.lr)
    assert lrs == [1.0, 0.5, 0.5, 0.25, 0.25]
    cosine = schedules.CosineLR(_sgd(), total_epochs=4, min_factor=0.1)
    for _ in range(2):
        cosine.step_epoch()
    assert cosine.lr == pytest.approx(0.1 + 0.9 * 0.5)
    for _ in range(3):
        cosine.step_epoch()
    assert cosine.lr == pytest.approx(0.1)


def test_reduce_on_plateau_divides_after_patience_and_respects_min():
    s = schedules.ReduceOnPlateau(_sgd(), factor=5, patience=1, min_lr=0.01)
    for accuracy, expected in ((0.5, 1.0), (0.6, 1.0), (0.6, 1.0), (0.6, 0.2), (0.59, 0.2), (0.6, 0.04),
                               (0.6, 0.04), (0.6, 0.01), (0.6, 0.01), (0.6, 0.01)):
        s.step_epoch(accuracy)
        assert s.lr == pytest.approx(expected)
    with pytest.raises(ValueError, match="needs the validation metric"):
        s.step_epoch()
    with pytest.raises(ValueError, match="factor must be a finite number > 1"):
        schedules.ReduceOnPlateau(_sgd(), factor=0.5)


def test_linear_warmup_then_schedule():
    s = schedules.CosineLR(_sgd(lr=0.4), total_epochs=10, warmup_steps=4)
    assert s.lr == pytest.approx(0.1)
    seen = []
    for _ in range(5):
        s.step_batch()
        seen.append(s.lr)
    assert seen == pytest.approx([0.2, 0.3, 0.4, 0.4, 0.4])


def test_schedule_state_round_trip():
    s = schedules.ReduceOnPlateau(_sgd(), patience=0)
    s.step_epoch(0.5), s.step_epoch(0.4)
    other = schedules.ReduceOnPlateau(_sgd(), patience=0)
    other.load_state_dict(s.state_dict())
    assert other.lr == s.lr == 0.5 and other.best == 0.5


# ------------------------------------- found by an independent sweep (fifth session)

def test_optimizer_load_state_dict_checks_shapes_keys_and_kind():
    """A (3,) velocity for a (4, 3) weight was broadcast at step(); state for a missing
    parameter was a bare IndexError; SGD's state loaded into Adam without a word."""
    from pycnn import Tensor, nn
    model = nn.Linear(3, 4)
    sgd = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(Tensor(np.ones((2, 3), np.float32))).sum().backward()
    sgd.step()
    good = sgd.state_dict()
    bad_shape = {**good, "0.0.velocity": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"shape \(3,\), its parameter \(4, 3\)"):
        optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict(bad_shape)
    with pytest.raises(ValueError, match="no parameter 5 in group 0"):
        optim.SGD(model.parameters(), lr=0.1, momentum=0.9).load_state_dict({**good, "0.5.velocity": 1.0})
    with pytest.raises(ValueError, match="Adam keeps m, v, step, not 'velocity'"):
        optim.Adam(model.parameters()).load_state_dict(good)
    fresh = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(good)
    np.testing.assert_array_equal(fresh.state_dict()["0.0.velocity"], good["0.0.velocity"])


def test_group_settings_are_checked_in_every_group():
    from pycnn import nn
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    for make, words in ((lambda: optim.SGD([{"params": a.parameters()}, {"params": b.parameters(), "momentum": 5}],
                                           lr=0.1), "momentum must be in"),
                        (lambda: optim.Adam([{"params": a.parameters(), "betas": (2, 2)}]), "betas must be"),
                        (lambda: optim.Adam([{"params": a.parameters(), "eps": -1}]), "eps must be")):
        with pytest.raises(ValueError, match=words):
            make()


def test_reduce_on_plateau_floors_every_group_at_min_lr():
    from pycnn import nn
    groups = [{"params": nn.Linear(2, 2).parameters(), "lr": 0.1}, {"params": nn.Linear(2, 2).parameters(), "lr": 0.01}]
    sgd = optim.SGD(groups, lr=0.1)
    plateau = schedules.ReduceOnPlateau(sgd, mode="min", patience=0, min_lr=1e-3)
    for _ in range(12):
        plateau.step_epoch(1.0)
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([1e-3, 1e-3])  # the second went to 1e-4


def test_schedule_settings_and_state_are_checked():
    for make, words in ((lambda: schedules.CosineLR(_sgd(), total_epochs=float("nan")), "total_epochs"),
                        (lambda: schedules.StepLR(_sgd(), step_size=2.5), "step_size"),
                        (lambda: schedules.CosineLR(_sgd(), total_epochs=3, warmup_steps=2.5), "warmup_steps")):
        with pytest.raises(ValueError, match=words):
            make()
    with pytest.raises(ValueError, match=r"state holds \['optimizer'\]"):
        schedules.CosineLR(_sgd(), total_epochs=3).load_state_dict({"optimizer": None})
