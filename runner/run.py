"""`run(cfg, run_dir)`: one experiment, read top to bottom: validate, build, resume, train, record.

Importable without Hydra (tests call it with a composed config). Bad input raises `ConfigError` before any
work; failures during training are recorded in summary.json (status failed, with the error's last lines) and
re-raised; the dashboard logger is always finished.
"""
import hashlib
import logging
import os
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from runner.config import ConfigError
from runner.experiment import (Experiment, build, check_environment, latest_checkpoint, load_checkpoint,
                               resolve_device)
from runner.rundir import ANALYSIS, OVERRIDES, RunDir, command_line, device_name, git_state, versions
from runner.signals import Interrupted, deferred, sigterm_as_interrupt  # noqa: F401 (Interrupted: re-exported)
from runner.signature import signature
from runner.spec import validate
from runner.sweep import RunLock
from runner.train import Progress, train
from runner.analysis.schedule import analyze, callbacks as analysis_callbacks

log = logging.getLogger(__name__)


class RunBusy(RuntimeError):
    """Another process holds this run's lock (the same run launched twice at once)."""


class ForeignRunDir(ConfigError):
    """The run folder holds the record of another experiment or seed: never replaced, never resumed."""


def owners(record: RunDir, checkpoint: dict | None = None, read_checkpoints: bool = False
           ) -> list[tuple[str | None, int | None, str]]:
    """Whose run the folder holds, as (signature, seed, where it says so): summary.json's and the checkpoint's
    (`checkpoint`, or with `read_checkpoints` the folder's newest readable one, read only when the summary names
    no owner). When neither names one (a run killed before its first checkpoint, a torn summary, truncated
    checkpoints), `.hydra/config.yaml`'s. Hydra replaces that file when a job starts, so it counts only where the
    runner's own records are silent, and it must be read before Hydra starts (runner/cli.py's pre-flight)."""
    found = []
    summary = record.read_summary() or {}
    if summary.get("signature") is not None or summary.get("seed") is not None:
        found.append((summary.get("signature"), summary.get("seed"), record.summary_path.name))
    if checkpoint is None and read_checkpoints and not found:
        checkpoint, name = _quiet_latest_checkpoint(record)
    else:
        name = "checkpoints/last.pt"
    if checkpoint is not None:
        ckpt_sig = checkpoint.get("signature")
        if ckpt_sig is None and isinstance(checkpoint.get("config"), dict):
            ckpt_sig = signature(checkpoint["config"])
        if ckpt_sig is not None or checkpoint.get("seed") is not None:
            found.append((ckpt_sig, checkpoint.get("seed"), name))
    if not found:
        config = record.read_config()
        if config is not None:
            found.append((_config_signature(config), config.get("seed"), str(record.config_path.relative_to(
                record.path))))
    return found


def _config_signature(config: dict) -> str | None:
    """The signature of a saved `.hydra/config.yaml` (resolved like the job's own config), or None."""
    try:
        return signature(OmegaConf.to_container(OmegaConf.create(config), resolve=True))
    except Exception:  # an interpolation that needs Hydra's runtime: the text as written
        try:
            return signature(config)
        except Exception:
            return None


def _quiet_latest_checkpoint(record: RunDir) -> tuple[dict | None, str]:
    """The newest readable checkpoint (last.pt, else prev.pt) and its name, without log lines: the pre-flight's
    refusal is one line."""
    from runner.experiment import read_checkpoint

    for path in (record.checkpoint_path, record.previous_checkpoint_path):
        if path.is_file():
            try:
                return read_checkpoint(path), f"{path.parent.name}/{path.name}"
            except (ValueError, OSError):
                continue
    return None, ""


def check_owner(record: RunDir, sig: str, seed: int, checkpoint: dict | None = None,
                read_checkpoints: bool = False) -> None:
    """Raise ForeignRunDir when the folder holds another config's or seed's run (`owners`: its summary, its
    checkpoint, else its .hydra/config.yaml)."""
    for other_sig, other_seed, where in owners(record, checkpoint, read_checkpoints):
        if (other_sig is not None and other_sig != sig) or (other_seed is not None and other_seed != seed):
            raise ForeignRunDir("hydra.run.dir", message=(
                f"{record.path} holds another run ({where}: signature {other_sig}, seed {other_seed}; this one: "
                f"signature {sig}, seed {seed}); it is left as it is: choose another hydra.run.dir"))


class RunFailed(RuntimeError):
    """A run that failed after validation; its summary.json (status failed, with the error) is written, unless
    `unrecorded` says why it could not be (a full disk)."""

    def __init__(self, run_dir: Path, error: BaseException, unrecorded: BaseException | None = None):
        self.run_dir, self.unrecorded = Path(run_dir), unrecorded
        super().__init__(_last_line(error))

    @property
    def where(self) -> str:
        """What the one line says about the record: where it is, or that none could be written, and why."""
        if self.unrecorded is None:
            return f"the record: {self.run_dir / 'summary.json'}, traceback in runner.log"
        return f"no record was written in {self.run_dir}: {_last_line(self.unrecorded)}"


def _last_line(error: BaseException) -> str:
    lines = [line for line in (str(error) or type(error).__name__).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}".strip()


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train one configuration and record it in `run_dir`; returns the summary (also in summary.json).

    A run dir that already holds a completed (or diverged) run of this config and seed is skipped: its summary
    is returned with `"skipped": true`. One that holds checkpoints continues from the newest readable one. One
    that holds another config's or seed's run is refused (ForeignRunDir), untouched.
    Errors: ConfigError before any work (nothing recorded); any later failure is recorded in summary.json
    (status failed) and raised as RunFailed; Ctrl-C and SIGTERM are recorded as `interrupted` and re-raised.
    """
    cluster = join_cluster(cfg)
    spec = validate(cfg)
    check_environment(spec)
    device = cluster.device(resolve_device(spec.trainer.device))
    if spec.trainer.devices > cluster.world:  # not in a process group yet: one process per device, each runs this
        from runner.launch import launch

        done = _finished(spec, Path(run_dir))
        return done if done is not None else launch(cfg, run_dir, spec.trainer.devices, device)
    if not cluster.is_main:
        return _follow(spec, device, cluster, Path(run_dir))
    decided = Decision(cluster)  # rank 0 tells the other ranks what it found (skip, busy, train)
    with decided:
        return _run_main(spec, device, cluster, Path(run_dir), decided)


def _finished(spec, run_dir: Path) -> dict | None:
    """The summary of this run when its folder says it is done and nothing is asked of it (no processes to start)."""
    if not run_dir.is_dir():
        return None
    record = RunDir(run_dir, create=False)
    check_owner(record, signature(spec.resolved), spec.seed)
    previous = record.read_summary()
    if previous is not None and previous.get("status") in ("completed", "diverged") and (
            spec.analysis is None or previous["status"] != "completed"):
        return {**previous, "skipped": True}
    return None


def join_cluster(cfg: DictConfig):
    """The process group of this process (runner/cluster.py), joined once; under torchrun (or a SLURM job with one
    task per device) `trainer.devices` is the number of processes, and a different value is refused."""
    import torch

    from runner.cluster import Cluster

    world = int(os.environ.get("WORLD_SIZE", "1"))
    trainer = cfg.get("trainer") or {}
    if world > 1:
        asked = trainer.get("devices", 1)
        if asked not in (1, world):
            raise ConfigError("trainer.devices", message=(
                f"trainer.devices={asked} but this process is one of {world} (WORLD_SIZE, set by torchrun or "
                f"SLURM): leave trainer.devices out, or set it to {world}"))
        if asked != world:
            cfg.trainer.devices = world  # part of the run's identity
    wanted = str(trainer.get("device", "auto"))
    device_type = "cuda" if wanted.startswith("cuda") or (wanted == "auto" and torch.cuda.is_available()) else "cpu"
    return Cluster.from_env(device_type)


class Decision:
    """What rank 0 found in the run folder, sent once to the other ranks before any of them builds: ("train",),
    ("skip", summary) or ("stop", message) (busy, or any error first: the others end quietly, never hang, and rank
    0's error is the one reported)."""

    def __init__(self, cluster):
        self.cluster, self.sent = cluster, False

    def send(self, *decision) -> None:
        if not self.sent:
            self.sent = True
            self.cluster.broadcast(decision)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> None:
        if not self.sent:
            self.send("stop", f"rank 0 stopped before training: {_last_line(error) if error else 'no reason'}")


def _follow(spec, device, cluster, run_dir: Path) -> dict:
    """A rank other than 0: build the same experiment, resume from the same checkpoint, train its part; rank 0
    writes every record."""
    decision = cluster.broadcast(None)
    if decision[0] == "skip":
        return decision[1]
    if decision[0] == "stop":  # rank 0 raised (busy, another run's folder, ...): its error is the run's one line
        return {"status": "stopped", "rank": cluster.rank, "error": decision[1]}
    record = RunDir(run_dir, create=False)
    resume = load_checkpoint(spec.trainer.resume) if spec.trainer.resume else latest_checkpoint(record)
    experiment = build(spec, device, cluster)
    progress = experiment.load_state_dict(resume, "rank 0's checkpoint") if resume is not None else Progress()
    status = train(experiment, progress, _NoSink())
    return {"status": status, "rank": cluster.rank}


class _NoSink:
    """The records of a rank other than 0: rank 0 writes them."""
    def record(self, metrics: dict) -> None: ...
    def checkpoint(self) -> None: ...
    def best(self) -> None: ...


def _run_main(spec, device, cluster, run_dir: Path, decided: "Decision") -> dict:
    resume = load_checkpoint(spec.trainer.resume) if spec.trainer.resume else None
    record = RunDir(run_dir)
    sig = signature(spec.resolved)
    check_owner(record, sig, spec.seed)
    previous = record.read_summary()
    if previous is None and record.summary_path.exists():
        log.warning("%s is unreadable (torn or corrupt): treated as absent; resuming from the checkpoints",
                    record.summary_path)
    lock = RunLock(record.path)
    if previous is not None and previous.get("status") in ("completed", "diverged"):
        decided.send("skip", {**previous, "skipped": True})  # the other ranks have nothing to do
        if spec.analysis is None or previous["status"] != "completed":
            return {**previous, "skipped": True}
        if not lock.acquire():  # analyses added to a finished run: analyse its checkpoint, never retrain
            raise RunBusy(f"{record.path} is being analysed by another process; skipped")
        try:
            with sigterm_as_interrupt():
                return {**previous, **_analyze_finished(spec, device, record), "skipped": True}
        finally:
            lock.release()
    if not lock.acquire():
        raise RunBusy(f"{record.path} is being trained by another process; skipped")
    try:
        with sigterm_as_interrupt():
            where = spec.trainer.resume
            if resume is None:
                resume, where = latest_checkpoint(record), str(record.checkpoint_path)
                if resume is not None:
                    check_owner(record, sig, spec.seed, resume)
            record.remove_stale_temporaries()  # of atomic writes a killed process left (we hold the lock)
            try:
                record.truncate_metrics(resume["progress"]["step"] if resume is not None else 0)
                decided.send("train")
                experiment, progress = _build_and_resume(spec, device, resume, where, record, cluster)
            except (ConfigError, KeyboardInterrupt):
                raise
            except Exception as e:  # after validation: a recorded failure, never a half-made run dir
                raise RunFailed(record.path, e, _write_failure(record, spec, sig, e)) from e
            try:
                return _train_and_record(experiment, progress, resume, record)
            except (KeyboardInterrupt, ConfigError, RunFailed):
                raise
            except Exception as e:  # recorded by _train_and_record
                raise RunFailed(record.path, e) from e
    finally:
        lock.release()


def _analyze_finished(spec, device, record: RunDir) -> dict:
    """The analyses of `spec` on a finished run's checkpoint (`analysis.checkpoint`: last, best, or a path, relative
    to the run directory, of this run's own: another run's is refused in one line; those already done with the
    same settings are skipped); their numbers and errors for the returned summary."""
    from runner.analyze import check_belongs, checkpoint_of
    from runner.experiment import load_run, read_checkpoint

    which = spec.analysis.checkpoint
    path = checkpoint_of(record.path, which)
    if which not in ("last", "best"):
        check_belongs(record.path, path, read_checkpoint(path))
    experiment, progress = load_run(record.path, which, device=device)
    name = str(path.relative_to(record.path)) if path.is_relative_to(record.path) else str(path)
    return analyze_with_dashboard(experiment, progress, spec.analysis, record, name, skip_done=True, spec=spec)


def analyze_with_dashboard(experiment, progress, plan, record: RunDir, checkpoint_name: str, skip_done: bool,
                           spec=None) -> dict:
    """Post hoc: the analyses of `plan` on a rebuilt experiment; when any ran, the run's dashboard run (the same id
    as in training) is continued with them (`replay_dashboard`); when none ran (all done before, or all failed), the
    dashboard is not touched (the dashboard of `spec`, the command's, else of the checkpoint's config). Returns
    {"analysis": metrics, "analysis_errors": errors}."""
    from runner.analysis.schedule import analyze

    from runner.logging import Logger

    class Ran(Logger):  # which analyses ran; the dashboard gets them from their files afterwards
        def __init__(self):
            self.names = []

        def log_analysis(self, name, metrics, figures, step) -> None:
            self.names.append(name)

    ran = Ran()
    metrics, errors = analyze(experiment, progress, plan, record.path / ANALYSIS, checkpoint_name=checkpoint_name,
                              skip_done=skip_done, logger=ran, post_hoc=True)
    if ran.names:
        replay_dashboard(spec or experiment.spec, record)
    return {"analysis": metrics, "analysis_errors": errors}


def replay_dashboard(spec, record: RunDir) -> None:
    """Continue the run's dashboard run (same id) with the whole run directory: the records of metrics.jsonl at
    their steps, every analysis in analysis/ (figures as images in the row of the step it was made at, the
    checkpoint's; numbers as summary values), then summary.json. An offline wandb run cannot be resumed in place
    (each launch writes its own offline-run-* folder, and `wandb sync` keeps the last one of an id), so the new
    folder holds everything, as a resumed training's does; an online run that resumed skips what the server has."""
    from runner.rundir import read_json

    if spec.logger.name == "none":
        return
    try:
        logger = dashboard(spec, record)
    except Exception as e:  # e.g. an online dashboard without network here: the files are what counts
        log.warning("dashboard not reachable (%s); the analysis files are written all the same",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return
    summary = record.read_summary()
    try:
        analyses = []
        for path in sorted((record.path / ANALYSIS).glob("*.json")):
            found = read_json(path) or {}
            if isinstance(found.get("step"), int) and isinstance(found.get("name"), str):
                figures = [record.path / ANALYSIS / name for name in found.get("figures") or []]
                analyses.append((found["step"], found["name"], found.get("scalars") or {},
                                 [f for f in figures if f.is_file()]))
        analyses.sort(key=lambda a: a[0])

        def flush(before: float) -> None:
            while analyses and analyses[0][0] < before:
                step, name, scalars, figures = analyses.pop(0)
                logger.log_analysis(name, scalars, figures, step)

        for metrics in record.read_metrics():
            flush(metrics["step"])  # analyses at a step are logged after that step's records (the same row)
            logger.log(metrics, step=metrics["step"])
        flush(float("inf"))
    except Exception as e:
        log.warning("the dashboard did not take the analyses (%s); the analysis files are written all the same",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    finally:
        logger.finish(summary) if summary is not None else logger.close()


def _build_and_resume(spec, device, resume: dict | None, where: str, record: RunDir, cluster
                      ) -> tuple[Experiment, Progress]:
    experiment = build(spec, device, cluster)
    progress = Progress()
    if resume is not None:
        progress = experiment.load_state_dict(resume, where)
        total = spec.trainer.total_steps(len(experiment.task.train))
        if spec.trainer.resume and progress.step >= total:
            raise ConfigError("trainer.epochs", message=(
                f"trainer.resume={spec.trainer.resume} is at epoch {progress.epoch} (step {progress.step}) and this "
                f"config trains {total} steps: nothing left to train; raise trainer.epochs (or trainer.steps)"))
        source = Path(where)  # trainer.resume may name a run dir: the checkpoint in it
        source = RunDir(source, create=False).checkpoint_path if source.is_dir() else source
        log.info("resuming from %s (epoch %d, step %d) into %s", source, progress.epoch, progress.step, record.path)
    return experiment, progress


def _write_failure(record: RunDir, spec, sig: str, error: BaseException) -> OSError | None:
    """The failed record of a run that broke before training; returns the error that kept it from disk, if any."""
    _log_traceback(record, error)
    return _write_record(record, {"status": "failed", "final": {}, "best": {}, "seed": spec.seed,
                                  "experiment": spec.experiment, "signature": sig,
                                  "error": "".join(traceback.format_exception(error)[-3:]).strip(),
                                  "versions": versions(), "git": git_state(), "command": command_line()})


def _write_record(record: RunDir, summary: dict) -> OSError | None:
    """summary.json (a signal arriving meanwhile waits for it); returns the OSError that kept it from disk (a full
    disk), else None: the caller's line must not name a record that is not there."""
    try:
        with deferred():
            record.write_summary(summary)
    except OSError as e:
        log.error("summary.json could not be written in %s: %s", record.path, _last_line(e))
        return e
    return None


def _log_traceback(record: RunDir, error: BaseException) -> None:
    """The whole traceback into runner.log (stderr gets one line); on a full disk it is left out."""
    try:
        with open(record.path / "runner.log", "a") as f:
            f.write("".join(traceback.format_exception(error)))
    except OSError:
        pass


class RunSink:
    """The loop's results into the run directory and the dashboard."""

    def __init__(self, record: RunDir, logger, experiment: Experiment, progress: Progress):
        self.rundir, self.logger, self.experiment, self.progress = record, logger, experiment, progress

    def record(self, metrics: dict) -> None:
        self.rundir.log(metrics)
        self.logger.log(metrics, step=metrics["step"])
        log.info("step %d epoch %s %s", metrics["step"], metrics["epoch"], " ".join(
            f"{k}={v:.4g}" for k, v in metrics.items() if "/" in k and isinstance(v, float)))

    def checkpoint(self) -> None:
        self.rundir.save_checkpoint(self.experiment.state_dict(self.progress))

    def best(self) -> None:
        self.rundir.save_best_checkpoint(self.experiment.state_dict(self.progress))


def dashboard(spec, record: RunDir):
    """The run's dashboard logger; its run id is derived from the run directory, so a resumed run, and a post-hoc
    analysis of it, continue the same dashboard run."""
    sig = signature(spec.resolved)
    run_id = f"{sig}-s{spec.seed}-{hashlib.sha1(str(record.path.resolve()).encode()).hexdigest()[:8]}"
    return spec.logger.build(run_dir=record.path, config=spec.resolved,
                             name=_overrides(record.path) or spec.experiment, group=f"{spec.experiment}-{sig}",
                             job_type=spec.experiment, run_id=run_id)


def _train_and_record(experiment: Experiment, progress: Progress, resume: dict | None, record: RunDir) -> dict:
    spec, device, sig = experiment.spec, experiment.device, experiment.signature
    logger = dashboard(spec, record)
    if resume is not None:  # the dashboard gets the whole history: the records before the checkpoint again
        for metrics in record.read_metrics():
            logger.log(metrics, step=metrics["step"])
    git = git_state(diff_to=record.path / "git.diff")

    def summary(status: str, error: str | None = None) -> dict:
        return {"status": status, "final": progress.final, "best": progress.best, "seed": spec.seed,
                "epochs": progress.epoch, "steps": progress.step, "passes": progress.passes,
                "passes_per_step": experiment.capabilities.passes_per_step,
                "passes_per_step_measured": round(progress.passes / progress.step, 4) if progress.step else None,
                "skipped_steps": getattr(experiment.optimizer, "skipped_steps", 0),
                "forward_only_passes": progress.forward_passes,
                "optimizer_stats": experiment.optimizer.summary_stats()
                if hasattr(experiment.optimizer, "summary_stats") else {},
                "wall_s": round(progress.wall_s, 3), "error": error, "experiment": spec.experiment,
                "signature": sig, "resumed_from_epoch": resume["progress"]["epoch"] if resume else None,
                "deterministic": spec.trainer.deterministic, "versions": versions(), "git": git,
                "device": device.type, "device_name": device_name(device), "command": command_line(),
                **experiment.task.info}

    result, metrics, errors, failure, unrecorded = None, {}, {}, None, None
    try:
        sink = RunSink(record, logger, experiment, progress)
        status = train(experiment, progress, sink, callbacks=analysis_callbacks(experiment, record.path / ANALYSIS))
        if status == "completed" and spec.analysis is not None and spec.analysis.at_end:
            # after the final checkpoint: an analysis that fails or is interrupted never costs the training
            metrics, errors = analyze(experiment, progress, spec.analysis, record.path / ANALYSIS, logger=logger)
            if metrics:
                sink.record({"step": progress.step, "epoch": progress.epoch, **metrics})
                progress.final.update(metrics)
        result = summary(status)
        if spec.analysis is not None and status == "completed":
            result["analysis"] = metrics
        if errors:
            result["analysis_errors"] = errors
    except KeyboardInterrupt as e:
        result = summary("interrupted", str(e) or "KeyboardInterrupt")
        raise
    except SystemExit as e:  # submitit exits a preempted or timed-out SLURM job after requeueing it
        result = summary("interrupted", f"SystemExit({e.code}): stopped by the launcher (a preempted or timed-out "
                                        "SLURM job is requeued and resumes from its checkpoint)")
        raise
    except BaseException as e:
        result = summary("failed", "".join(traceback.format_exception(e)[-3:]).strip())
        _log_traceback(record, e)
        failure = e
    finally:
        if result is not None:
            unrecorded = _finish(record, logger, result)
    if failure is not None:  # recorded (or said why not): RunFailed knows which, for the one line
        if isinstance(failure, Exception) and not isinstance(failure, ConfigError):
            raise RunFailed(record.path, failure, unrecorded) from failure
        raise failure
    if unrecorded is not None:  # trained, but the record is not on disk (a full disk): a failure, said as such
        raise RunFailed(record.path, unrecorded, unrecorded) from unrecorded
    return result


def _finish(record: RunDir, logger, result: dict) -> OSError | None:
    """The record, then the dashboard's end; returns the OSError that kept the record from disk, if any."""
    unrecorded = _write_record(record, result)
    logger.finish(result)
    return unrecorded


def failed_summary(run_dir: str | Path, error: str, status: str = "failed") -> None:
    """summary.json for a job that failed before training started (in a sweep, so the report counts it)."""
    RunDir(run_dir).write_summary({"status": status, "final": {}, "best": {}, "error": error,
                                   "versions": versions(), "git": git_state(), "command": command_line()})


def _overrides(run_dir) -> str:
    """The command-line overrides Hydra saved for this run, as one string (the wandb run name)."""
    path = Path(run_dir) / OVERRIDES
    if not path.exists():
        return ""
    return " ".join(str(o) for o in OmegaConf.load(path))
