"""The report's figures, drawn with matplotlib (Agg) and returned as PNG data URIs for inline HTML.

matplotlib is imported inside the functions so that importing lorabench stays light. Figures are
built with matplotlib.figure.Figure, not pyplot: no global state, nothing left open.
Every function takes the report's rows (plain dicts, see lorabench.report) and returns a
"data:image/png;base64,..." string, or None when it has nothing to draw.
"""

from __future__ import annotations

import base64
import io
from typing import Dict, List, Optional, Sequence

GIB = 1024 ** 3
MIB = 1024 ** 2
DPI = 80

# (row key, legend label) of the memory components, stacked in this order.
COMPONENTS = (
    ("weights_bytes", "weights"), ("adapter_bytes", "adapter"), ("gradients_bytes", "gradients"),
    ("optimizer_bytes", "optimizer"), ("master_bytes", "master"), ("method_state_bytes", "method state"),
    ("activations_bytes", "activations"), ("logits_bytes", "logits"),
)


def label(row: Dict) -> str:
    """A row's name on an axis: the method, with its rank when it has one."""
    return row["method"] if row.get("rank") is None else f"{row['method']} r={row['rank']}"


def _unit(max_bytes: float):
    """(divisor, name): GiB, or MiB when everything is under one GiB (the --d matrices)."""
    return (GIB, "GiB") if max_bytes >= GIB else (MIB, "MiB")


def _by_model(rows: Sequence[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def _figure(n_panels: int, bars_per_panel: int, width: float = 8.0):
    """A Figure with one horizontal-bar panel per model, tall enough for its bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = n_panels * (1.0 + 0.28 * bars_per_panel) + 0.4
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def to_data_uri(fig) -> str:
    """The figure as a base64 PNG data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def trainable_params(rows: Sequence[Dict]) -> Optional[str]:
    """(a) Trainable parameters per method and rank, log scale, one panel per model."""
    groups = _by_model(rows)
    if not groups:
        return None
    fig, axes = _figure(len(groups), max(len(g) for g in groups.values()))
    for ax, (model, group) in zip(axes, groups.items()):
        names = [label(r) for r in group]
        values = [r["trainable_params"] for r in group]
        ax.barh(names, values, color="#4c72b0")
        ax.set_xscale("log")
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
        ax.set_xlim(right=max(values) * 30)
        ax.set_title(f"{model}: trainable parameters (log scale)", fontsize=10)
    return to_data_uri(fig)


def memory_components(rows: Sequence[Dict]) -> Optional[str]:
    """(b) Memory components per method, stacked; the step's peak marked; the GPU's size dashed if near."""
    groups = _by_model(rows)
    if not groups:
        return None
    from matplotlib import colormaps

    colors = colormaps["tab10"].colors
    fig, axes = _figure(len(groups), max(len(g) for g in groups.values()), width=9.5)
    for ax, (model, group) in zip(axes, groups.items()):
        top = max(r["peak_bytes"] for r in group)
        div, unit = _unit(top)
        names = [label(r) for r in group]
        left = [0.0] * len(group)
        for (key, name), color in zip(COMPONENTS, colors):
            values = [(r.get(key) or 0) / div for r in group]
            ax.barh(names, values, left=left, color=color, label=name)
            left = [a + b for a, b in zip(left, values)]
        ax.plot([r["peak_bytes"] / div for r in group], names, "kD", markersize=5, label="peak (over phases)")
        gpu_bytes = group[0].get("gpu_memory_bytes")
        if gpu_bytes and top > 0.2 * gpu_bytes:  # a far-off GPU line would squash the bars
            ax.axvline(gpu_bytes / div, color="crimson", linestyle="--", linewidth=1,
                       label=f"{group[0].get('gpu')} memory")
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        ax.set_title(f"{model}: memory of one step by component", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_data_uri(fig)


def measured_vs_estimated(rows: Sequence[Dict]) -> Optional[str]:
    """(c) Estimated and measured peak memory per benched row; None when nothing was measured."""
    benched = [r for r in rows if r.get("bench_status") is not None]
    if not benched:
        return None
    groups = _by_model(benched)
    fig, axes = _figure(len(groups), 2 * max(len(g) for g in groups.values()))
    for ax, (model, group) in zip(axes, groups.items()):
        ys = list(range(len(group)))
        est = [(r.get("bench_estimated_peak_bytes") or 0) / GIB for r in group]
        meas = [(r.get("measured_peak_bytes") or 0) / GIB for r in group]
        ax.barh([y - 0.2 for y in ys], est, height=0.4, color="#8c8c8c", label="estimated")
        ax.barh([y + 0.2 for y in ys], meas, height=0.4, color="#dd8452", label="measured")
        for y, r, m in zip(ys, group, meas):
            if r.get("bench_status") != "ok":
                note = f" {r['bench_status']}"
            elif r.get("peak_error_pct") is not None:
                note = f" {r['peak_error_pct']:+.1f}%"
            else:
                note = ""
            ax.text(max(m, est[y]), y, note, va="center", fontsize=8)
        ax.set_yticks(ys, [label(r) for r in group])
        ax.invert_yaxis()
        probe = ("torch.cuda.max_memory_allocated" if group[0].get("bench_device") == "cuda"
                 else "live-tensor tracker")
        ax.set_xlabel(f"GiB ({probe})")
        layers = group[0].get("bench_layers")
        device = group[0].get("bench_device_name") or group[0].get("bench_device") or "?"
        ax.set_title(f"{model}{f' ({layers} layers)' if layers else ''} on {device}: peak memory, "
                     f"estimate - measured in %", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_data_uri(fig)


def step_time(rows: Sequence[Dict]) -> Optional[str]:
    """(d) Step time per method: the estimate on the chosen GPU, and the measured median when benched."""
    benched = any(r.get("measured_step_ms") is not None for r in rows)
    if benched:
        groups = _by_model([r for r in rows if r.get("bench_status") is not None])
    else:
        groups = _by_model([r for r in rows if r.get("step_ms") is not None])
    if not groups:
        return None
    fig, axes = _figure(len(groups), (2 if benched else 1) * max(len(g) for g in groups.values()))
    for ax, (model, group) in zip(axes, groups.items()):
        ys = list(range(len(group)))
        gpu, mfu = group[0].get("gpu"), group[0].get("mfu")
        if benched:
            # The measured model may be cut to fewer layers: compare with the estimate for that model.
            est = [r.get("bench_estimated_step_ms") or 0 for r in group]
            meas = [r.get("measured_step_ms") or 0 for r in group]
            ax.barh([y - 0.2 for y in ys], est, height=0.4, color="#8c8c8c", label="estimated for the device")
            ax.barh([y + 0.2 for y in ys], meas, height=0.4, color="#dd8452", label="measured (median)")
            for y, r in zip(ys, group):
                if r.get("bench_status") != "ok":
                    ax.text(max(est[y], meas[y]), y, f" {r.get('bench_status')}", va="center", fontsize=8)
            layers = group[0].get("bench_layers")
            device = group[0].get("bench_device_name") or group[0].get("bench_device") or "?"
            title = f"{model}{f' ({layers} layers)' if layers else ''} on {device}: step time"
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            est = [r["step_ms"] for r in group]
            ax.barh(ys, est, color="#4c72b0")
            for y, v in zip(ys, est):
                ax.text(v, y, f" {v:,.0f} ms" if v >= 10 else f" {v:.2g} ms", va="center", fontsize=8)
            ax.set_xlim(right=max(est) * 1.2)
            title = f"{model}: estimated step time on {gpu} at {mfu:.0%} MFU"
        ax.set_yticks(ys, [label(r) for r in group])
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title(title, fontsize=10)
    return to_data_uri(fig)


def peak_vs_rank(rows: Sequence[Dict]) -> Optional[str]:
    """(e) Peak memory against rank for each adapter method; full fine-tuning and the GPU as references."""
    groups = {m: g for m, g in _by_model(rows).items() if any(r.get("rank") is not None for r in g)}
    if not groups:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.5, 3.2 * len(groups)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(groups), 1, squeeze=False)[:, 0]
    for ax, (model, group) in zip(axes, groups.items()):
        adapters = [r for r in group if r.get("rank") is not None]
        top = max(r["peak_bytes"] for r in adapters)
        div, unit = _unit(top)
        methods: Dict[str, List[Dict]] = {}
        for r in adapters:
            methods.setdefault(r["method"], []).append(r)
        for method, mrows in methods.items():
            mrows = sorted(mrows, key=lambda r: r["rank"])
            ax.plot([r["rank"] for r in mrows], [r["peak_bytes"] / div for r in mrows], "o-", label=method)
        # References: drawn when near the curves, otherwise named in the legend only (off scale).
        refs = [(f"{r['method']} (no rank)", r["peak_bytes"], ":", "black") for r in group if r.get("rank") is None]
        if group[0].get("gpu_memory_bytes"):
            refs.append((f"{group[0].get('gpu')} memory", group[0]["gpu_memory_bytes"], "--", "crimson"))
        for name, value, style, color in refs:
            if value <= 1.5 * top:
                ax.axhline(value / div, color=color, linestyle=style, linewidth=1, label=name)
            else:
                ax.plot([], [], " ", label=f"{name}: {value / div:,.1f} {unit} (off scale)")
        ranks = sorted({r["rank"] for r in adapters})
        if len(ranks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.set_xlabel("rank" + ("" if len(ranks) > 1 else " (one rank: pass several --rank for a curve)"))
        ax.set_ylabel(f"peak {unit}")
        ax.set_title(f"{model}: peak memory vs rank", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return to_data_uri(fig)


# The report's figures, in order: key and caption.
CAPTIONS = {
    "trainable_params": "Trainable parameters per method (log scale)",
    "memory_components": "Memory components per method (GiB): what one training step holds",
    "measured_vs_estimated": "Measured vs estimated peak memory",
    "step_time": "Step time per method",
    "peak_vs_rank": "Peak memory vs rank for each adapter method",
}


def render_plots(rows: Sequence[Dict]) -> Dict[str, Optional[str]]:
    """Every figure of the report as a data URI (None where a figure has nothing to show)."""
    return {"trainable_params": trainable_params(rows), "memory_components": memory_components(rows),
            "measured_vs_estimated": measured_vs_estimated(rows), "step_time": step_time(rows),
            "peak_vs_rank": peak_vs_rank(rows)}
