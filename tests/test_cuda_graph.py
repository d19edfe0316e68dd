"""A training step captured as a CUDA graph (pycnn.cuda_graph.GraphedStep).

In the simulator the graph is emulated: each replay runs the step's Python again in live
mode and fails when a launch differs from the captured one in anything a real graph fixes
(kernel, grid, block, array shapes, by-value arguments).  So these tests prove that every
value that changes from step to step (dropout and rrelu keys, a scheduled lr, Adam's step)
goes through the live table, and that replays give an eager step's numbers bit for bit.
On a GPU the same tests run real CuPy graphs (bench/gpu_checks.sh).
"""
from __future__ import annotations

import numpy as np
import pytest

import pycnn
import pycnn.functional as F
from pycnn import cuda_graph, models, nn, optim, schedules
from pycnn.cuda_graph import GraphCaptureError, GraphedStep
from tests.test_cuda_backend import SIMULATED, cuda_backend, needs_cuda, to_device, to_host


@pytest.fixture
def on_cuda(monkeypatch):
    """The cuda backend; in the simulator its optimizer kernels take the NumPy parameters."""
    cuda_backend()
    if SIMULATED:
        monkeypatch.setattr(optim, "is_cuda_array", lambda a: True)
    with pycnn.use_backend("cuda"):
        yield


def _readme_net(seed=0):
    from pycnn.training import config as config_module
    from pycnn.training import pipeline
    config = config_module.Config(dataset="cifar10", widths=(2, 3, 4), convs_per_stage=2)  # README: 32, 64, 128
    net = models.build(pipeline.model_spec(config, 3, 8, 10), seed=seed)
    if not SIMULATED:
        net.to("cuda")
    return net, pipeline.make_optimizer(config, net)


def _small_net(seed=0, activation="relu", adam=False):
    """conv3x3 + batch norm + activation, max pooling, dropout, linear: every kind of op of
    the README net at a size the simulator runs quickly (4 x 4 images)."""
    rng = np.random.default_rng(seed)
    act = nn.RReLU() if activation == "rrelu" else nn.ReLU()
    net = nn.Sequential(nn.Conv3x3(3, 2, rng=rng), nn.BatchNorm(2), act, nn.MaxPool2(), nn.Dropout(0.3),
                        nn.Flatten(), nn.Linear(2 * 2 * 2, 10, rng=rng))
    if not SIMULATED:
        net.to("cuda")
    groups = optim.param_groups(net, weight_decay=0.01)
    opt = optim.Adam(groups, lr=0.01) if adam else optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True)
    return net, opt


def _rrelu_adam_net(seed=0):
    return _small_net(seed, activation="rrelu", adam=True)


def _batches(steps, batch=2, seed=1, size=4):
    rng = np.random.default_rng(seed)
    return [(to_device(rng.standard_normal((batch, 3, size, size)).astype(np.float32)),
             to_device(rng.integers(0, 10, batch))) for _ in range(steps)]


def _step_fn(net, opt):
    def step(x, y):
        opt.zero_grad()
        loss = F.softmax_cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        return loss
    return step


def _train(make_net, batches, graphed: bool):
    pycnn.manual_seed(7)
    net, opt = make_net()
    schedule = schedules.CosineLR(opt, total_epochs=3, warmup_steps=4)  # lr changes every step
    step = _step_fn(net, opt)
    runner = GraphedStep(step, optimizer=opt, model=net) if graphed else None
    losses = []
    for x, y in batches:
        loss = runner(x, y) if graphed else step(pycnn.Tensor(x), y)
        losses.append(float(to_host(loss.data)))
        schedule.step_batch()
    return net, opt, losses, runner


@needs_cuda
@pytest.mark.parametrize("make_net, size", [
    (_small_net, 4), (_rrelu_adam_net, 4),
    pytest.param(_readme_net, 8, marks=pytest.mark.skipif(SIMULATED, reason="a minute in the simulator, where the "
                                                          "small nets run the same ops"))],
    ids=["sgd-relu", "adam-rrelu", "readme-net"])
def test_replayed_steps_give_the_eager_steps_numbers_bit_for_bit(on_cuda, make_net, size):
    """Dropout and rrelu draws, a warm-up schedule (lr changes every step), SGD with Nesterov
    momentum or Adam (counted steps), batch norm fused with the activation, pooling, linear:
    1 eager step, the capture, then replays.  The generator is left where eager steps leave it."""
    from pycnn import random as pycnn_random
    batches = _batches(4, size=size)
    eager_net, eager_opt, eager_losses, _ = _train(make_net, batches, graphed=False)
    after_eager = pycnn_random.draw_seed()
    graph_net, graph_opt, graph_losses, runner = _train(make_net, batches, graphed=True)
    assert pycnn_random.draw_seed() == after_eager
    assert (runner.eager_calls, runner.captures, runner.replays, runner.disabled) == (1, 1, len(batches) - 2, None)
    assert graph_losses == eager_losses
    for (name, a), (_, b) in zip(eager_net.named_parameters(), graph_net.named_parameters()):
        np.testing.assert_array_equal(to_host(b.data), to_host(a.data), err_msg=name)
    for a, b in zip(eager_net.parameters(), graph_net.parameters()):  # Adam's counted steps, the velocities
        sa, sb = eager_opt.state.get(id(a), {}), graph_opt.state.get(id(b), {})
        assert sa.get("step") == sb.get("step")
        for key in ("velocity", "m", "v"):
            if key in sa:
                np.testing.assert_array_equal(to_host(sb[key]), to_host(sa[key]))


@needs_cuda
@pytest.mark.skipif(not SIMULATED, reason="the emulation's check (a real graph replays the captured value)")
def test_a_value_baked_into_the_graph_is_caught_on_replay(on_cuda):
    """A step whose dropout probability changes between calls passes a new by-value
    argument: a real graph would replay the captured one, so the emulation refuses."""
    linear = nn.Linear(3 * 4 * 4, 10)
    calls = []

    def step(x, y):
        calls.append(1)
        linear.weight.grad = linear.bias.grad = None
        h = F.dropout(F.flatten(x), p=0.1 * len(calls))
        loss = F.softmax_cross_entropy(linear(h), y)
        loss.backward()
        return loss
    runner = GraphedStep(step)
    batches = _batches(3)
    runner(*batches[0])
    runner(*batches[1])  # captured
    with pytest.raises(GraphCaptureError, match="differs from the captured"):
        runner(*batches[2])


@needs_cuda
def test_a_new_batch_shape_or_replaced_parameters_capture_again(on_cuda):
    net, opt = _small_net()
    runner = GraphedStep(_step_fn(net, opt), optimizer=opt, model=net)
    for x, y in _batches(3):
        runner(x, y)
    x, y = _batches(1, batch=3, seed=2)[0]  # the last, smaller batch of an epoch
    runner(x, y)
    runner(x, y)
    assert (runner.captures, runner.replays) == (2, 2)
    for p in net.parameters():  # as checkpoint loading does: new arrays
        p.data = p.data.copy()
    runner(x, y)
    assert runner.captures == 3
    net.eval()  # evaluation mode is another step: run as it is
    eager = runner.eager_calls
    runner(x, y)
    assert runner.eager_calls == eager + 1


@needs_cuda
def test_an_l1_term_runs_the_step_eagerly_with_one_warning(on_cuda):
    net, _ = _small_net()
    opt = optim.SGD(optim.param_groups(net, l1=1e-4), lr=0.01, momentum=0.9)
    runner = GraphedStep(_step_fn(net, opt), optimizer=opt)
    batches = _batches(4)
    runner(*batches[0])
    with pytest.warns(RuntimeWarning, match="without a CUDA graph: an update outside"):
        runner(*batches[1])
    runner(*batches[2])
    assert runner.captures == 0 and runner.eager_calls == 3 and "L1" in runner.disabled


@needs_cuda
def test_sgd_first_step_is_not_captured(on_cuda):
    net, opt = _small_net()
    table = cuda_graph.LiveTable(np, immediate=True)
    table.allocate(cuda_graph.LIVE_DTYPES)
    x, y = _batches(1)[0]
    with cuda_graph._live(table), pytest.raises(GraphCaptureError, match="first step"):
        _step_fn(net, opt)(pycnn.Tensor(x), y)


def test_bad_arguments_say_which():
    with pytest.raises(TypeError, match="fn must be callable"):
        GraphedStep(3)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1"):
        GraphedStep(lambda x, y: x, warmup=0)
    with pytest.raises(ValueError, match="max_graphs"):
        GraphedStep(lambda x, y: x, max_graphs=0)


def test_host_arrays_on_the_cpu_backends_run_the_step_as_it_is():
    calls = []
    runner = GraphedStep(lambda x, y: calls.append(y) or x)
    for _ in range(3):
        runner(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))
    assert len(calls) == 3 and runner.captures == 0 and runner.eager_calls == 3


@needs_cuda
def test_the_trainer_with_cuda_graph_keeps_the_eager_history(on_cuda):
    """``Trainer(cuda_graph=True)`` (``pycnn train --device cuda --cuda-graph true``): the same batch losses,
    learning rates and weights as the eager trainer, the regularisation term included."""
    from pycnn.training.trainer import Trainer
    batches = [(to_host(x), to_host(y)) for x, y in _batches(4)]
    results = []
    for graphed in (False, True):
        pycnn.manual_seed(3)
        net, opt = _small_net()
        trainer = Trainer(net, opt, batches, progress=False, device="cpu" if SIMULATED else "cuda",
                          schedule=schedules.CosineLR(opt, total_epochs=2, warmup_steps=3), cuda_graph=graphed)
        history = trainer.fit(1)
        results.append((history["batch_loss"], history["batch_lr"], [to_host(p.data) for p in net.parameters()]))
        if graphed:
            assert (trainer._graphed.captures, trainer._graphed.replays) == (1, 2)
    (losses, lrs, weights), (graph_losses, graph_lrs, graph_weights) = results
    assert graph_losses == losses and graph_lrs == lrs
    for a, b in zip(weights, graph_weights):
        np.testing.assert_array_equal(b, a)


@needs_cuda
def test_a_bad_label_in_a_replayed_step_is_raised_at_the_next_read(on_cuda):
    """The loss kernel records a bad label on the device; a replay has no Python to say that
    the error buffer needs reading, so the capture registers it as replay bookkeeping."""
    from pycnn.kernels import loss as loss_kernels
    net, opt = _small_net()
    runner = GraphedStep(_step_fn(net, opt), optimizer=opt, model=net)
    batches = _batches(3)
    runner(*batches[0])
    runner(*batches[1])  # captured
    (graph,) = runner._graphs.values()
    loss_kernels._unread.clear()
    graph.table.refresh()
    assert loss_kernels._unread, "a replay must mark the loss's error buffer unread"
    x, y = batches[2]
    bad = to_host(y).copy()
    bad[1] = 10  # classes are 0..9
    with pytest.raises(ValueError, match="labels must lie in"):  # the simulator checks host labels at once
        loss = runner(x, to_device(bad))
        pycnn.device.to_host(loss.data)


@needs_cuda
def test_only_the_capturing_thread_gets_placeholder_seeds(on_cuda):
    """A loader thread drawing seeds while another thread captures keeps real draws."""
    import threading

    from pycnn import random as pycnn_random
    table = cuda_graph.LiveTable(np, immediate=True)
    table.allocate(cuda_graph.LIVE_DTYPES)
    other = []
    with cuda_graph._live(table):
        mine = pycnn_random.next_seed()
        thread = threading.Thread(target=lambda: other.append(pycnn_random.next_seed()))
        thread.start()
        thread.join()
    assert table.is_placeholder(mine) and mine >= 2 ** 63
    assert not table.is_placeholder(other[0]) and other[0] < 2 ** 63
    assert pycnn_random.next_seed() < 2 ** 63  # the capture is over


def test_live_tables_are_made_before_a_capture():
    """Inside a capture the zero fill of a new table would be captured and rerun at every
    replay, after the refresh: a dtype without a table made beforehand is refused."""
    table = cuda_graph.LiveTable(np, immediate=False)
    with pytest.raises(GraphCaptureError, match="float32 values"):
        table.values(np.float32, [lambda: (0.1,)], 1)
    table.allocate(cuda_graph.LIVE_DTYPES)
    device, base = table.values(np.float32, [lambda: (0.1,), lambda: (0.2,)], 1)
    assert base == 0 and device.shape == (cuda_graph.CAPACITY,)
    table.refresh()
    np.testing.assert_array_equal(to_host(device[:2]), np.float32([0.1, 0.2]))


class _FakeCupy:
    """Just enough of CuPy's stream-capture API to run GraphedStep's real (non-emulated) path
    on the host and record what it asks of CuPy, in order: the glue a GPU run depends on."""

    def __init__(self, fail_begin=False):
        import contextlib
        import types
        calls = self.calls = []

        class Array(np.ndarray):
            def set(self, host, stream=None):
                calls.append(("set", stream.name if stream else None))
                self[...] = host

        class Graph:
            def launch(self, stream=None):
                calls.append(("launch", stream.name))

        class Stream:
            current = None

            def __init__(self, non_blocking=False, name="capture"):
                self.name, self.non_blocking = name, non_blocking

            def record(self):
                return "event"

            def wait_event(self, event):
                calls.append(("wait_event", self.name))

            def begin_capture(self):
                calls.append(("begin_capture", self.name, Stream.current is self, fake.allocating))
                if fail_begin:
                    raise RuntimeError("cudaErrorStreamCaptureUnsupported")

            def end_capture(self):
                calls.append(("end_capture", self.name))
                return Graph()

            def __enter__(self):
                self.previous, Stream.current = Stream.current, self
                return self

            def __exit__(self, *exc):
                Stream.current = self.previous

        fake = self
        self.allocating = False
        default = Stream(name="default")
        Stream.current = default

        @contextlib.contextmanager
        def using_allocator(malloc):
            self.allocating = True
            yield
            self.allocating = False

        self.cuda = types.SimpleNamespace(Stream=Stream, MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                          using_allocator=using_allocator,
                                          get_current_stream=lambda: Stream.current)
        self.empty = lambda shape, dtype: np.empty(shape, dtype).view(Array)
        self.zeros = lambda shape, dtype: np.zeros(shape, dtype).view(Array)


def test_the_cupy_capture_path_asks_cupy_for_the_right_things(monkeypatch):
    """The capture on a non-blocking stream inside the graph's allocator, the live values
    uploaded on the current stream before every launch, the graph launched there, one
    capture for many replays; a refused capture runs the step eagerly with one warning."""
    import sys
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cuda_graph, "_kind", lambda x: "cupy")
    counter = {"steps": 0}

    def step(x, y):
        table, index = cuda_graph.active().values(np.float32, [lambda: (counter["steps"],)], 1)
        counter["steps"] += 1  # host side: runs at the eager step and at the capture only
        return table, index

    runner = GraphedStep(step)
    x, y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)
    with pytest.raises(AttributeError):  # the eager warm-up has no live table: active() is None
        runner(x, y)
    runner.eager_calls = 1  # as if the warm-up step had run
    (table, index) = runner(x, y)  # captured, then replayed once
    assert fake.calls == [("set", "default"), ("set", "default"),  # x and y into the static buffers
                          ("wait_event", "capture"), ("begin_capture", "capture", True, True),
                          ("end_capture", "capture"),
                          ("set", "default"), ("launch", "default")]  # the live table, then the graph
    fake.calls.clear()
    counter["steps"] = 5
    runner(x, y)
    assert [c[0] for c in fake.calls] == ["set", "set", "set", "launch"]
    assert table[index] == 5 and (runner.captures, runner.replays) == (1, 1)

    refused = _FakeCupy(fail_begin=True)
    monkeypatch.setitem(sys.modules, "cupy", refused)
    eager = GraphedStep(lambda x, y: "eager result")
    eager.eager_calls = 1
    with pytest.warns(RuntimeWarning, match="without a CUDA graph: RuntimeError: cudaErrorStreamCaptureUnsupported"):
        assert eager(x, y) == "eager result"
    assert eager.disabled and eager.eager_calls == 2

    broken = _FakeCupy()  # the step itself refuses inside the capture: the capture is ended, then eager
    monkeypatch.setitem(sys.modules, "cupy", broken)

    def uncapturable(x, y):
        cuda_graph.require_eager("a host read")
        return "eager result"
    eager = GraphedStep(uncapturable)
    eager.eager_calls = 1
    with pytest.warns(RuntimeWarning, match="without a CUDA graph: a host read cannot be captured"):
        assert eager(x, y) == "eager result"
    assert broken.calls[-1] == ("end_capture", "capture") and cuda_graph.active() is None
