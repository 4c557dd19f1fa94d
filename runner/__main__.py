"""`python -m runner [overrides]`: check the command line, run the Hydra app, exit 1 if a sweep job failed."""
import sys

from runner.app import main, sweep_exit_code
from runner.cli import preflight_all
from runner.sweep import new_launch

if __name__ == "__main__":
    preflight_all(sys.argv[1:])
    new_launch()
    try:
        main()
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the run is recorded `interrupted`; one line, not a traceback
        signal_name = str(e) or "Ctrl-C"
        print(f"interrupted ({signal_name}): the run is recorded as interrupted; the same command resumes it",
              file=sys.stderr)
        sys.exit(143 if signal_name == "SIGTERM" else 130)
    sys.exit(sweep_exit_code(sys.argv[1:]))
