"""Weights & Biases logging: resolved config, metrics per epoch, the summary; offline by default.

Mode: `logger.mode`, else $WANDB_MODE, else "offline" (no account needed; `wandb sync <run_dir>/wandb/offline-run-*`
uploads later). Runs are grouped by the config signature without the seed, so the dashboard shows the band over
seeds; job_type and the first tag are the experiment's name. The run id is derived from the run directory, so
a resumed run continues the same wandb run.
No API key is ever written by us; wandb reads it from its own login or $WANDB_API_KEY.
"""
import os

from runner.logging import Logger


class WandbLogger(Logger):
    def __init__(self, project, entity, mode, tags, run_dir, config, name, group, job_type, run_id):
        import wandb

        self.wandb = wandb
        mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), config=config,
                              name=name, group=group, job_type=job_type, tags=[job_type, *tags], id=run_id,
                              resume="allow", settings=wandb.Settings(console="off", quiet=True))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict) -> None:
        for key in ("status", "final", "best", "passes", "wall_s", "steps"):
            if key in summary:
                self.run.summary[key] = summary[key]
        self.run.finish(exit_code=0 if summary.get("status") in ("completed", "diverged") else 1)
