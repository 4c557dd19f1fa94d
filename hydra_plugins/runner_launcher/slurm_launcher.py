"""SLURM through submitit, with every job accounted for: `launcher=slurm` (`hydra/launcher=runner_slurm`).

hydra-submitit-launcher collects the array's results with `job.results()`, so one cancelled task (`scancel
<array>_1`) raises submitit's UncompletedJobError in the launching process and ends the whole command with a
traceback: no tally, and the cancelled run has no summary.json. This subclass collects each job on its own: a job
that SLURM ended without a result (cancelled, node failure, out of memory, the time limit after the last requeue)
gets a summary.json with status `cancelled` and SLURM's state as the error (unless the job recorded its own
status first), a line in the sweep's launch log, and the tally counts it as failed.

Everything else is hydra-submitit-launcher's: job arrays, requeue on preemption and time limits (the runner
resumes from checkpoints/last.pt), the parameters of `conf/launcher/slurm.yaml`.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore

log = logging.getLogger(__name__)

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
except ImportError:  # the slurm extra is not installed: runner/cli.py says how to install it
    SlurmLauncher = None

if SlurmLauncher is not None:

    class RunnerSlurmLauncher(SlurmLauncher):
        def launch(self, job_overrides, initial_job_idx):
            import submitit
            from hydra.core.utils import JobReturn, JobStatus

            collected = {}
            original_results = submitit.core.core.Job.results

            def results(job):  # noqa: ANN001  (one job's results, never raising for an ended job)
                try:
                    return original_results(job)
                except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as e:
                    collected[job.job_id] = e
                    return [None]

            submitit.core.core.Job.results = results
            try:
                returns = super().launch(job_overrides, initial_job_idx)
            finally:
                submitit.core.core.Job.results = original_results
            fixed = []
            for overrides, job_return in zip(job_overrides, returns):
                if job_return is not None:
                    fixed.append(job_return)
                    continue
                fixed.append(self._ended_without_result(list(overrides), collected, JobReturn, JobStatus))
            return fixed

        def _ended_without_result(self, overrides, collected, JobReturn, JobStatus):
            """Record a job SLURM ended without a result (cancelled, failed node, ...) and return its JobReturn."""
            from runner.rundir import RunDir
            from runner.sweep import record_job

            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
            run_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
            error = "; ".join(f"SLURM job {job_id}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                              for job_id, e in collected.items()) or "ended by SLURM without a result"
            state = _slurm_state(collected)
            record = RunDir(run_dir)
            previous = record.read_summary() or {}
            if previous.get("status") not in ("completed", "diverged", "failed", "cancelled"):
                record.write_summary({"status": "cancelled", "final": previous.get("final", {}),
                                      "best": previous.get("best", {}), "seed": sweep_config.get("seed"),
                                      "error": f"{state}: {error}" if state else error})
            record_job(sweep_dir, run_dir, "cancelled", error)
            log.error("cancelled: %s (%s)", run_dir, state or error)
            return JobReturn(overrides=overrides, cfg=sweep_config, hydra_cfg=None, working_dir=str(run_dir),
                             task_name="runner", status=JobStatus.COMPLETED, _return_value="cancelled")

    def _slurm_state(collected) -> str:
        """SLURM's own word for how the jobs ended (`CANCELLED by 0`, `NODE_FAIL`, ...), from sacct."""
        import subprocess

        ids = ",".join(str(job_id) for job_id in collected)
        if not ids:
            return ""
        try:
            out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids, "-o", "JobID,State"], capture_output=True,
                                 text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        states = sorted({line.split("|", 1)[1] for line in out.stdout.splitlines() if "|" in line})
        return ", ".join(states)

    @dataclass
    class RunnerSlurmConf(SlurmQueueConf):
        _target_: str = "hydra_plugins.runner_launcher.slurm_launcher.RunnerSlurmLauncher"

    ConfigStore.instance().store(group="hydra/launcher", name="runner_slurm", node=RunnerSlurmConf,
                                 provider="runner")
