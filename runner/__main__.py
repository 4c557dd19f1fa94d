"""`python -m runner [overrides]`: Hydra's entry point around `runner.run.run(cfg, run_dir)`."""
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runner.cli import CONF_DIR, fail, preflight
from runner.config import ConfigError


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    from runner.run import run  # after Hydra parsed the command line: `--help` stays fast

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, run_dir)
    except ConfigError as e:
        # nothing was trained: leave no run directory that looks like a run
        if not (run_dir / "metrics.jsonl").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
        fail(str(e))


if __name__ == "__main__":
    preflight(sys.argv[1:])
    main()
