"""Fine-tuning: freezing, per-layer learning rates, a new head, linear probes on features."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

import pycnn.functional as F  # noqa: E402
from pycnn import datasets, finetune, optim  # noqa: E402
from pycnn.autograd import Tensor  # noqa: E402
from pycnn.train import Config, run  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run(Config(epochs=3, widths=(8, 16)), run_dir, progress=False)
    return run_dir / "checkpoints" / "epoch_003.npz"


def test_freeze_keeps_early_weights_and_trains_the_rest(trained):
    model = finetune.load_model(trained)
    finetune.replace_head(model, classes=10, rng=np.random.default_rng(0))
    finetune.freeze(model, up_to=4)
    frozen = model[0].weight.data.copy()
    groups = finetune.layerwise_lr_groups(model, lr=0.05, decay=0.5)
    assert [g["lr"] for g in groups] == pytest.approx([0.0125, 0.025, 0.05])  # conv, BN, head
    opt = optim.SGD(groups, lr=0.05, momentum=0.9)
    images, labels = datasets.digits()
    x = (images[:64].astype(np.float32) - 80) / 100
    head_before = model[-1].weight.data.copy()
    loss = F.softmax_cross_entropy(model(Tensor(x)), labels[:64])
    opt.zero_grad()
    loss.backward()
    opt.step()
    np.testing.assert_array_equal(model[0].weight.data, frozen)
    assert model[0].weight.grad is None
    assert not np.array_equal(model[-1].weight.data, head_before)


def test_linear_probe_on_intermediate_features(trained):
    model = finetune.load_model(trained)
    images, labels = datasets.digits()
    train_x, train_y, test_x, test_y = datasets.train_test_split(images, labels, 0.2, seed=0)

    def prepare(a):
        return (a.astype(np.float32) - 80) / 100
    layer = 3  # after the first pooling: (N, 8, 4, 4) -> 128 features
    head = finetune.linear_probe(finetune.features(model, layer, prepare(train_x)), train_y, classes=10, epochs=15)
    scores = head(Tensor(finetune.features(model, layer, prepare(test_x)))).numpy()
    assert (scores.argmax(axis=1) == test_y).mean() > 0.85


def test_bad_arguments():
    from pycnn import nn
    model = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(ValueError, match="no Linear layer"):
        finetune.replace_head(model, 3)
    with pytest.raises(ValueError, match="up_to must be"):
        finetune.freeze(model, 5)
    with pytest.raises(TypeError, match="nn.Sequential"):
        finetune.freeze(nn.ReLU(), 0)
    with pytest.raises(ValueError, match="decay must be"):
        finetune.layerwise_lr_groups(model, 0.1, decay=0)
