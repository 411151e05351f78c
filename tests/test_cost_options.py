"""cliopts.cost_options: --tokens, --dataset-tokens, --epochs, --price parsed into one CostSetup."""

import click
import pytest
from click.testing import CliRunner

from lorabench.cli.options import cost_options
from lorabench.estimator.cost import CostSetup


@click.command()
@cost_options
def command(cost):
    click.echo(repr(cost))


def run(*args):
    return CliRunner().invoke(command, list(args))


@pytest.mark.parametrize("args, cost", [
    ((), None),
    (("--tokens", "2000000"), CostSetup(tokens=2_000_000)),
    (("--tokens", "2B", "--price", "2.5"), CostSetup(tokens=2 * 10 ** 9, price_per_gpu_hour=2.5)),
    (("--tokens", "1.5T"), CostSetup(tokens=15 * 10 ** 11)),
    (("--dataset-tokens", "500M", "--epochs", "3"), CostSetup(dataset_tokens=5 * 10 ** 8, epochs=3.0)),
    (("--dataset-tokens", "250k"), CostSetup(dataset_tokens=250_000, epochs=1.0)),
    (("--tokens", "10", "--price", "0"), CostSetup(tokens=10, price_per_gpu_hour=0.0)),
])
def test_cost_setup_from_the_command_line(args, cost):
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == repr(cost)


@pytest.mark.parametrize("args, message", [
    (("--tokens", "0"), "must be from 1"),
    (("--tokens", "1e9"), "not an integer"),
    (("--tokens", "9999T"), "must be from 1"),
    (("--tokens", "nan"), "not an integer"),
    (("--epochs", "2"), "--dataset-tokens"),
    (("--price", "3"), "--tokens"),
    (("--tokens", "10", "--dataset-tokens", "5"), "not both"),
    (("--tokens", "10", "--price", "-1"), "must be in"),
    (("--dataset-tokens", "10", "--epochs", "0"), "must be in"),
    (("--tokens", "10", "--price", "inf"), "finite"),
])
def test_bad_values_are_one_line_usage_errors(args, message):
    res = run(*args)
    assert res.exit_code == 2 and message in res.output
