"""`python -m lorabench` and the `lorabench` command.

Importing the CLI pulls in click, tabulate and the estimation core; a Ctrl-C or SIGTERM that lands during
those imports ends the program like one during a command (exit 130 or 143, one line), not with a
traceback or a silent death by the signal. Once the command has ended (its answer out, its files closed)
both are ignored: the interpreter's shutdown (torch's takes a while) cannot turn exit code 0 into a death
by the signal.
"""

import sys

from lorabench.safety import signals


def main() -> None:
    try:
        with signals.sigterm_raises():  # from here on, as in every command (Cli.main installs it again)
            try:
                from lorabench.cli import cli
            except KeyboardInterrupt:
                sys.stderr.write("lorabench: interrupted.\n")
                sys.exit(130)
            except signals.Terminated as exc:
                sys.stderr.write("lorabench: terminated (SIGTERM).\n")
                sys.exit(exc.exit_code)
            cli(prog_name="lorabench")
    finally:
        signals.ignore_signals()


if __name__ == "__main__":
    main()
