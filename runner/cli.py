"""Command-line checks that must happen before Hydra starts, and the one-line error exit."""
import shutil
import sys
from pathlib import Path
from typing import NoReturn

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def preflight(argv: list[str]) -> None:
    """Unknown group options (`optimizer=foo`, `+experiment=bar`) get one line listing what exists.

    Hydra's own message for this spans several lines plus a hint about HYDRA_FULL_ERROR.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if "/" in group or "." in group or not (CONF_DIR / group).is_dir() or "(" in value:
            continue  # a value, a hydra/... group or a sweep function: Hydra handles it
        available = options(group)
        if value.startswith("[") and value.endswith("]"):  # several options at once: analysis=[hessian,sharpness]
            value = value[1:-1]
        for option in value.split(","):
            if option.strip() and option.strip() not in available:
                fail(f"unknown {group} '{option.strip()}' (available: {', '.join(available)})")


SUBMITIT_LAUNCHERS = {"slurm", "submitit_local"}


def check_launcher(argv: list[str]) -> None:
    """A launcher whose extra is not installed: say how to install it (Hydra would only say 'not found')."""
    import importlib.util

    for arg in argv:
        key, _, value = arg.partition("=")
        wants_submitit = (key.lstrip("+") == "launcher" and value in SUBMITIT_LAUNCHERS) or (
            key.lstrip("+") == "hydra/launcher" and value.startswith("submitit"))
        if wants_submitit and importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            fail(f"{arg} needs the SLURM extra, which is not installed: pip install -e '.[slurm]'")
        wants_slurm = (key.lstrip("+") == "launcher" and value == "slurm") or (
            key.lstrip("+") == "hydra/launcher" and value == "submitit_slurm")
        if wants_slurm and shutil.which("sbatch") is None:
            fail(f"{arg}: SLURM was not found on this machine (no `sbatch` on PATH); run on a cluster's login "
                 "node, or use launcher=submitit_local to try the same code path locally")


def check_slurm_resources(argv: list[str]) -> None:
    """`launcher=slurm`: the partition exists and one of its nodes can hold a job as requested (GPUs, CPUs,
    memory); otherwise one line now, instead of sbatch's traceback or a job pending for ever (PartitionConfig)."""
    import subprocess

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from runner.sweep import register_resolvers

    register_resolvers()
    launcher_args = [a for a in argv if a.lstrip("+").startswith(("launcher=", "hydra.launcher."))]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        launcher = compose("config", overrides=launcher_args, return_hydra_config=True).hydra.launcher
    GlobalHydra.instance().clear()
    partition = launcher.get("partition")
    cmd = ["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"] + (["-p", str(partition)] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail(f"launcher=slurm: cannot ask SLURM about its partitions ({type(e).__name__}: {e})")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 4]
    if not partition:
        rows = [r for r in rows if r[0].endswith("*")]
    if out.returncode != 0 or not rows:
        known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30).stdout.split()
        fail(f"launcher=slurm: no partition {partition or '(default)'} on this cluster "
             f"(partitions: {', '.join(known) or 'none'}); set hydra.launcher.partition=<name>")
    name = rows[0][0].rstrip("*")
    cpus = max(int(r[1].rstrip("+")) for r in rows)
    mem_gb = max(int(r[2].rstrip("+")) for r in rows) / 1024
    gpus = max(sum(int(g.split(":")[-1].split("(")[0]) for g in r[3].split(",") if g.startswith("gpu"))
               for r in rows) if any("gpu" in r[3] for r in rows) else 0
    want_gpus = int(launcher.get("gpus_per_node") or 0)
    want_cpus = int(launcher.get("cpus_per_task") or 1) * int(launcher.get("tasks_per_node") or 1)
    want_mem = launcher.get("mem_gb")
    if want_gpus > gpus:
        fail(f"launcher=slurm: hydra.launcher.gpus_per_node={want_gpus} but partition {name} has "
             f"{gpus or 'no'} GPUs per node; on a CPU partition set hydra.launcher.gpus_per_node=0")
    if want_cpus > cpus:
        fail(f"launcher=slurm: a job asks {want_cpus} CPUs (hydra.launcher.cpus_per_task x tasks_per_node) but the "
             f"nodes of partition {name} have at most {cpus}: it would pend for ever (PartitionConfig)")
    if want_mem is not None and want_mem > mem_gb:
        fail(f"launcher=slurm: hydra.launcher.mem_gb={want_mem} but the nodes of partition {name} have at most "
             f"{mem_gb:.1f} GB: it would pend for ever (PartitionConfig)")
    limit = _minutes(rows[0][4])
    if limit is not None and launcher.get("timeout_min") and int(launcher.timeout_min) > limit:
        fail(f"launcher=slurm: hydra.launcher.timeout_min={launcher.timeout_min} but partition {name} allows "
             f"{limit} minutes per job: it would pend for ever (PartitionTimeLimit); lower timeout_min (a job past "
             "it is requeued and resumes)")


def _minutes(limit: str) -> int | None:
    """SLURM's time limit (`infinite`, `MM`, `MM:SS`, `HH:MM:SS`, `D-HH:MM:SS`) in whole minutes."""
    if limit.strip() in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


def validate_jobs(argv: list[str], max_jobs: int = 500) -> None:
    """Compose and validate every job (one for a single run, all of a `-m` sweep) before Hydra starts, so a
    bad value is one line and no run directory is created."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from runner.config import ConfigError
    from runner.experiment import check_environment
    from runner.spec import validate
    from runner.sweep import expect

    # hydra.* and launcher choices do not change a job's config; they need plugins compose() does not load
    task_args = [a for a in argv if "=" in a and not a.startswith("-")
                 and not a.lstrip("+~").startswith(("hydra", "launcher="))]
    try:
        overrides = OverridesParser.create().parse_overrides(task_args)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except HydraException as e:
        fail(str(e).splitlines()[0])
    if len(jobs) > max_jobs:
        return  # a huge sweep: Hydra's own per-job composition check still runs
    where = (lambda job: f" (in sweep job: {' '.join(job)})") if len(jobs) > 1 else (lambda job: "")
    multirun = any(a in ("-m", "--multirun") for a in argv)
    # where each job's run folder will be: hydra.run/sweep/job settings from the command line count
    folder_args = [a for a in argv if a.lstrip("+~").startswith(("hydra.run.", "hydra.sweep.", "hydra.job."))]
    folders: dict = {}
    sweep_dirs: set = set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            try:
                spec = validate(compose("config", overrides=list(job)))
                check_environment(spec)  # dataset files, device, credentials, the checkpoint to resume from
                if multirun or any(a.lstrip("+").startswith("hydra.run.dir=") for a in folder_args):
                    with_hydra = compose("config", overrides=[*job, *folder_args], return_hydra_config=True)
                    folder = run_folder(with_hydra, multirun)
                    check_folder(folder, spec, job, folders.setdefault(folder, job))
                    if multirun:
                        sweep_dirs.add(str(with_hydra.hydra.sweep.dir))
            except ConfigError as e:
                fail(f"{e}{where(job)}")
            except (HydraException, OmegaConfBaseException) as e:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                fail(f"{' '.join(lines[:2])}{where(job)}")  # Hydra's first two lines: what and the fix
    GlobalHydra.instance().clear()
    if multirun:
        expect(sweep_dirs=sorted(sweep_dirs), jobs=len(jobs))


def run_folder(cfg, multirun: bool) -> Path:
    """The run directory Hydra will give this composed job (with its hydra node)."""
    from runner.sweep import register_resolvers

    register_resolvers()
    if multirun:
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    return Path(str(cfg.hydra.run.dir))


def check_folder(folder: Path, spec, job, first_job) -> None:
    """Refuse a job whose run folder another job of this command takes, or that holds another run's record:
    one job's record must never replace another's."""
    from runner.config import ConfigError
    from runner.run import check_owner
    from runner.rundir import RunDir
    from runner.signature import signature

    if first_job is not job:
        mine = dict(o.split("=", 1) for o in job if "=" in o)
        theirs = dict(o.split("=", 1) for o in first_job if "=" in o)
        differ = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)) or ["nothing"]
        raise ConfigError("sweep", message=(
            f"jobs `{' '.join(first_job)}` and `{' '.join(job)}` would share the run folder {folder}: they differ "
            f"only in {', '.join(differ)}, which does not define the experiment (runner/spec.py NON_IDENTITY_KEYS), "
            f"so one record would replace the other; run them as separate commands with another hydra.sweep.dir"))
    check_owner(RunDir(folder, create=False), signature(spec.resolved), spec.seed)


def preflight_all(argv: list[str]) -> None:
    """Everything checked before Hydra starts: group options, launcher extras, the config of every job."""
    if any(a in ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve") for a in argv):
        return
    preflight(argv)
    check_launcher(argv)
    if any(a.lstrip("+") in ("launcher=slurm", "hydra/launcher=runner_slurm") for a in argv):
        check_slurm_resources(argv)
    if not any(a.startswith(("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")) for a in argv):
        validate_jobs(argv)  # another primary config: Hydra and run() still validate
