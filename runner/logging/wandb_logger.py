"""Weights & Biases logging: resolved config, metrics per epoch, the summary; offline by default.

Mode: `logger.mode`, else $WANDB_MODE, else "offline" (no account needed; `wandb sync <run_dir>/wandb/offline-run-*`
uploads later). Runs are grouped by the config signature without the seed, so the dashboard shows the band over
seeds; job_type and the first tag are the experiment's name. The run id is derived from the run directory, so
a resumed run continues the same wandb run; on resume runner.run logs the records before the checkpoint again
first, so each launch's offline folder holds the whole history up to its end (a killed launch's folder only
what wandb-core had written when it died, with SIGKILL often nothing). A post-hoc analysis that did something
(`python -m runner.analyze`, or `analysis=...` on a finished run) does the same (runner.run.replay_dashboard):
its folder holds the history, every analysis's figures in the row of its checkpoint's step and numbers in the
summary, and the run's summary; one that did nothing (done before) starts no wandb run at all. Offline, wandb
cannot resume a run in place (`resumed` stays false; `wandb sync` keeps the last folder of an id), hence the
replays; online, a resumed run skips the rows the server already has.
No API key is ever written by us; wandb reads it from its own login or $WANDB_API_KEY.

Offline (and disabled) means no network at all. wandb 0.31.0 has no Sentry and no version check, but it has
usage telemetry that runs even for an offline run: its process-wide settings come from the environment, not from
`wandb.init(mode=...)`, so without $WANDB_MODE they are online and its OpenTelemetry exporter
(wandb.analytics) looks up and POSTs to `<base_url>/sdk/otel/v1/metrics` at exit; and the wandb-core service
collects its own "observability" analytics unless started with --no-observability. So, before wandb starts
its service, a run that is not online sets
- `WANDB_ERROR_REPORTING=false` in os.environ: turns wandb's telemetry recorder into a no-op and makes wandb
  start wandb-core with --no-observability (process-wide, inherited by child processes; harmless to a later
  online run, which only loses wandb's own telemetry);
- `wandb.setup(settings=wandb.Settings(mode=mode))`: the process-wide settings get the run's mode, so no
  telemetry exporter is built at all (also done for online runs, so a sweep's jobs each get their own mode).
"""
import os

from runner.logging import Logger


class WandbLogger(Logger):
    def __init__(self, project, entity, mode, tags, run_dir, config, name, group, job_type, run_id):
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        if mode != "online":
            os.environ["WANDB_ERROR_REPORTING"] = "false"  # before wandb starts wandb-core (see above)
        import wandb

        self.wandb = wandb
        wandb.setup(settings=wandb.Settings(mode=mode))
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), config=config,
                              name=name, group=group, job_type=job_type, tags=[job_type, *tags], id=run_id,
                              resume="allow", settings=wandb.Settings(console="off", quiet=True))

    def _behind(self, step: int) -> bool:
        """An online run that resumed has the rows before `starting_step` already (wandb drops older steps)."""
        return bool(self.run.resumed) and step < self.run.starting_step

    def log(self, metrics: dict, step: int) -> None:
        if not self._behind(step):
            self.run.log(metrics, step=step)

    def log_analysis(self, name: str, metrics: dict, figures: list, step: int | None) -> None:
        for key, value in metrics.items():
            self.run.summary[key] = value
        if figures:  # in the row of `step`, after its record; the next row if None or an online run is past it
            images = {f"{name}/{p.stem.removeprefix(name).strip('_') or 'figure'}": self.wandb.Image(str(p))
                      for p in figures}
            self.run.log(images) if step is None or self._behind(step) else self.run.log(images, step=step)

    def close(self) -> None:
        self.run.finish(exit_code=0)

    def finish(self, summary: dict) -> None:
        for key in ("status", "final", "best", "passes", "wall_s", "steps"):
            if key in summary:
                self.run.summary[key] = summary[key]
        self.run.finish(exit_code=0 if summary.get("status") in ("completed", "diverged") else 1)
