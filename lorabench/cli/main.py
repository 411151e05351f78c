"""The `lorabench` group: one-line errors and exit codes, notes on stderr, and what every command shares.
The commands (lorabench.cli.estimates, catalog, reporting, measuring) register on it."""

from __future__ import annotations

import os
import re
import shutil
import sys
import traceback

import click

from lorabench import __version__
from lorabench.safety import signals
from lorabench.errors import LorabenchError
from lorabench.gpus import get_gpu, gpu_note
from lorabench.cli.stdout import STDOUT, whole_stdout

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# Exit codes: 0 done; 1 a --check failed, nothing was measured, a bench case failed to run (FAILED: a rank
# died, a timeout), or an output (a file, or stdout: a full disk, `ulimit -f`) could not be written whole;
# 2 bad input (one line on stderr); 130 SIGINT; 143 SIGTERM; 70 a bug in lorabench (please report).
EXIT_INTERNAL = 70
# Bench row statuses of a run that went wrong. "oom" and "skipped" are answers about the setup (it does not
# fit, it cannot run here): exit 0, unless --check.
FAILED = ("failed", "timeout")


_LONG_WORD = re.compile(r"\S{121,}")
# click >= 8.2 raises this for a group run without a command; older clicks print the help themselves
_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())


def one_line(text: str) -> str:
    """A message fit for one terminal line: control characters escaped (a newline or an escape sequence
    in a user's value cannot break the line or clear the screen), words over 120 characters shortened in
    the middle (a 400-character --model, a 300-digit number), keeping a path's start and its file name."""
    text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return _LONG_WORD.sub(lambda m: f"{m[0][:50]}...{m[0][-50:]} ({len(m[0]):,} characters)", text)


class Cli(click.Group):
    """A group whose user errors are one line on stderr and exit code 2, never a traceback; SIGINT and
    SIGTERM end any command with 130 and 143; an answer that stdout cannot take whole is an error, exit 1."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if sys.stdout is None:  # `lorabench ... >&-`: Python sets it to None and click would print nothing
            click.echo("lorabench: error: standard output is closed; there is nowhere to write the answer.",
                       err=True)
            if standalone_mode:
                sys.exit(1)
            return 1
        try:
            with signals.sigterm_raises(), whole_stdout():
                try:
                    rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
                finally:  # what is still buffered fails here, not silently at exit
                    sys.stdout.flush()
            # without standalone mode click returns ctx.exit()'s code instead of raising it
            code = rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("lorabench: interrupted.", err=True)
            code = 130
        except signals.Terminated as exc:
            click.echo("lorabench: terminated (SIGTERM).", err=True)
            code = exc.exit_code
        except _NO_ARGS as exc:  # plain `lorabench` (or `lorabench COMMAND` of a group): its help
            click.echo(exc.ctx.get_help() if exc.ctx is not None else self.get_help(click.Context(self)))
            code = 0
        except click.ClickException as exc:
            click.echo(f"lorabench: error: {one_line(exc.format_message())}", err=True)
            code = 2 if isinstance(exc, click.UsageError) else exc.exit_code
        except LorabenchError as exc:
            click.echo(f"lorabench: error: {one_line(exc)}", err=True)
            code = 2
        except BrokenPipeError:
            code = 0
        except OSError as exc:  # stdout on a full disk and the like: not a bug, not bad input
            where = getattr(exc, "filename", None)
            if where == STDOUT:
                click.echo(one_line(f"lorabench: error: cannot write the whole output to {STDOUT}: "
                                    f"{exc.strerror or exc}; what it got is cut short."), err=True)
            else:
                click.echo(one_line(f"lorabench: error: {exc.strerror or exc}{f': {where}' if where else ''}."),
                           err=True)
            code = 1
        except Exception as exc:  # a bug: one line, the traceback on request
            if os.environ.get("LORABENCH_DEBUG"):
                traceback.print_exc()
            click.echo(one_line(f"lorabench: internal error: {type(exc).__name__}: {str(exc)[:200]} (please report "
                                "it; LORABENCH_DEBUG=1 shows the traceback)."), err=True)
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code


def note(text: str) -> None:
    """A note on stderr: seen in every format, never inside the JSON or CSV on stdout."""
    if text:
        click.echo(f"lorabench: note: {one_line(text)}", err=True)


@click.group(cls=Cli, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version")
def cli():
    """What fine-tuning a model costs, before you rent the GPUs.

    \b
    Example:
        lorabench params --model llama-3-8b --method lora --rank 8
        lorabench memory --model llama-3-70b --method all --gpu H100-80GB
    """


def pick_gpu(name):
    """The catalog GPU a --gpu names (None for none), with a note when the name was one that several share."""
    if name is None:
        return None
    note(gpu_note(name))
    return get_gpu(name)


def each_model(specs, methods, methods_from_all, ranks, targets):
    """(spec, the methods it can take) per model, notes on stderr (api.each_model)."""
    from lorabench import api

    return api.each_model(specs, methods, methods_from_all, ranks, targets, note)


def terminal_width() -> int:
    """The terminal's width ($COLUMNS first); 100 when the output is not a terminal."""
    return shutil.get_terminal_size((100, 24)).columns


def _blocks(texts) -> str:
    return "\n\n".join(t for t in texts if t)
