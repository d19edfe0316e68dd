"""The Ray side of the tools (``pip install "pycnn[ray]"``).

* ``session``: by default ``ray.init`` starts a local Ray instance on this machine (no
  dashboard, usage statistics off, bound to 127.0.0.1: it never reaches the network);
  ``address`` joins an existing Ray cluster instead, so the same command runs on many
  machines.  Every Ray worker runs pycnn's C++ kernels on ``threads`` OpenMP threads
  (``OMP_NUM_THREADS`` in the job's runtime environment), so trials sized at ``threads``
  CPUs each share the cores without oversubscribing them.
* ``run_trials``: search trials as Ray Tune trials, each asking for ``threads`` CPUs (and
  one GPU with ``--device cuda``); the search's successive-halving rule cuts them through a
  Tune scheduler.
* ``run_jobs``: independent trainings (ensemble members, imbalance remedies) as Ray tasks.

With ``address``, the run folder must be on storage every node sees (as Ray Tune's own
``storage_path`` must be for a multi-node cluster): trials write their folders there, and
pycnn must be installed on every node.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

INSTALL_HINT = ('Ray is not installed: pip install "pycnn[ray]" (or pip install "ray[tune]==2.60.0"); '
                "--backend local runs without it, in this process")


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster at --address cannot be reached."""


def available() -> bool:
    try:
        import ray  # noqa: F401
        from ray import tune  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    if not available():
        raise RayUnavailable(INSTALL_HINT)


def _quiet_environment() -> None:
    # Ray's own switches, read when Ray starts: no usage statistics sent anywhere (offline), and
    # Tune's plain reporter, which honours verbose=0 (the default one prints a table anyway)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


@contextlib.contextmanager
def session(address: str | None = None, cpus: int | None = None, gpus: int | None = None, threads: int = 1):
    """A Ray instance for the block: a new local one (``cpus``/``gpus``: what it offers,
    default all of this machine's), or the cluster at ``address``; an instance already
    started in this process (``ray.init`` by the caller) is used as it is and left running."""
    require()
    import ray

    _quiet_environment()
    if ray.is_initialized():
        yield ray
        return
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


def resources(threads: int, device: str) -> dict:
    return {"cpu": threads, "gpu": 1 if device == "cuda" else 0}


# ----------------------------------------------------------------------------- search trials

def _tune_trial(config, specs=None):
    """A Ray Tune function trainable: one search trial (``config["trial"]`` is its id)."""
    from ray import tune

    from pycnn.config import Config
    from pycnn.tools import trial as trials

    spec = specs[config["trial"]]

    def report(metrics):
        tune.report({k: v for k, v in metrics.items() if v is not None})
        return True

    trials.train_config(Config.from_dict(spec.config), spec.folder, report=report, resume=True)


def _scheduler(halving, specs, log):
    """A Tune scheduler applying the search's Halving rule to our epochs (``result["epoch"]``,
    which keeps counting when a trial resumes, unlike Tune's training_iteration)."""
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    from pycnn.tools import trial as trials

    class HalvingScheduler(FIFOScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            if "epoch" not in result:
                return TrialScheduler.CONTINUE
            trial_id = trial.config["trial"]
            log(f"  trial {trial_id} epoch {result['epoch']}: validation accuracy "
                f"{result.get('val_accuracy', float('nan')):.4f}", flush=True)
            if halving.record(trial_id, result["epoch"], result.get("val_accuracy")):
                return TrialScheduler.CONTINUE
            spec = specs[trial_id]
            curve = trials.read_curve(spec.folder)[:result["epoch"]]
            trials.write_outcome(spec.folder, _cut_outcome(curve, result["epoch"]))
            log(f"  trial {trial_id}: aborted, cut by successive halving after epoch {result['epoch']}")
            return TrialScheduler.STOP

    return HalvingScheduler()


def _cut_outcome(curve: list, epoch: int):
    from pycnn.tools.trial import ABORTED, Outcome

    scored = [r for r in curve if r["val_accuracy"] is not None]
    best = max(scored, key=lambda r: (r["val_accuracy"], -(r["val_loss"] or 0))) if scored else None
    return Outcome(status=ABORTED, reason=f"cut by successive halving after epoch {epoch}", epochs=len(curve),
                   best_epoch=best["epoch"] if best else None, val_accuracy=best["val_accuracy"] if best else None,
                   val_loss=best["val_loss"] if best else None, seconds=float(sum(r["seconds"] for r in curve)),
                   images=0, curve=curve)


def run_trials(todo: list, halving, run_dir, name: str, *, address=None, cpus=None, gpus=None, threads: int = 1,
               device: str = "cpu", log=print) -> None:
    """Run search trials (TrialSpecs) on Ray Tune; each writes its own folder.  Returns when
    all ended or Ctrl-C stopped the run (the caller finds the unfinished ones)."""
    with session(address, cpus, gpus, threads):
        from ray import tune

        from pycnn.tools import trial as trials

        specs = {s.id: s for s in todo}
        trainable = tune.with_resources(tune.with_parameters(_tune_trial, specs=specs),
                                        resources(threads, device))
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(list(specs))},
            tune_config=tune.TuneConfig(scheduler=_scheduler(halving, specs, log), reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(Path(run_dir).resolve() / "ray"), name=name, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        for result in grid:
            spec = specs.get(result.config.get("trial")) if result.config else None
            if result.error is not None and spec is not None and trials.read_outcome(spec.folder) is None:
                message = str(result.error).strip().splitlines()[-1][:300]
                outcome = _cut_outcome(trials.read_curve(spec.folder), 0)
                outcome.reason = f"error: {message}"
                trials.write_outcome(spec.folder, outcome)
                log(f"  trial {spec.id}: aborted by an error: {message}")


# ------------------------------------------------------------------------------- plain jobs

def run_jobs(function, jobs: list, *, address=None, cpus=None, gpus=None, threads: int = 1, device: str = "cpu",
             log=print) -> list:
    """``[function(**job) for job in jobs]``, as parallel Ray tasks of ``threads`` CPUs (and a
    GPU each with device 'cuda'); Ctrl-C cancels them and raises KeyboardInterrupt."""
    with session(address, cpus, gpus, threads) as ray:
        remote = ray.remote(num_cpus=threads, num_gpus=1 if device == "cuda" else 0, max_retries=0)(
            _job).options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}})
        futures = [remote.remote(function, job) for job in jobs]
        log(f"  {len(futures)} jobs on Ray ({threads} CPU thread{'s' if threads > 1 else ''} each)", flush=True)
        try:
            return ray.get(futures)
        except KeyboardInterrupt:
            for f in futures:
                ray.cancel(f, force=True)
            raise
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise RuntimeError(f"a Ray job failed: {type(cause).__name__}: {cause}") from None


def _job(function, job):
    return function(**job)
