"""The README's console blocks are what lorabench prints: check them, or write them anew.

A console block is a ```console fence whose lines start with `$ lorabench ...` (a trailing backslash continues a
command). A block with one command and the lines after it is an example: the lines are exactly what the command
prints (stdout and stderr as a terminal shows them) at 100 columns; a last line "..." shows the first lines
only. A block of several commands and no output lists commands (bench runs, which measure this machine) and
is left alone.

    python scripts/readme_examples.py           # exit 1 and name each block that drifted
    python scripts/readme_examples.py --write   # run each example again and put its output in the README

tests/test_readme.py runs the check.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import List, NamedTuple

README = Path(__file__).resolve().parents[1] / "README.md"
WIDTH = 100
FENCE = re.compile(r"^```console\n(.*?)^```\n", re.S | re.M)


class Example(NamedTuple):
    start: int  # the block's text, as offsets into the README
    end: int
    command: str  # as typed, continuations joined
    shown: str  # the lines after it, as the README has them


def examples(text: str) -> List[Example]:
    """The README's console blocks that show a command and its output."""
    found = []
    for m in FENCE.finditer(text):
        lines = m.group(1).splitlines()
        commands = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        if len(commands) != 1 or commands[0] != 0:
            continue
        end = 0
        while lines[end].endswith("\\"):
            end += 1
        command = " ".join(line.rstrip("\\").strip() for line in lines[:end + 1])[2:]
        shown = "\n".join(lines[end + 1:])
        if shown.strip():
            found.append(Example(m.start(1), m.end(1), command, shown))
    return found


def run(command: str) -> str:
    """What `command` prints at WIDTH columns: stdout and stderr in the order a terminal shows them."""
    from click.testing import CliRunner

    from lorabench.cli import cli

    words = shlex.split(command)
    assert words[0] == "lorabench", command
    result = CliRunner().invoke(cli, words[1:], env={"COLUMNS": str(WIDTH)})
    assert result.exit_code in (0, 1), (command, result.output)
    return result.output.rstrip("\n")


def printed(e: Example) -> str:
    """What e's command prints, cut as the README cuts it (a last line "...": that many lines first)."""
    out = run(e.command)
    lines = e.shown.split("\n")
    if lines[-1] == "...":
        return "\n".join(out.split("\n")[:len(lines) - 1] + ["..."])
    return out


def drifted(text: str) -> List[Example]:
    return [e for e in examples(text) if printed(e) != e.shown]


def write(text: str) -> str:
    """The README with every example's output printed anew."""
    for e in reversed(examples(text)):
        head = text[e.start:e.end].split("\n")
        command_lines = next(i for i, line in enumerate(head) if not line.endswith("\\")) + 1
        block = "\n".join(head[:command_lines]) + "\n" + printed(e) + "\n"
        text = text[:e.start] + block + text[e.end:]
    return text


def main(argv: List[str]) -> int:
    text = README.read_text()
    if "--write" in argv:
        README.write_text(write(text))
        print(f"wrote {len(examples(text))} examples into {README}")
        return 0
    bad = drifted(text)
    for e in bad:
        print(f"drifted: $ {e.command}")
    print(f"{len(examples(text)) - len(bad)} of {len(examples(text))} README examples are what lorabench prints")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
