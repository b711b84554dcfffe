"""Freeze sweeps on Ray: every unfinished trial is one Ray task that writes the same run
folder as a local sweep (see docs/distributed.md). One trial over several devices of one
machine (``--strategy mirrored``) is :mod:`transfer.trainer.strategy`.

The run folder and the dataset must be on storage every Ray worker sees under the same
path (a local folder for a one-machine Ray; a shared file system on a cluster). Resume
works exactly as locally: finished trials are skipped, an interrupted trial continues
from its last finished epoch (``run_trial`` does it), and a trial that raises is retried
once by Ray before it is reported as failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .._lazy import import_tensorflow
from .. import _ray
from ..options import Interval, Text, option, validate
from .fit import TrialRun, run_trial
from .plan import TrialData, TrialSpec


@dataclass(frozen=True)
class RayOptions:
    """Where and how big (``--ray``): ``address`` None starts a local Ray; resources are per trial."""

    address: str | None = option(None, Text("HOST:PORT of a Ray cluster"), "Ray cluster to join with --ray. "
                                 "[default: start a local Ray]", none=True, metavar="HOST:PORT")
    cpus_per_trial: float = option(1.0, Interval(float, 0, closed="neither"), "Ray CPUs reserved per trial.")
    gpus_per_trial: float = option(0.0, Interval(float, 0), "Ray GPUs reserved per trial.")
    retries: int = option(1, Interval(int, 0), "Times a failing trial is retried.", cli=False)

    def __post_init__(self):
        validate(self)


def init_ray(opts: RayOptions):
    """``ray.init`` quietly: join ``opts.address`` or start a small local instance (the
    trials' progress lines are forwarded to the driver)."""
    return _ray.init_ray(opts.address, purpose="Ray sweeps", log_to_driver=True)


def _trial_task(run_dir: str, cfg, spec_dict: dict, data: TrialData, siblings: tuple, threads: int,
                until: int | None = None, stopped: dict | None = None) -> tuple[str, object]:
    """Body of one Ray task: the same ``run_trial`` / :class:`~transfer.trainer.fit.TrialRun` as a
    local sweep (imports TF in the worker). Returns ``("done", metrics)``, or ``("paused", epoch)``
    for a trial trained up to ``until`` (a rung) with epochs left; ``stopped``: evaluate it as it
    stands (a rung stopped it)."""
    tf = import_tensorflow()
    try:  # one trial per reserved CPU budget, not every core of the node
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    spec_dict = dict(spec_dict)
    spec_dict["image_size"] = tuple(spec_dict["image_size"])
    spec = TrialSpec(**spec_dict)
    say = lambda s: print(s, flush=True)  # noqa: E731
    if until is None and stopped is None:
        return "done", run_trial(run_dir, cfg, spec, data, progress=say, siblings=siblings)
    run = TrialRun.open(run_dir, cfg, spec, data, progress=say, siblings=siblings)
    if stopped is not None:
        return "done", run.finish(stopped)
    run.train(until)
    if run.ended:
        return "done", run.finish()
    run.pause()
    return "paused", run.epoch


@dataclass(frozen=True)
class RayJob:
    """One trial for a Ray task: its spec, its images, and the trainable fractions of the trials
    sharing its frozen-prefix caches (built in one pass; ``PreparedRun.siblings``)."""

    spec: TrialSpec
    data: TrialData
    siblings: tuple = ()


def run_trials_ray(run_dir: Path, config, jobs: list[RayJob], *, opts: RayOptions, progress: Callable[[str], None],
                   until: int | None = None, stops: dict[str, dict] | None = None) -> dict[str, tuple[str, object]]:
    """Run ``jobs`` as Ray tasks; returns {name: ("done", metrics) | ("paused", epoch) | ("failed", msg)}.

    ``until``: train each trial up to that epoch (a rung of ``--schedule halving``; a trial whose
    plan ends before it is evaluated and done); ``stops``: {name: why} evaluate those trials as they
    stand. The trials build and share the frozen-prefix caches under the run folder (a lock per
    backbone makes concurrent trials wait for one build instead of building twice).
    """
    ray = init_ray(opts)
    task = ray.remote(_trial_task).options(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial,
                                           max_retries=opts.retries, retry_exceptions=True)
    threads = max(1, int(opts.cpus_per_trial))
    refs = {}
    for job in jobs:
        ref = task.remote(str(run_dir), config, asdict(job.spec), job.data, tuple(job.siblings), threads, until,
                          (stops or {}).get(job.spec.name))
        refs[ref] = job.spec.name
    total = ray.cluster_resources().get("CPU", 0)
    progress(f"ray: {len(refs)} trial task(s) submitted ({opts.cpus_per_trial:g} CPU"
             f"{f', {opts.gpus_per_trial:g} GPU' if opts.gpus_per_trial else ''} each; cluster has {total:g} CPU)")
    out: dict[str, tuple[str, object]] = {}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        name = refs[done[0]]
        try:
            state, value = ray.get(done[0])
            out[name] = (str(state), value)
        except Exception as exc:  # RayTaskError wraps the trial's own exception
            cause = getattr(exc, "cause", None) or exc
            msg = getattr(cause, "message", None) or f"{type(cause).__name__}: {cause}"
            out[name] = ("failed", f"{msg} (after {opts.retries} retr{'y' if opts.retries == 1 else 'ies'} on Ray)")
        progress(f"ray: {len(out)}/{len(refs)} trial(s) finished ({name}: {out[name][0]})")
    return out
