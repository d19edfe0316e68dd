"""The Ray side of the tools (``pip install "pycnn[ray]"``).

* ``session``: by default ``ray.init`` starts a local Ray instance on this machine (no
  dashboard, usage statistics off, bound to 127.0.0.1: it never reaches the network);
  ``address`` joins an existing Ray cluster instead, so the same command runs on many
  machines.  Every Ray worker runs pycnn's C++ kernels on ``threads`` OpenMP threads
  (``OMP_NUM_THREADS`` in the job's runtime environment), so trials sized at ``threads``
  CPUs each share the cores without oversubscribing them.
* ``run_trials``: search trials as Ray tasks of ``threads`` CPUs each (and one GPU with
  ``--device cuda``), as many at a time as the cluster has room for, placed by Ray on any
  node with the resources free.  After each epoch a
  trial asks a ``Judge`` actor (the search's successive-halving rule, one copy for the whole
  stage) whether to go on, and stops itself when cut: asynchronous successive halving
  without a central loop, and the driver only prints the judge's log.
* ``run_jobs``: independent trainings (ensemble members, imbalance remedies) as Ray tasks.

Why not Ray Tune's trial runner and ASHAScheduler: on this project's 2-core machine Tune
added about 15 s per 4-trial stage (each trial actor imports ray.tune, ~4 s, and Tune's
controller loop polls), more than the tiny trials of a test take; and Tune does not save a
scheduler's state when an experiment is restored, while the judge is rebuilt from the
trial folders.  The rule is ASHA's, as ASHAScheduler applies it (``search.Halving``).

With ``address``, the run folder must be on storage every node sees (as Ray Tune's
``storage_path`` must be on a multi-node cluster): trials write their folders there, and
pycnn must be installed on every node.
"""
from __future__ import annotations

import contextlib
import os

from pycnn.training.config import Config
from pycnn.training.tools import trial as trials

INSTALL_HINT = ('Ray is not installed: pip install "pycnn[ray]" (or pip install "ray==2.60.0"); '
                "--backend local runs without it, in this process")


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster at --address cannot be reached."""


def available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise RayUnavailable(INSTALL_HINT)


@contextlib.contextmanager
def session(address: str | None = None, cpus: int | None = None, gpus: int | None = None, threads: int = 1):
    """A Ray instance for the block: a new local one (``cpus``/``gpus``: what it offers,
    default all of this machine's), or the cluster at ``address``; an instance already
    started in this process (``ray.init`` by the caller) is used as it is and left running."""
    require()
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Ray's own switch, read when it starts: send no usage statistics anywhere (offline)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                   runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayUnavailable(f"--address: cannot join the Ray cluster at {address} ({exc})") from None
    else:
        ray.init(num_cpus=cpus, num_gpus=gpus, object_store_memory=200 * 2 ** 20, _node_ip_address="127.0.0.1",
                 **options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _task(ray, function, threads: int, device: str):
    return ray.remote(num_cpus=threads, num_gpus=1 if device == "cuda" else 0, max_retries=0)(function)


@contextlib.contextmanager
def _tasks(ray, futures: list):
    """Around waiting on Ray tasks: Ctrl-C cancels every future in ``futures`` (the list as it
    is then) and raises KeyboardInterrupt; a task's error becomes a RuntimeError."""
    try:
        yield
    except KeyboardInterrupt:
        for f in futures:
            ray.cancel(f, force=True)
        raise
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise RuntimeError(f"a Ray task failed: {type(cause).__name__}: {cause}") from None


def _wait_all(ray, futures: list) -> list:
    """ray.get of every future (see ``_tasks`` for Ctrl-C and errors)."""
    with _tasks(ray, futures):
        return ray.get(futures)


# ----------------------------------------------------------------------------- search trials

class Judge:
    """The successive-halving rule of a stage, shared by its trials (a Ray actor), with a
    log of what it saw for the driver to print."""

    def __init__(self, halving):
        self.halving, self.events = halving, []

    def record(self, trial: str, epoch: int, value) -> bool:
        keep = self.halving.record(trial, epoch, value)
        self.events.append(f"  trial {trial} epoch {epoch}: validation accuracy "
                           f"{float('nan') if value is None else value:.4f}" +
                           ("" if keep else "; cut by successive halving"))
        return keep

    def note(self, text: str) -> None:
        self.events.append(text)

    def read(self, start: int) -> list:
        return self.events[start:]


def _trial_task(spec, judge) -> str:
    """One search trial (a Ray task): train, asking the judge after every epoch."""
    import ray

    config = Config.from_dict(spec.config)
    report = lambda m: ray.get(judge.record.remote(spec.id, m["epoch"], m.get("val_accuracy")))  # noqa: E731
    outcome = trials.train_config(config, spec.folder, splits=trials.cached_splits(config), report=report,
                                  resume=True)  # a worker keeps the data between its trials
    judge.note.remote(f"  trial {spec.id}: {outcome.status}{': ' + outcome.reason if outcome.reason else ''}")
    return outcome.status


def _slots(ray, threads: int, device: str) -> int:
    """How many trials fit at once: the cluster's CPUs / threads (and its GPUs with cuda)."""
    offered = ray.cluster_resources()
    slots = max(1, int(offered.get("CPU", 1) // threads))
    if device == "cuda":
        if not offered.get("GPU"):
            raise RayUnavailable("--device cuda: the Ray cluster offers no GPU (--gpus N for a local instance)")
        slots = min(slots, int(offered["GPU"]))
    return slots


def run_trials(todo: list, halving, *, address=None, cpus=None, gpus=None, threads: int = 1, device: str = "cpu",
               log=print) -> None:
    """Run search trials (TrialSpecs) as Ray tasks; each writes its own folder (outcome.json
    when it ends).  KeyboardInterrupt on Ctrl-C, the unfinished trials keeping their
    checkpoints.

    At most as many trials run as the cluster has room for (``_slots``), submitted as others
    end: a task waiting for the judge's answer hands its CPU back to Ray for that moment, and
    Ray would start another queued trial on it, one more than the cores."""
    with session(address, cpus, gpus, threads) as ray:
        judge = ray.remote(num_cpus=0)(Judge).remote(halving)
        task = _task(ray, _trial_task, threads, device)
        slots = _slots(ray, threads, device)
        log(f"  {len(todo)} trials on Ray, {slots} at a time ({threads} CPU thread{'s' if threads > 1 else ''}"
            f"{' and a GPU' if device == 'cuda' else ''} each)", flush=True)
        queue, running, shown = list(todo), [], [0]

        def show():
            for line in ray.get(judge.read.remote(shown[0])):
                log(line, flush=True)
                shown[0] += 1

        with _tasks(ray, running):
            while queue or running:
                while queue and len(running) < slots:
                    running.append(task.remote(queue.pop(0), judge))
                done, running[:] = ray.wait(running, num_returns=1, timeout=1.0)
                ray.get(done)
                show()


# ------------------------------------------------------------------------------- plain jobs

def _job(function, job):
    return function(**job)


def run_jobs(function, jobs: list, *, address=None, cpus=None, gpus=None, threads: int = 1, device: str = "cpu",
             log=print) -> list:
    """``[function(**job) for job in jobs]`` as parallel Ray tasks of ``threads`` CPUs (and a
    GPU each with device 'cuda'); Ctrl-C cancels them and raises KeyboardInterrupt."""
    with session(address, cpus, gpus, threads) as ray:
        task = _task(ray, _job, threads, device)
        _slots(ray, threads, device)  # a GPU job on a cluster without GPUs would wait for ever
        futures = [task.remote(function, job) for job in jobs]
        log(f"  {len(futures)} jobs on Ray ({threads} CPU thread{'s' if threads > 1 else ''} each)", flush=True)
        return _wait_all(ray, futures)
