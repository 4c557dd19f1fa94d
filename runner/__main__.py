"""`python -m runner [overrides]`: check the command line, run the Hydra app, exit 1 if a sweep job failed."""
import sys

from runner.app import main, sweep_exit_code
from runner.cli import preflight_all
from runner.sweep import new_launch

if __name__ == "__main__":
    preflight_all(sys.argv[1:])
    new_launch()
    main()
    sys.exit(sweep_exit_code())
