"""The `lorabench` command: thin Click commands that parse options, call lorabench.api's answers (or the
report and the bench) and print them through lorabench.render. Nothing else.

The estimation commands (params, memory, fit, models, gpus) never import torch.
"""

from lorabench.cli.main import cli
from lorabench.cli.estimates import fit, memory, params
from lorabench.cli.catalog import gpus, models
from lorabench.cli.reporting import report
from lorabench.cli.measuring import bench

__all__ = ["cli", "params", "memory", "fit", "models", "gpus", "report", "bench"]
