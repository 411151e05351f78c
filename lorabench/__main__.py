"""`python -m lorabench` and the `lorabench` command.

Importing the CLI pulls in click, tabulate and the estimation core; a Ctrl-C that lands during those
imports ends the program like one during a command (exit 130, one line), not with a traceback.
"""

import sys


def main() -> None:
    try:
        from lorabench.cli import cli
    except KeyboardInterrupt:
        sys.stderr.write("lorabench: interrupted.\n")
        sys.exit(130)
    cli(prog_name="lorabench")


if __name__ == "__main__":
    main()
