"""The report's figures, drawn with matplotlib (Agg) and returned as PNG data URIs for inline HTML.

matplotlib is imported inside the functions so that importing lorabench stays light. Figures are
built with matplotlib.figure.Figure, not pyplot: no global state, nothing left open.
Every function takes the report's rows (plain dicts, see lorabench.report.build) and returns an Image (a
"data:image/png;base64,..." URI and the size to show it at), or None when it has nothing to draw.
Figures are drawn at DPI and shown at 96 px per inch, so a 9 pt legend reads as 9 pt on a screen and
stays sharp on a high-density one. Axes where a length is a size start at zero.
"""

from __future__ import annotations

import base64
import importlib
import io
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from lorabench.safety.signals import signals_deferred

GIB = 1024 ** 3
MIB = 1024 ** 2
DPI = 160
SCREEN_DPI = 96  # CSS pixels per inch
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9.5,
         "ytick.labelsize": 9.5, "legend.fontsize": 9.5}
NOTE_SIZE = 9  # bar-end labels


class Image(NamedTuple):
    """A figure as a PNG data URI and the size to show it at, in CSS pixels."""

    uri: str
    width: int
    height: int


# What stays alive for the whole step (lorabench.estimator.memory.StepParts.persistent_bytes): (row key, label, colour).
PERSISTENT = (
    ("weights_bytes", "weights", "#4c72b0"), ("adapter_bytes", "adapter", "#dd8452"),
    ("optimizer_bytes", "optimizer states", "#c44e52"), ("master_bytes", "master weights", "#8172b3"),
    ("method_state_bytes", "method state", "#937860"),
)
# What a phase adds on top, at its own peak (StepParts.phase_peaks): label and colour.
HELD = {"activations": "#da8bc3", "logits and loss": "#8c8c8c", "gradients": "#55a868",
        "temporaries": "#d9d9d9", "in flight in backward": "#ccb974"}


def label(row: Dict) -> str:
    """A row's name on an axis: the method, with its rank when it has one."""
    return row["method"] if row.get("rank") is None else f"{row['method']} r={row['rank']}"


def _unit(max_bytes: float):
    """(divisor, name): GiB, or MiB when everything is under one GiB (small models, the --d matrices)."""
    return (GIB, "GiB") if max_bytes >= GIB else (MIB, "MiB")


def _by_model(rows: Sequence[Dict]) -> Dict[str, List[Dict]]:
    out: Dict[str, List[Dict]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def _figure(n_panels: int, rows_per_panel: int, width: float = 9.0, per_row: float = 0.3):
    """A Figure with one horizontal-bar panel per model, tall enough for its rows of bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = n_panels * (1.1 + per_row * rows_per_panel) + 0.4
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def to_image(fig) -> Image:
    """The figure as a base64 PNG data URI, with its size at 96 px per inch. It is drawn with SIGINT and SIGTERM
    held back: a Ctrl-C that lands in matplotlib's C++ drawing comes out as a ValueError ("Invalid affine
    transformation matrix", found by the kill harness under load), an internal error instead of exit 130."""
    buf = io.BytesIO()
    with signals_deferred():
        fig.savefig(buf, format="png", dpi=DPI)
    w, h = fig.get_size_inches()
    return Image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
                 round(w * SCREEN_DPI), round(h * SCREEN_DPI))


def _legend_right(ax) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def trainable_params(rows: Sequence[Dict]) -> Optional[Image]:
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
            ax.text(v, y, f" {v:,}", va="center", fontsize=NOTE_SIZE)
        ax.set_xlim(right=max(values) * 30)
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_title(f"{model}: trainable parameters")
    return to_image(fig)


def peak_parts(row: Dict) -> List[Tuple[str, int]]:
    """What is alive together at a row's peak: (label, bytes), summing to its peak_bytes.

    The persistent state is alive in every phase. On top, the phase that holds the peak (StepParts.phase_peaks)
    has: forward, its saved activations; the start of backward, the activations and the logits/loss
    gradients; the optimizer step, the gradients. The rest of that phase's peak is its temporaries (upcast
    logits, cast or dequantized weights, foreach AdamW's copies). A backward peak found later in backward
    (activations being freed as gradients appear) is one part, "in flight in backward".
    """
    parts = [(name, row.get(key) or 0) for key, name, _ in PERSISTENT]
    rest = row["peak_bytes"] - sum(v for _, v in parts)
    act, logits = row.get("activations_bytes") or 0, row.get("logits_bytes") or 0
    grads, phase = row.get("gradients_bytes") or 0, row.get("peak_phase")
    held: List[Tuple[str, int]] = []
    if phase == "forward" and act <= rest:
        held = [("activations", act)]
    elif phase == "backward" and act + logits == rest:
        held = [("activations", act), ("logits and loss", logits)]
    elif phase == "optimizer" and grads <= rest:
        held = [("gradients", grads)]
    other = rest - sum(v for _, v in held)
    held.append(("in flight in backward" if phase == "backward" and other == rest else "temporaries", other))
    return [(n, v) for n, v in parts + held if v > 0]


def memory_components(rows: Sequence[Dict]) -> Optional[Image]:
    """(b) What one step holds at its peak, per method: the persistent state and what the peak phase adds.
    The GPU's size is a dashed line when it is near."""
    groups = _by_model(rows)
    if not groups:
        return None
    colors = {**{name: c for _, name, c in PERSISTENT}, **HELD}
    fig, axes = _figure(len(groups), max(len(g) for g in groups.values()), width=10.0)
    for ax, (model, group) in zip(axes, groups.items()):
        top = max(r["peak_bytes"] for r in group)
        div, unit = _unit(top)
        names = [label(r) for r in group]
        shown = set()
        for y, r in enumerate(group):
            left = 0.0
            for name, value in peak_parts(r):
                ax.barh(y, value / div, left=left, color=colors[name], hatch="//" if name == "temporaries" else None,
                        edgecolor="white" if name != "temporaries" else "#999999", linewidth=0.3,
                        label=None if name in shown else name)
                shown.add(name)
                left += value / div
            ax.text(left, y, f" {r.get('peak_phase') or ''}", va="center", fontsize=NOTE_SIZE, color="#444444")
        gpu_bytes = group[0].get("gpu_memory_bytes")
        right = top * 1.18
        if gpu_bytes and top > 0.2 * gpu_bytes:  # a far-off GPU line would squash the bars
            ax.axvline(gpu_bytes / div, color="crimson", linestyle="--", linewidth=1,
                       label=f"{group[0].get('gpu')} memory")
            right = max(right, gpu_bytes * 1.05)
        ax.set_xlim(0, right / div)
        ax.set_yticks(range(len(group)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{unit} at the step's peak (estimated, one GPU, no sharding)")
        ax.set_title(f"{model}: memory at the peak of one step, by component")
        handles, labels = ax.get_legend_handles_labels()
        order = [n for _, n, _ in PERSISTENT] + list(HELD)
        pairs = sorted(zip(handles, labels), key=lambda hl: order.index(hl[1]) if hl[1] in order else len(order))
        ax.legend([h for h, _ in pairs], [n for _, n in pairs], loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    return to_image(fig)


def measured_vs_estimated(rows: Sequence[Dict]) -> Optional[Image]:
    """(c) Estimated and measured peak memory per benched row; None when nothing was measured."""
    benched = [r for r in rows if r.get("bench_status") is not None]
    if not benched:
        return None
    groups = _by_model(benched)
    fig, axes = _figure(len(groups), max(len(g) for g in groups.values()), per_row=0.5)
    for ax, (model, group) in zip(axes, groups.items()):
        top = max([r.get("bench_estimated_peak_bytes") or 0 for r in group]
                  + [r.get("measured_peak_bytes") or 0 for r in group])
        div, unit = _unit(top)
        ys = list(range(len(group)))
        est = [(r.get("bench_estimated_peak_bytes") or 0) / div for r in group]
        meas = [(r.get("measured_peak_bytes") or 0) / div for r in group]
        ax.barh([y - 0.2 for y in ys], est, height=0.4, color="#8c8c8c", label="estimated")
        ax.barh([y + 0.2 for y in ys], meas, height=0.4, color="#dd8452", label="measured")
        for y, r, m in zip(ys, group, meas):
            if r.get("bench_status") != "ok":
                note = f" {r['bench_status']}"
            elif r.get("peak_error_pct") is not None:
                note = f" {r['peak_error_pct']:+.2f}%"
            else:
                note = ""
            ax.text(max(m, est[y]), y, note, va="center", fontsize=NOTE_SIZE)
        ax.set_xlim(0, top / div * 1.2 if top else 1)
        ax.set_yticks(ys, [label(r) for r in group])
        ax.invert_yaxis()
        probe = ("torch.cuda.max_memory_allocated" if group[0].get("bench_device") == "cuda"
                 else "live-tensor tracker")
        ax.set_xlabel(f"peak {unit} ({probe})")
        layers = group[0].get("bench_layers")
        device = group[0].get("bench_device_name") or group[0].get("bench_device") or "?"
        ax.set_title(f"{model}{f' ({layers} layers)' if layers else ''} on {device}: peak memory; "
                     "labels: estimate vs measured, %")
        _legend_right(ax)
    return to_image(fig)


def step_time(rows: Sequence[Dict]) -> Optional[Image]:
    """(d) Step time per method: the estimate on the chosen GPU, and the measured median when benched."""
    benched = any(r.get("measured_step_ms") is not None for r in rows)
    if benched:
        groups = _by_model([r for r in rows if r.get("bench_status") is not None])
    else:
        groups = _by_model([r for r in rows if r.get("step_ms") is not None])
    if not groups:
        return None
    estimated = not benched or any(r.get("bench_estimated_step_ms") for g in groups.values() for r in g)
    pairs = benched and estimated
    fig, axes = _figure(len(groups), max(len(g) for g in groups.values()), per_row=0.5 if pairs else 0.3)
    for ax, (model, group) in zip(axes, groups.items()):
        ys = list(range(len(group)))
        gpu = group[0].get("gpu")
        if benched:
            # The measured model may be cut to fewer layers: compare with the estimate for that model.
            est = [r.get("bench_estimated_step_ms") or 0 for r in group]
            meas = [r.get("measured_step_ms") or 0 for r in group]
            off = 0.2 if pairs else 0.0
            if pairs:
                ax.barh([y - off for y in ys], est, height=0.4, color="#8c8c8c", label="estimated for the device")
            ax.barh([y + off for y in ys], meas, height=0.4 if pairs else 0.6, color="#dd8452",
                    label="measured (median)")
            for y, r in zip(ys, group):
                note = (f" {r.get('bench_status')}" if r.get("bench_status") != "ok"
                        else f" {meas[y]:,.0f} ms" if meas[y] >= 10 else f" {meas[y]:.2g} ms")
                ax.text(max(est[y], meas[y]), y + off, note, va="center", fontsize=NOTE_SIZE)
            layers = group[0].get("bench_layers")
            device = group[0].get("bench_device_name") or group[0].get("bench_device") or "?"
            title = f"{model}{f' ({layers} layers)' if layers else ''} on {device}: step time"
            if not pairs:
                title += " (no estimate for this device)"
            top = max(est + meas)
            _legend_right(ax)
        else:
            est = [r["step_ms"] for r in group]
            ax.barh(ys, est, color="#4c72b0")
            for y, v, r in zip(ys, est, group):
                mfu = f", {r['mfu']:.0%} MFU" if r.get("mfu") is not None else ""
                ax.text(v, y, (f" {v:,.0f} ms" if v >= 10 else f" {v:.2g} ms") + mfu, va="center",
                        fontsize=NOTE_SIZE)
            title = f"{model}: estimated step time on {gpu}"
            top = max(est)
        ax.set_xlim(0, top * 1.2 if top else 1)
        ax.set_yticks(ys, [label(r) for r in group])
        ax.invert_yaxis()
        ax.set_xlabel("ms per step")
        ax.set_title(title)
    return to_image(fig)


def peak_vs_rank(rows: Sequence[Dict]) -> Optional[Image]:
    """(e) Peak memory against rank for each adapter method, from zero; full fine-tuning and the GPU as
    references."""
    groups = {m: g for m, g in _by_model(rows).items() if any(r.get("rank") is not None for r in g)}
    if not groups:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6 * len(groups)), dpi=DPI, layout="constrained")
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
        high = top
        for name, value, style, color in refs:
            if value <= 3 * top:
                ax.axhline(value / div, color=color, linestyle=style, linewidth=1, label=name)
                high = max(high, value)
            else:
                ax.plot([], [], " ", label=f"{name}: {value / div:,.1f} {unit} (off scale)")
        ax.set_ylim(0, high / div * 1.1)
        ranks = sorted({r["rank"] for r in adapters})
        if len(ranks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(k) for k in ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank" + ("" if len(ranks) > 1 else " (one rank: pass several --rank for a curve)"))
        ax.set_ylabel(f"peak {unit}")
        ax.set_title(f"{model}: peak memory vs rank (estimated)")
        _legend_right(ax)
    return to_image(fig)


# The report's figures, in order: key, name and what a reader needs to read it.
CAPTIONS = {
    "trainable_params": ("Trainable parameters per method", "Log scale: the methods differ by orders of "
                         "magnitude."),
    "memory_components": ("Memory at the peak of one step", "Each bar is what is alive together when the "
                          "step peaks, in the phase named at its end (forward, backward or the optimizer step; "
                          "the others peak lower). Weights, adapters, optimizer states, master weights and "
                          "method state stay for the whole step; activations, logits and gradients are those "
                          "of that phase, and never all at once: activations are freed as backward makes the "
                          "gradients. 'temporaries' (hatched) is the rest of the phase's peak: op workspaces "
                          "such as the upcast logits, weights cast or dequantized for one layer, and foreach "
                          "AdamW's copies of the states. 'in flight in backward' is a peak late in backward, "
                          "with activations being freed and gradients appearing. The bar's end is the peak "
                          "of the memory table; the CUDA runtime comes on top."),
    "measured_vs_estimated": ("Measured vs estimated peak memory", "For the model as measured (cut to the "
                              "bench's layers) on the bench's device; the label is 100 x (estimate - measured) "
                              "/ measured."),
    "step_time": ("Step time per method", "Estimated at the chosen GPU and utilisation, or measured (median "
                  "of the timed steps) beside the estimate for the device the bench ran on, where there is "
                  "one (none for a CPU)."),
    "peak_vs_rank": ("Peak memory vs rank for each adapter method", "From zero: the rank moves the peak "
                     "little next to the weights and activations. Full fine-tuning and the GPU's memory are "
                     "lines when near, named in the legend otherwise."),
}


def render_plots(rows: Sequence[Dict]) -> Dict[str, Optional[Image]]:
    """Every figure of the report (None where a figure has nothing to show). matplotlib (and numpy under it) is
    imported with SIGINT and SIGTERM held back: a Ctrl-C inside a C extension's import can abort the process or
    kill it by the signal after the interruption was reported (the kill harness found both), instead of the exit
    code 130 the report's other moments give."""
    with signals_deferred():
        for module in ("matplotlib.figure", "matplotlib.backends.backend_agg"):  # what _figure imports
            importlib.import_module(module)
        from matplotlib import rc_context

    with rc_context(STYLE):
        return {"trainable_params": trainable_params(rows), "memory_components": memory_components(rows),
                "measured_vs_estimated": measured_vs_estimated(rows), "step_time": step_time(rows),
                "peak_vs_rank": peak_vs_rank(rows)}
