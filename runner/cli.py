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


def validate_jobs(argv: list[str]) -> None:
    """Compose and validate every job (one for a single run, all of a `-m` sweep, however many) before Hydra
    starts, so a bad value is one line and no run directory is created. Each distinct config is composed once
    (with Hydra's node when the run folders are needed) and validated once: jobs that differ only in their seed
    share it (`seed_groups`)."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from runner.config import ConfigError
    from runner.experiment import check_environment
    from runner.spec import check_seed, validate
    from runner.sweep import expect

    # hydra.* and launcher choices do not change a job's config; they need plugins compose() does not load
    task_args = [a for a in argv if "=" in a and not a.startswith("-")
                 and not a.lstrip("+~").startswith(("hydra", "launcher="))]
    try:
        overrides = OverridesParser.create().parse_overrides(task_args)
        jobs = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    except HydraException as e:
        fail(str(e).splitlines()[0])
    if not jobs:  # a sweep over no values: Hydra would launch nothing, print an empty tally and exit 0
        empty = [o.input_line for o in overrides if o.is_sweep_override() and not list(o.sweep_string_iterator())]
        fail(f"{', '.join(empty) or 'the sweep'} has no values: the command has no jobs to run")
    where = (lambda job: f" (in sweep job: {' '.join(job)})") if len(jobs) > 1 else (lambda job: "")
    multirun = any(a in ("-m", "--multirun") for a in argv)
    # where each job's run folder will be: hydra.run/sweep/job settings from the command line count
    folder_args = [a for a in argv if a.lstrip("+~").startswith(("hydra.run.", "hydra.sweep.", "hydra.job."))]
    with_folders = multirun or any(a.lstrip("+").startswith("hydra.run.dir=") for a in folder_args)
    planned: dict = {}  # id(job) -> (its Spec, its run folder or None)
    sweep_dirs: set = set()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for group in seed_groups(jobs):  # [(job, its seed or None)]: the jobs of one config
            job, first_seed = group[0]
            try:
                cfg = compose("config", overrides=[*job, *folder_args] if with_folders else list(job),
                              return_hydra_config=with_folders)
                folders = {}
                if with_folders:
                    for other, seed in group:  # the seed changes only the folder's `seed=N` (and what uses it)
                        if seed is not None:
                            cfg.seed = seed
                        folders[id(other)] = run_folder(cfg, multirun)
                        if multirun:
                            sweep_dirs.add(str(cfg.hydra.sweep.dir))
                    with open_dict(cfg):
                        del cfg["hydra"]
                    if first_seed is not None:
                        cfg.seed = first_seed
                spec = validate(cfg)
                check_environment(spec)  # dataset files, device, credentials, the checkpoint to resume from
                planned[id(job)] = (spec, folders.get(id(job)))
                unresolved = OmegaConf.to_container(cfg, resolve=False)
                reseed = not _interpolates_seed({k: v for k, v in unresolved.items() if k != "seed"})
                for job, seed in group[1:]:  # its seed checked; where the config uses the seed, validated again
                    check_seed(seed)
                    if reseed:
                        other = dataclasses.replace(spec, seed=seed, resolved={**spec.resolved, "seed": seed})
                    else:
                        cfg.seed = seed
                        other = validate(cfg)
                        check_environment(other)
                    planned[id(job)] = (other, folders.get(id(job)))
            except ConfigError as e:
                fail(f"{e}{where(job)}")
            except (HydraException, OmegaConfBaseException) as e:
                lines = [line.strip() for line in str(e).splitlines() if line.strip()]
                fail(f"{' '.join(lines[:2])}{where(job)}")  # Hydra's first two lines: what and the fix
    GlobalHydra.instance().clear()
    if with_folders:  # in the jobs' order: the first job to take a folder keeps it
        taken: dict = {}
        for job in jobs:
            spec, folder = planned[id(job)]
            try:
                check_folder(folder, spec, job, taken.setdefault(folder, job))
            except ConfigError as e:
                fail(f"{e}{where(job)}")
    if multirun:
        expect(sweep_dirs=sorted(sweep_dirs), jobs=len(jobs))


def seed_groups(jobs: list) -> list[list[tuple]]:
    """The jobs grouped by config: jobs whose overrides differ only in a plain `seed=N` share a group, as
    `(job, N)`; any other job is its own group, `(job, None)`. Groups and jobs keep the command's order."""
    import re

    groups: dict = {}
    for job in jobs:
        seeds = [o for o in job if re.fullmatch(r"seed=(0|[1-9][0-9]*)", o)]  # an int to Hydra's grammar
        if len(seeds) == 1:
            key = tuple(o for o in job if o is not seeds[0])
            groups.setdefault(key, []).append((job, int(seeds[0].split("=", 1)[1])))
        else:
            groups[("#", len(groups))] = [(job, None)]
    return list(groups.values())


def _interpolates_seed(node) -> bool:
    """Some value of the unresolved node may interpolate the seed (`${seed}`): then it is not the same config
    for every seed."""
    if isinstance(node, dict):
        return any(_interpolates_seed(v) for v in node.values())
    if isinstance(node, list):
        return any(_interpolates_seed(v) for v in node)
    return isinstance(node, str) and "${" in node and "seed" in node


def run_folder(cfg, multirun: bool) -> Path:
    """The run directory Hydra will give this composed job (with its hydra node)."""
    from runner.sweep import register_resolvers

    register_resolvers()
    if multirun:
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
    return Path(str(cfg.hydra.run.dir))


def check_folder(folder: Path, spec, job, first_job) -> None:
    """Refuse a job whose run folder another job of this command takes, or that holds another run's record (one
    job's record must never replace another's), or that cannot be written."""
    from runner.config import ConfigError
    from runner.run import check_owner
    from runner.rundir import RunDir, unwritable
    from runner.signature import signature

    if first_job is not job:
        mine = dict(o.split("=", 1) for o in job if "=" in o)
        theirs = dict(o.split("=", 1) for o in first_job if "=" in o)
        differ = sorted(k for k in {*mine, *theirs} if mine.get(k) != theirs.get(k)) or ["nothing"]
        raise ConfigError("sweep", message=(
            f"jobs `{' '.join(first_job)}` and `{' '.join(job)}` would share the run folder {folder}: they differ "
            f"only in {', '.join(differ)}, which does not define the experiment (runner/spec.py NON_IDENTITY_KEYS), "
            f"so one record would replace the other; run them as separate commands with another hydra.sweep.dir"))
    # before Hydra replaces its .hydra/config.yaml: the folder's summary, else its checkpoints, else that config
    check_owner(RunDir(folder, create=False), signature(spec.resolved), spec.seed, read_checkpoints=True)
    problem = unwritable(folder)  # else Hydra's log handler (or its .hydra/ files) fails with a traceback
    if problem:
        raise ConfigError("hydra.run.dir", message=f"cannot write the run into {folder}: {problem}")


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
    hydra_composes_each_config_once()


def hydra_composes_each_config_once() -> None:
    """Hydra's sweeper composes every job of a batch before launching any (`validate_batch_is_legal`: does each
    compose?), and the launcher composes each again when it starts it: a 200-seed sweep waited for 200 composes
    before its first job. A seed cannot change whether a config composes, so it composes one job per config
    (`seed_groups`); the launcher still composes every job."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    every_job = BasicSweeper.validate_batch_is_legal
    if getattr(every_job, "per_config", False):
        return

    def validate_batch_is_legal(self, batch) -> None:
        every_job(self, [group[0][0] for group in seed_groups([list(job) for job in batch])])

    validate_batch_is_legal.per_config = True
    BasicSweeper.validate_batch_is_legal = validate_batch_is_legal
