"""Fine-tuning: freezing (running statistics included), per-layer learning rates, a new head,
linear probes (softmax and SVM) on any layer, and the four presets of the tips' table."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

import pycnn.functional as F  # noqa: E402
from pycnn import nn, optim
from pycnn.autograd import Tensor  # noqa: E402
from pycnn.data import datasets
from pycnn.training import cli, finetune  # noqa: E402
from pycnn.training.config import Config
from pycnn.training.evaluation import evaluate_checkpoint
from pycnn.training.runs import run  # noqa: E402


@pytest.fixture(scope="module")
def first_five(tmp_path_factory):
    """A network that learnt the digits 0-4 only: the source task of the presets."""
    run_dir = tmp_path_factory.mktemp("first_five")
    run(Config(epochs=3, widths=(8, 16), classes=(0, 1, 2, 3, 4)), run_dir, progress=False)
    return run_dir / "checkpoints" / "epoch_003.npz"


@pytest.fixture(scope="module")
def trained(first_five):
    return first_five


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
    with pytest.raises(ValueError, match="up_to must be an integer"):
        finetune.freeze(model, 5)
    with pytest.raises(TypeError, match="nn.Sequential"):
        finetune.freeze(nn.ReLU(), 0)
    with pytest.raises(ValueError, match="decay must be"):
        finetune.layerwise_lr_groups(model, 0.1, decay=0)


def test_frozen_batch_norm_keeps_its_running_statistics(trained):
    model = finetune.load_model(trained)
    finetune.freeze(model, up_to=4)  # conv, BN, ReLU, pool of stage 1
    frozen_bn, trained_bn = model[1], model[5]
    before = frozen_bn.running_mean.copy(), frozen_bn.running_var.copy(), trained_bn.running_mean.copy()
    opt = optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    images, labels = datasets.select_classes(*datasets.digits(), (0, 1, 2, 3, 4))
    model.train()  # also switches frozen layers? it must not
    assert not frozen_bn.training and trained_bn.training and finetune.is_frozen(frozen_bn)
    for start in (0, 64):
        x = (images[start:start + 64].astype(np.float32) - 80) / 100
        loss = F.softmax_cross_entropy(model(Tensor(x)), labels[start:start + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_array_equal(frozen_bn.running_mean, before[0])
    np.testing.assert_array_equal(frozen_bn.running_var, before[1])
    assert not np.array_equal(trained_bn.running_mean, before[2])
    assert repr(frozen_bn).startswith("BatchNorm(") and "model.1.weight" not in str(model.state_dict().keys())
    finetune.freeze(model, up_to=0)  # unfreeze
    assert not finetune.is_frozen(frozen_bn) and frozen_bn.training and model[0].weight.requires_grad
    assert type(frozen_bn) is nn.BatchNorm


def test_svm_probe_on_an_early_layer(trained):
    model = finetune.load_model(trained)
    images, labels = datasets.digits()
    train_x, train_y, test_x, test_y = datasets.train_test_split(images, labels, 0.2, seed=0)
    prepare = lambda a: (a.astype(np.float32) - 80) / 100  # noqa: E731
    head = finetune.linear_probe(finetune.features(model, 2, prepare(train_x)), train_y, classes=10, epochs=10,
                                 loss="svm")
    scores = head(Tensor(finetune.features(model, 2, prepare(test_x)))).numpy()
    assert (scores.argmax(axis=1) == test_y).mean() > 0.85
    with pytest.raises(ValueError, match="loss must be 'softmax' or 'svm'"):
        finetune.linear_probe(np.zeros((4, 2)), np.arange(4) % 2, 2, loss="logistic")


@pytest.mark.parametrize("preset, floor", [("similar-small", 0.9), ("different-small", 0.85),
                                           ("similar-large", 0.85), ("different-large", 0.85)])
def test_presets_transfer_digits_0_4_to_5_9(first_five, tmp_path, preset, floor):
    result = finetune.run_preset(first_five, preset, run_dir=tmp_path / "ft", classes=(5, 6, 7, 8, 9),
                                 epochs=None if "small" in preset else 2, progress=False)
    assert result.val_accuracy > floor and result.test_accuracy > floor, result.summary()
    # the saved model is a plain checkpoint: evaluate rebuilds it with the new task's data
    loss, accuracy = evaluate_checkpoint(result.checkpoint)
    assert accuracy == pytest.approx(result.test_accuracy)
    if preset == "similar-large":
        assert "layers 0..3 frozen (running statistics included)" in result.what
    if preset == "different-small":
        assert "SVM (multiclass hinge) probe on layer 3 (MaxPool2" in result.what


def test_finetune_command_probe_on_any_layer_and_bad_input(first_five, tmp_path, capsys):
    argv = ["finetune", str(first_five), "--classes", "5,6,7,8,9", "--run-dir", str(tmp_path / "ft")]
    assert cli.main([*argv, "--preset", "similar-small", "--layer", "6", "--probe", "svm", "--epochs", "5"]) == 0
    out = capsys.readouterr().out
    assert "SVM (multiclass hinge) probe on layer 6 (ReLU, 256 features)" in out and "test accuracy" in out
    for extra, message in ((["--preset", "similar-small", "--layer", "12"], "layer must be in [0, 9] for this model"),
                           (["--preset", "similar-large", "--probe", "svm"], "--probe applies to the probe presets"),
                           (["--preset", "similar-small", "--classes", "5,6,42"], "labels [42] do not occur")):
        assert cli.main([*argv, *extra, "--run-dir", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert cli.main(["finetune", str(tmp_path / "none.npz"), "--preset", "similar-small"]) == 2
    assert "CHECKPOINT: checkpoint not found" in capsys.readouterr().err


# ------------------------------------- found by an independent sweep (fifth session)

def test_finetune_command_stops_in_one_line_and_refuses_a_probe_source(first_five, tmp_path, capsys):
    """A diverging fine-tune ended in a traceback; a probe checkpoint as the source ended in
    a KeyError; --epochs 0 silently trained the preset's 5 epochs."""
    argv = ["finetune", str(first_five), "--classes", "5,6,7,8,9"]
    assert cli.main([*argv, "--preset", "different-large", "--lr", "100", "--epochs", "1",
                     "--run-dir", str(tmp_path / "diverged")]) == 1
    captured = capsys.readouterr()
    assert "stopped early: the loss" in captured.out and "Traceback" not in captured.err
    assert cli.main([*argv, "--preset", "similar-large", "--epochs", "0", "--run-dir", str(tmp_path / "e0")]) == 2
    assert "epochs must be an integer >= 1, got 0" in capsys.readouterr().err
    assert cli.main([*argv, "--preset", "similar-small", "--epochs", "3", "--run-dir", str(tmp_path / "probe")]) == 0
    capsys.readouterr()
    probe = tmp_path / "probe" / "checkpoints" / "probe.npz"
    assert cli.main(["finetune", str(probe), "--preset", "similar-small", "--run-dir", str(tmp_path / "q")]) == 2
    assert "is a linear probe" in capsys.readouterr().err


def test_finetune_keeps_the_checkpoints_classes_by_default(first_five, tmp_path):
    result = finetune.run_preset(first_five, "similar-large", run_dir=tmp_path / "same", epochs=1, progress=False)
    assert "a new head of 5 classes" in result.summary()


def test_features_restore_the_models_mode_and_arguments_are_checked(trained):
    model = finetune.load_model(trained)
    images = np.zeros((2, 1, 8, 8), np.float32)
    model.eval()
    finetune.features(model, 2, images)
    assert not model.training  # it was left in training mode
    model.train()
    finetune.features(model, 2, images)
    assert model.training
    with pytest.raises(ValueError, match="layer must be an integer"):
        finetune.features(model, 2.5, images)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        finetune.layerwise_lr_groups(model, lr=-0.1)
    with pytest.raises(ValueError, match="one label per feature row"):
        finetune.linear_probe(np.zeros((4, 3), np.float32), np.zeros(3, np.int64), classes=2)


def test_finetune_refuses_to_write_over_its_source_run(first_five, capsys):
    before = sorted(path.name for path in first_five.parent.iterdir())
    for run_dir in (first_five.parent.parent, first_five.parent):
        assert cli.main(["finetune", str(first_five), "--preset", "similar-large", "--run-dir", str(run_dir)]) == 2
        assert "holds the checkpoint being fine-tuned" in capsys.readouterr().err
    assert sorted(path.name for path in first_five.parent.iterdir()) == before
