"""What a report says: measured fields paired with the estimate of the same thing, settings that name the
device the bench ran on, tables per model in readable units, the methods a model refuses left out with a
note, figures that stack only what coexists (from zero, legible), and committed reports that re-render from
their own results.json."""

import base64
import json
import struct
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.report import build as report, plots, text as reporttext
from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.estimator.rows import memory_rows
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.render.formats import gpus_needed_text
from lorabench.models.presets import from_name
from lorabench.models.spec import from_dimension

REPO = Path(__file__).resolve().parent.parent
MIB = 2 ** 20
GIB = 2 ** 30


def run(*args):
    return CliRunner().invoke(cli, list(args))


def _bench_row(device="cpu", **over):
    """A merged report row for one measured case, with the bench's own estimate for what forward leaves
    alive (100 MiB) differing from its saved activations alone (60 MiB), as on every real row."""
    row = {"model": "tiny", "method": "lora", "rank": 8, "bench_status": "ok", "bench_device": device,
           "bench_device_name": "CPU x86_64, 2 threads" if device == "cpu" else "NVIDIA H100 80GB HBM3",
           "bench_impl": "lorabench", "bench_layers": 4,
           "bench_estimated_peak_bytes": 200 * MIB, "measured_peak_bytes": 200 * MIB,
           "bench_estimated_activations_bytes": 60 * MIB, "bench_estimated_after_forward_bytes": 100 * MIB,
           "measured_activations_bytes": 100 * MIB, "activations_error_pct": 0.0,
           "bench_estimated_weights_bytes": 10 * MIB, "measured_weights_bytes": 10 * MIB,
           "peak_error_pct": 0.0, "within_tolerance": True}
    row.update(over)
    return row


def _cells(table, title):
    """The cells of table's column whose title starts with title."""
    (key, _, fn), = [c for c in table.columns if c[1].startswith(title)]
    return [key(r) if callable(key) else fn(r.get(key)) for r in table.rows]


def test_activations_measured_after_forward_pair_with_the_after_forward_estimate():
    # measured_activations_bytes is what forward leaves alive (bench.py: after_forward - start): the
    # estimate of that is estimated_after_forward_bytes, not activations_bytes (saved activations only)
    held = reporttext.bench_tables([_bench_row()])[1]
    assert _cells(held, "after forward MiB") == ["100.00 / 100.00"]
    assert _cells(held, "after forward error %") == ["+0.00"]
    assert _cells(held, "weights MiB") == ["10.00 / 10.00"]


def test_every_pair_is_one_estimate_and_the_measurement_of_the_same_field():
    held, phases = reporttext.bench_tables([_bench_row()])[1:]
    for table in (held, phases):
        for key, title, _ in table.columns[2:]:
            if not callable(key):
                continue
            est, meas = key.pair
            if est == "bench_estimated_after_forward_bytes":
                assert meas == "measured_activations_bytes"
            else:
                assert est.removeprefix("bench_estimated_") == meas.removeprefix("measured_"), title


def test_bench_estimates_kept_for_every_measured_component():
    for what in ("weights", "adapter", "gradients", "optimizer", "method_state", "forward_peak", "backward_peak",
                 "optimizer_peak", "peak"):
        assert f"{what}_bytes" in report.BENCH_ESTIMATES, what


def _report_with(rows, gpu="H100-80GB", device="cuda", bench=True):
    setup = {"batch_size": 2, "seq_len": 256, "dtype": "bf16", "adapter_dtype": "fp32", "optimizer": "adamw",
             "grad_checkpointing": False, "attention": "sdpa", "dropout": 0.0, "master_weights": False,
             "device": device, "alpha": 16.0, "impl": "lorabench"}
    seed = [{"method": "lora", "rank": 8, "matrix": "d=4096", "model": "llama-3-8b", "why": "w"}]
    return {"environment": {"date": "d"}, "command": "lorabench report", "rows": rows, "seed_comparison": seed,
            "settings": {"models": ["tiny"], "methods": ["lora"], "ranks": [8], "targets": None, "setup": setup,
                         "gpu": gpu, "mfu": 0.4, "bench": {"layers": None, "steps": 5, "warmup": 2} if bench else None,
                         "not_benched": [], "interrupted": None}}


def _estimate_row(**over):
    row = {"model": "tiny", "method": "lora", "rank": 8, "trainable_params": 1, "total_params": 2,
           "weights_bytes": 10 * MIB, "peak_bytes": 200 * MIB, "peak_phase": "backward",
           "overhead_bytes": 708 * MIB, "fits": True, "gpus_needed": 1, "step_ms": 0.02,
           "gpu_memory_bytes": 80 * GIB, "activations_bytes": 60 * MIB, "logits_bytes": 30 * MIB}
    row.update(over)
    return row


def test_cpu_bench_settings_name_the_cpu_and_keep_cuda_figures_as_the_gpus_estimate():
    md = reporttext.report_markdown(_report_with([{**_estimate_row(), **_bench_row("cpu")}]))
    assert "on cuda" not in md
    assert "| bench ran on" in md and "CPU x86_64, 2 threads; memory from the live-tensor tracker" in md
    assert "| estimates" in md and "for one H100-80GB (its CUDA runtime, foreach AdamW)" in md
    assert "## Memory and fit, estimated for one H100-80GB" in md
    assert ("The bench ran on CPU x86_64, 2 threads, not on a GPU: the fit, '+runtime' and step time here are "
            "the estimate for H100-80GB, measured nowhere.") in md


def test_cuda_bench_settings_name_the_gpu():
    md = reporttext.report_markdown(_report_with([{**_estimate_row(), **_bench_row("cuda")}]))
    assert "NVIDIA H100 80GB HBM3; memory from the CUDA caching allocator and NVML" in md
    assert "measured nowhere" not in md


def test_columns_without_values_are_left_out_and_one_unit_serves_every_column():
    # a CPU bench has no NVML reading, allocator reserve or step-time estimate: no empty columns for them
    main = reporttext._visible(reporttext.bench_tables([_bench_row("cpu")])[0])
    titles = [c[1] for c in main.columns]
    assert not any(t.startswith(("NVML", "allocator", "est. step")) for t in titles)
    # one unit for a model's tables (issue 21: grads "15,316.51 MiB" read beside weights "14.96 GiB"): its
    # peak's, small values in three significant digits (13 MiB = 13 / 1024 GiB = 0.0127 GiB)
    comp, fit = reporttext.memory_tables([_estimate_row(weights_bytes=15 * GIB, adapter_bytes=13 * MIB,
                                                        peak_bytes=30 * GIB, overhead_bytes=708 * MIB)], None)
    assert _cells(comp, "weights GiB") == ["15.00"] and _cells(comp, "adapter GiB") == ["0.0127"]
    assert _cells(fit, "+runtime GiB") == ["0.69"]  # 708 / 1024
    assert not any(c[1].endswith("MiB") for t in (comp, fit) for c in reporttext._visible(t).columns)
    # an older report without phase-peak estimates has no phase table at all
    assert reporttext._visible(reporttext.bench_tables([_bench_row()])[2]) is None


def test_several_models_get_tables_of_their_own():
    rows = [_estimate_row(), _estimate_row(model="big", weights_bytes=15 * GIB, peak_bytes=30 * GIB)]
    tables = reporttext.per_model(rows, lambda g: reporttext.memory_tables(g, "H100-80GB"))
    assert [t.caption for t in tables] == [
        "tiny: components per GPU without sharding (estimated)", "tiny: fit on one H100-80GB (estimated)",
        "big: components per GPU without sharding (estimated)", "big: fit on one H100-80GB (estimated)"]
    assert _cells(tables[0], "peak MiB") == ["200.00"] and _cells(tables[2], "peak GiB") == ["30.00"]


def test_gpus_needed_says_why_there_is_no_count():
    assert gpus_needed_text({"gpus_needed": 3, "fits": False}) == "3"
    assert gpus_needed_text({"gpus_needed": None, "fits": None}) == ""  # no GPU asked for
    alone = {"gpus_needed": None, "fits": False, "activations_bytes": 90 * GIB, "gpu_memory_bytes": 80 * GIB}
    assert gpus_needed_text(alone) == "none: activations alone exceed one GPU"
    assert gpus_needed_text({**alone, "activations_bytes": 70 * GIB}) == (
        "none: activations, logits and runtime exceed one GPU")


def test_mixtral_all_linear_says_no_gpu_count_holds_it(tmp_path):
    res = run("report", "-m", "mixtral-8x7b", "--method", "lora", "-t", "all-linear", "--out-dir", str(tmp_path),
              "--name", "m")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "m" / "results.json").read_text())
    assert data["rows"][0]["gpus_needed"] is None
    assert "| none: activations alone exceed one GPU" in (tmp_path / "m" / "report.md").read_text()


def test_a_method_one_model_refuses_is_left_out_with_a_note(tmp_path):
    res = run("report", "-m", "tiny-llama", "-m", "mixtral-8x7b", "--method", "lora,dora", "-t", "all-linear",
              "--out-dir", str(tmp_path), "--name", "moe")
    assert res.exit_code == 0, res.output
    assert "lorabench: note: mixtral-8x7b: dora left out: dora cannot adapt the router and experts" in res.stderr
    data = json.loads((tmp_path / "moe" / "results.json").read_text())
    assert [(r["model"], r["method"]) for r in data["rows"]] == [
        ("tiny-llama", "lora"), ("tiny-llama", "dora"), ("mixtral-8x7b", "lora")]
    assert [(x["model"], x["method"]) for x in data["settings"]["left_out"]] == [("mixtral-8x7b", "dora")]
    assert "- mixtral-8x7b: dora left out: dora cannot adapt" in (tmp_path / "moe" / "report.md").read_text()


def test_method_all_on_a_moe_model_leaves_dora_out(tmp_path):
    res = run("report", "-m", "mixtral-8x7b", "--method", "all", "-t", "all-linear", "--out-dir", str(tmp_path),
              "--name", "all")
    assert res.exit_code == 0, res.output
    methods = [r["method"] for r in json.loads((tmp_path / "all" / "results.json").read_text())["rows"]]
    assert "dora" not in methods and "lora" in methods


def test_a_model_whose_every_adapter_method_is_refused_is_an_error(tmp_path):
    res = run("report", "-m", "mixtral-8x7b", "--method", "dora", "-t", "all-linear", "--out-dir", str(tmp_path))
    assert res.exit_code == 2 and "dora cannot adapt" in res.output and list(tmp_path.iterdir()) == []


def test_the_bench_skips_what_the_estimate_left_out(monkeypatch):
    calls = []

    def run_bench(spec, methods, ranks, targets, setup, on_row=None, **kw):
        calls.append((spec.name, [m.name for m in methods]))

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    report.build_report([from_name("tiny-llama"), from_name("mixtral-8x7b")], (METHODS["lora"], METHODS["dora"]),
                        (8,), "all-linear", TrainingSetup(), None, 0.4, command="x",
                        bench={"layers": 1, "steps": 1, "warmup": 1}, note=lambda text: None)
    assert calls == [("tiny-llama", ["lora", "dora"]), ("mixtral-8x7b", ["lora"])]


# --------------------------------------------------------------------------------------------------
# Figures.


def _sweep_rows(setup=TrainingSetup(), gpu=None):
    methods = list(METHODS.values())
    rows = []
    for spec in (from_name("llama-3-8b"), from_name("tiny-llama"), from_dimension(4096)):
        rows += memory_rows(spec, methods, [8, 64], None, setup, gpu)
    return rows


@pytest.mark.parametrize("setup", [TrainingSetup(), TrainingSetup(grad_checkpointing=True),
                                   TrainingSetup(optimizer="sgd", seq_len=256)])
def test_peak_bars_hold_only_what_is_alive_at_the_peak(setup):
    for row in _sweep_rows(setup):
        parts = dict(plots.peak_parts(row))
        assert sum(parts.values()) == row["peak_bytes"], (row["model"], row["method"])
        if row["peak_phase"] == "optimizer":  # activations are gone by the optimizer step
            assert "activations" not in parts and parts["gradients"] == row["gradients_bytes"]
        if row["peak_phase"] in ("forward", "backward"):  # gradients come during backward, never all at once
            assert "gradients" not in parts
        if "activations" in parts:
            assert parts["activations"] == row["activations_bytes"]


def _capture(monkeypatch):
    figures = []
    real = plots.to_image

    def keep(fig):
        figures.append(fig)
        return real(fig)

    monkeypatch.setattr(plots, "to_image", keep)
    return figures


def test_figures_are_sharp_legible_and_sizes_start_at_zero(monkeypatch):
    figures = _capture(monkeypatch)
    rows = _sweep_rows()
    images = plots.render_plots(rows)
    for key, image in images.items():
        if image is None:
            continue
        png = base64.b64decode(image.uri.split(",", 1)[1])
        width = struct.unpack(">I", png[16:20])[0]  # IHDR
        assert width >= image.width * 150 / 96, key  # at least 150 DPI where it is shown
    for fig in figures:
        texts = [t for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
                 if t.get_text()]
        assert min(t.get_fontsize() for t in texts) >= 9
    by_title = {ax.get_title(): ax for fig in figures for ax in fig.axes}
    for title, ax in by_title.items():
        if "peak memory vs rank" in title:
            assert ax.get_ylim()[0] == 0, title
        elif "trainable parameters" not in title:  # counts span decades: log scale
            assert ax.get_xlim()[0] == 0, title


def test_html_shows_figures_at_their_size_with_captions(tmp_path):
    res = run("report", "-m", "tiny-llama", "--method", "lora,full", "--out-dir", str(tmp_path), "--name", "f")
    assert res.exit_code == 0, res.output
    page = (tmp_path / "f" / "report.html").read_text()
    assert page.count('<img alt="') == 4 and 'width="864"' in page
    assert "temporaries" in page and "From zero" in page
    assert '<div class="scroll"><table>' in page and "position: sticky" in page


# --------------------------------------------------------------------------------------------------
# Re-rendering from results.json.


def test_render_folder_keeps_results_and_rewrites_the_rest(tmp_path):
    res = run("report", "-m", "tiny-llama", "--method", "lora", "--out-dir", str(tmp_path), "--name", "r")
    assert res.exit_code == 0, res.output
    folder = tmp_path / "r"
    before = (folder / "results.json").read_bytes()
    (folder / "report.md").write_text("stale")  # a file lorabench wrote, edited since
    assert report.render_folder(folder) == folder
    assert (folder / "results.json").read_bytes() == before
    assert (folder / "report.md").read_text().startswith("# lorabench report: tiny-llama")


def test_render_folder_needs_a_results_json(tmp_path):
    with pytest.raises(LorabenchError, match="cannot read"):
        report.render_folder(tmp_path)
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(LorabenchError, match="not a lorabench report"):
        report.render_folder(tmp_path)


COMMITTED = sorted(p.parent for p in REPO.glob("reports/*/report.html"))


@pytest.mark.parametrize("folder", COMMITTED, ids=lambda p: p.name)
def test_committed_reports_are_what_their_results_json_renders(folder):
    data = report.read_results(folder)
    assert (folder / "report.md").read_text(encoding="utf-8") == report.report_markdown(data), (
        f"{folder.name}/report.md is stale: python scripts/rerender_reports.py {folder.relative_to(REPO)}")
    assert (folder / "results.json").read_text(encoding="utf-8") == (
        json.dumps(report.finite(data), indent=2, allow_nan=False) + "\n")


def test_committed_measurements_read_as_recorded():
    # the CPU reports' rows were measured on a CPU, the H100 report's on an H100: their settings say so
    for name, device in (("cpu-tiny-llama-lorabench", "CPU x86_64"), ("h100-llama-3-8b", "NVIDIA H100")):
        md = (REPO / "reports" / name / "report.md").read_text()
        assert "| bench ran on " in md and device in md and "on cuda" not in md
    assert "measured nowhere" in (REPO / "reports/cpu-tiny-llama-lorabench/report.md").read_text()
    assert "measured nowhere" not in (REPO / "reports/h100-llama-3-8b/report.md").read_text()


def test_deep_dive_refresh_keeps_the_counts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("rerender_reports", REPO / "scripts" / "rerender_reports.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    old = report.read_results(REPO / "reports" / "seed-comparison")["seed_comparison"]
    assert script.refreshed_deep_dive(old) == report.seed_rows()
    changed = [dict(r) for r in old]
    changed[1]["matrix_trainable_params"] += 1
    with pytest.raises(LorabenchError, match="counts differ"):
        script.refreshed_deep_dive(changed)
