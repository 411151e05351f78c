"""The README's console examples are what lorabench prints today (scripts/readme_examples.py)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_examples.py"
_spec = importlib.util.spec_from_file_location("readme_examples", SCRIPT)
readme_examples = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_examples)

TEXT = readme_examples.README.read_text()
EXAMPLES = readme_examples.examples(TEXT)


def test_the_readme_has_its_examples():
    # the tour's params and memory answers, fit's table, the 70B full fine-tuning on 8 GPUs: a block dropped
    # from the check by a change in its fence would go unseen
    commands = [e.command.split()[1] for e in EXAMPLES]
    assert commands.count("memory") >= 2 and "params" in commands and commands.count("fit") >= 1


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.command[:60] for e in EXAMPLES])
def test_each_console_example_is_what_lorabench_prints(example):
    assert readme_examples.printed(example) == example.shown, (
        f"README drifted: $ {example.command} (python scripts/readme_examples.py --write)")


def test_a_drifted_example_is_caught():
    e = EXAMPLES[0]
    changed = TEXT[:e.start] + TEXT[e.start:e.end].replace("65,536", "65,000") + TEXT[e.end:]
    assert [d.command for d in readme_examples.drifted(changed)] == [e.command]
