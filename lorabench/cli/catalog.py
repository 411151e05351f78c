"""`lorabench models` and `gpus`: the preset and GPU catalogs (lorabench.api.model_rows, gpu_rows) as tables."""

from __future__ import annotations

import click

from lorabench.cli.main import CONTEXT, cli, terminal_width
from lorabench.cli.options import format_option
from lorabench.render.formats import fitted_table, gib


@cli.command(context_settings=CONTEXT)
@format_option
def models(fmt):
    """The model presets, with their exact parameter counts.

    \b
    Example:
        lorabench models
        lorabench models -f json
    """
    from lorabench.api import model_rows

    rows = model_rows()
    if fmt in ("table", "markdown"):  # a mixture of experts: how many, each one's width, how many a token takes
        rows = [{**r, "experts": f"{r['num_experts']}x{r['expert_intermediate_size']} top-{r['experts_per_token']}"
                 if r["num_experts"] else ""} for r in rows]
    cols = [("model", "model", str), ("params", "parameters", lambda v: f"{v:,}"),
            ("hidden_size", "d", str), ("intermediate_size", "ffn", lambda v: str(v) if v else "-"),
            ("experts", "experts", str),
            ("layers", "layers", str), ("heads", "heads", str), ("kv_heads", "kv", str),
            ("vocab_size", "vocab", str), ("tied_embeddings", "tied", lambda v: "yes" if v else "no")]
    click.echo(fitted_table(rows, fmt, cols, terminal_width(), keep=2))


@cli.command(context_settings=CONTEXT)
@format_option
def gpus(fmt):
    """The GPU catalog: memory, peak dense bf16 and fp32 FLOP/s, memory bandwidth, interconnect, the server and
    network it comes in (for steps over more GPUs than one server holds), and a dated on-demand price where one
    was found, each with its source.

    \b
    Example:
        lorabench gpus
        lorabench gpus -f json
    """
    from lorabench.api import gpu_rows

    rows = gpu_rows()
    tflops = lambda v: "" if v is None else f"{v / 1e12:,.1f}"  # noqa: E731
    cols = [("gpu", "gpu", str), ("memory_bytes", "GiB", gib), ("bf16_flops", "bf16 TFLOP/s", tflops),
            ("fp32_flops", "fp32", tflops), ("bandwidth_bytes_s", "GB/s", lambda v: f"{v / 1e9:,.0f}"),
            ("interconnect", "link", str), ("interconnect_bytes_s", "link GB/s", lambda v: f"{v / 1e9:,.0f}"),
            ("network_bytes_s", "net GB/s", lambda v: "" if v is None else f"{v / 1e9:,.0f}"),
            ("usd_per_gpu_hour", "$/GPU-h", lambda v: "" if v is None else f"{v:,.2f}")]
    out = fitted_table(rows, fmt, cols, terminal_width(), keep=2)
    if fmt in ("table", "markdown"):
        from lorabench.render.formats import wrap

        width = terminal_width()
        out += "\n\nSources:\n" + "\n".join(wrap(f"  {r['gpu']}: {r['source']}", width, "    ") for r in rows)
        out += "\nServers and networks (link and net GB/s: per GPU, both directions):\n" + "\n".join(
            wrap(f"  {r['gpu']}: {r['gpus_per_node']} per server; {r['node_source']}", width, "    ") for r in rows)
        out += "\nPrices (on-demand, dated; --price to use yours):\n" + "\n".join(
            wrap(f"  {r['gpu']}: {r['price_source']}", width, "    ") for r in rows if r["price_source"])
    click.echo(out)
