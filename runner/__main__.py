"""`python -m runner [overrides]`: check the command line, run the Hydra app, exit 1 if a sweep job failed."""
import sys

from runner.signals import exit_now, install

if __name__ == "__main__":
    install()  # before the heavy imports: Ctrl-C or SIGTERM at any moment is one line, whatever was inherited
    try:
        from runner.app import main, sweep_exit_code
        from runner.cli import preflight_all
        from runner.cluster import env_rank, rank_argv
        from runner.sweep import new_launch

        sys.argv[1:] = rank_argv(sys.argv[1:])  # under torchrun: one rank of a many-device run (runner/cluster.py)
        main_rank = env_rank()[0] == 0
        if main_rank:  # rank 0 checks and records; the others follow it
            preflight_all(sys.argv[1:])
            new_launch()
        main()
        code = sweep_exit_code(sys.argv[1:]) if main_rank else 0  # a signal while the tally is read: the line has it
    except SystemExit as e:  # Hydra's and our own one-line refusals
        code = e.code
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: one line saying what was recorded, not a traceback
        from runner.signals import ignore

        ignore()  # we are stopping: a second signal (an impatient Ctrl-C) does not cut the line short
        from runner.app import interrupted

        line, code = interrupted(e, sys.argv[1:])
        print(line, file=sys.stderr)
    exit_now(code)  # sys.exit(code), without a second of module teardown
