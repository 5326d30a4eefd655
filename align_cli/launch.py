"""`align train ...` from the command line: preflight, Hydra's entry, sweep jobs and one-line exits.

`main(argv)` has preflight.py compose the command line once and choose the run folder, then
Hydra composes again and calls `train.train(cfg)`; an `AlignError` becomes `align: error: <one
line>` (`fail`). Under `-m` each job is `_sweep_job`.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from omegaconf import DictConfig

from . import config as schema
from .errors import AlignError, TrainingInterrupted, fail, one_line, wants_debug
from .preflight import prepare
from .run_folder import HELD, remove_if_untouched, unlock_run_folder
from .train import train


def _hydra_entry() -> None:
    import hydra

    @hydra.main(config_path=str(schema.CONF_DIR), config_name="config", version_base="1.3")
    def _main(cfg: DictConfig) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        debug = bool(cfg.get("debug", False))
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return _sweep_job(cfg, hydra_cfg, debug)
        try:
            train(cfg)
        except TrainingInterrupted as err:
            if debug:
                raise
            fail(err)
        except AlignError as err:
            if debug:
                raise
            remove_if_untouched(hydra_cfg.runtime.output_dir)
            fail(err)
        except KeyboardInterrupt:
            if debug:
                raise
            run_dir = hydra_cfg.runtime.output_dir
            if remove_if_untouched(run_dir):
                fail("interrupted before training started (nothing to save)", 128 + signal.SIGINT)
            fail(f"interrupted (nothing saved since the last checkpoint in {run_dir})", 128 + signal.SIGINT)
        return None

    _main()
    sweep_dir = _sweep_dir_of(sys.argv)
    if sweep_dir and os.path.isdir(sweep_dir):
        from .sweep import report

        # Again in this process: with a launcher whose jobs run elsewhere (submitit), the last
        # job's own report may predate another's end.
        result = report(sweep_dir)
        failed = [j for j in result["jobs"] if j["status"] != "finished"]
        print(f"align: sweep results: {os.path.join(sweep_dir, 'results.md')}", file=sys.stderr, flush=True)
        if failed:
            fail(f"{len(failed)} job(s) of the sweep failed: {', '.join(j['run_dir'] for j in failed)}")


def _sweep_job(cfg: DictConfig, hydra_cfg, debug: bool) -> float | None:
    """One job of a multirun: trains, records `job.json`, refreshes the sweep's results table.

    Returns the job's `sweep.metric` (what a Hydra sweeper such as Optuna optimises), or None
    for a failed job or an undefined value, which Optuna records as a failed trial, not a score.
    One failed job does not stop the sweep; an interrupt (the user asked to stop) does.
    """
    from .sweep import default_metric, job_record, metric_value, report, write_job

    job_dir, num = hydra_cfg.runtime.output_dir, hydra_cfg.job.num
    overrides = list(hydra_cfg.overrides.task)
    started = time.time()
    sweep_cfg = cfg.get("sweep") or {}
    metric, direction = default_metric(sweep_cfg.get("metric"), sweep_cfg.get("direction", "auto"))

    def record(status: str, error: str = "") -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            write_job(job_dir, job_record(job_dir, num, overrides, status, started, error))
            report(hydra_cfg.sweep.dir, metric, direction)

    ranks_from_submitit()
    try:
        result = train(cfg)
    except TrainingInterrupted as err:
        record("interrupted", str(err))
        if debug:
            raise
        fail(err)  # a sweep stops too: the user asked to stop
    except AlignError as err:
        record("failed", str(err))
        if debug:
            raise
        print(f"align: error: job {num}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        return None
    except KeyboardInterrupt:
        record("interrupted", "interrupted")
        if debug:
            raise
        fail(f"interrupted (nothing saved since the last checkpoint in {job_dir})", 128 + signal.SIGINT)
    except Exception as err:  # a bug: recorded, then Hydra reports it with its traceback
        record("failed", f"{type(err).__name__}: {one_line(str(err))}")
        raise
    record("finished")
    if (
        int(os.environ.get("RANK", "0")) == 0
        and metric not in result.metrics
        and not (metric == "eval_loss" and "loss_last_step" in result.metrics)
    ):
        # A name no job will report: every trial would fail; stop the sweep now, saying so.
        fail(
            f"sweep.metric={metric} is not in this run's summary.json; it has: "
            f"{', '.join(sorted(result.metrics))}"
        )
    return metric_value(result.metrics, metric)


def ranks_from_submitit() -> None:
    """Under submitit (hydra/launcher=submitit_slurm|submitit_local) with several tasks, each task
    is one DDP rank: export RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous as torchrun would,
    so accelerate and align read them the same way. A torchrun launch inside a task is left alone.
    """
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # Every rank keeps seeing all GPUs: accelerate picks cuda:LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _sweep_dir_of(argv: list[str]) -> str | None:
    """The multirun folder named on the command line (`prepare` always adds it), else None."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    for arg in argv:
        if arg.startswith("hydra.sweep.dir="):
            return arg.split("=", 1)[1].strip("'\"")
    return None


def main(argv: list[str]) -> None:
    """Entry for `align train ...`: checks the command line, then Hydra reads it from sys.argv."""
    if {"--help", "-h"} & set(argv) and not any(a.startswith("method=") for a in argv):
        # Help composes the config, and `method` has no default: show it for the demo's method.
        argv = [*argv, "method=dpo"]
    argv = ["quiet=true" if a in ("-q", "--quiet") else a for a in argv]
    argv = schema.normalize_overrides(list(argv))
    try:
        argv = prepare(argv)
    except AlignError as err:
        if wants_debug(argv):
            raise
        fail(err)
    sys.argv = ["align train", *argv]
    try:
        _hydra_entry()
    finally:
        for folder in list(HELD):  # taken by prepare for a run that never reached train()
            unlock_run_folder(folder)
