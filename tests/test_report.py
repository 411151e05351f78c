"""`lorabench report`: the folder and its files, self-contained HTML, atomic writes, bench rendering with a
fake bench, one-line errors, the environment, and the seed's table against hand calculations."""

import csv
import json
import shlex
import subprocess
import sys
import types

import pytest
from click.testing import CliRunner

import lorabench
from lorabench.measure import envinfo
from lorabench.report import build as report, plots
from lorabench.safety import signals
from lorabench.report.folder import MARKER
from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.estimator.rows import memory_rows
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.report.deepdive import seed_rows
from lorabench.models.presets import from_name

FILES = set(report.FILES)
MARKED = FILES | {MARKER}  # the files and the marker that says lorabench wrote the folder
ENV_KEYS = {"date", "lorabench_version", "git_commit", "python_version", "platform", "torch_version",
            "torch_cuda_version", "gpu_name", "driver_version"}
# The cheapest sweep that still has a rank curve and full fine-tuning.
SMALL = ("--model", "llama-3-8b", "--method", "lora,vera,full", "--rank", "8", "--rank", "16")


def run(*args):
    return CliRunner().invoke(cli, list(args))


def leftovers(out_dir):
    """Hidden temporary or moved-aside folders a report write may have left."""
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    res = run("report", *SMALL, "--out-dir", str(out), "--name", "small")
    assert res.exit_code == 0, res.output
    return out / "small", res


def test_report_folder_holds_four_files(small_report):
    folder, res = small_report
    assert {p.name for p in folder.iterdir()} == MARKED
    assert res.output.strip().startswith(f"wrote {folder}")
    assert not leftovers(folder.parent)


def test_json_has_environment_command_and_numbers(small_report):
    folder, _ = small_report
    data = json.loads((folder / "results.json").read_text())
    assert set(data) >= {"environment", "command", "settings", "rows", "seed_comparison"}
    assert ENV_KEYS <= set(data["environment"])
    assert data["environment"]["lorabench_version"] == lorabench.__version__
    assert data["command"] == envinfo.command_line(sys.argv)
    assert data["settings"]["gpu"] == "H100-80GB" and data["settings"]["bench"] is None
    # 2 methods x 2 ranks + full once; numbers stay numbers.
    assert [(r["method"], r["rank"]) for r in data["rows"]] == [
        ("lora", 8), ("lora", 16), ("vera", 8), ("vera", 16), ("full", None)]
    lora8 = data["rows"][0]
    assert lora8["trainable_params"] == 3_407_872 and isinstance(lora8["peak_bytes"], int)
    assert isinstance(lora8["step_ms"], float) and lora8["fits"] is True


def test_csv_has_one_row_per_case(small_report):
    folder, _ = small_report
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 2 * 2 + 1
    assert rows[0]["trainable_params"] == "3407872" and rows[4]["method"] == "full"


def test_markdown_tables(small_report):
    folder, _ = small_report
    md = (folder / "report.md").read_text()
    for title in ("## Environment and settings", "## Parameters", "## Memory and fit",
                  "## Measured vs estimated", "## The deep dive's table, recomputed"):
        assert title in md
    assert "3,407,872" in md and "run with --bench" in md


def test_html_is_self_contained_with_every_plot(small_report):
    folder, _ = small_report
    page = (folder / "report.html").read_text()
    # (a), (b), (d), (e) drawn; (c) needs --bench and says so.
    assert page.count('<img alt=') == 4 and page.count("data:image/png;base64,") == 4
    assert "run with --bench" in page
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "<script" not in page and "<style>" in page
    assert "The deep dive&#x27;s table, recomputed" in page or "The deep dive's table, recomputed" in page


def test_estimate_report_never_imports_torch(tmp_path):
    code = ("import sys; from lorabench.cli import cli\n"
            f"cli.main(['report', '--method', 'lora', '--out-dir', {str(tmp_path)!r}], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "llama-3-8b").iterdir()} == MARKED


# --------------------------------------------------------------------------------------------------
# Atomic writes.


def _boom(*args, **kwargs):
    raise RuntimeError("plot failed")


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_failed_write_leaves_no_folder_and_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "step_time", _boom)
    res = run("report", "--method", "lora", "--out-dir", str(tmp_path), "--name", "r")
    # a bug, not bad input: one line and exit code 70, nothing half-written
    assert res.exit_code == 70 and res.output.strip().splitlines() == [
        "lorabench: internal error: RuntimeError: plot failed (please report it; LORABENCH_DEBUG=1 shows the "
        "traceback)."]
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_keeps_the_old_report(tmp_path, monkeypatch):
    assert run("report", "--method", "lora", "--out-dir", str(tmp_path), "--name", "r").exit_code == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    monkeypatch.setattr(plots, "peak_vs_rank", _interrupt)
    res = run("report", "--method", "vera", "--out-dir", str(tmp_path), "--name", "r")
    assert res.exit_code == 130 and "interrupted" in res.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    assert leftovers(tmp_path) == []


def test_disk_error_is_one_line_and_cleans_up(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "render_plots", full_disk)
    res = run("report", "--method", "lora", "--out-dir", str(tmp_path), "--name", "r")
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        "lorabench: error: cannot write the report: No space left on device; its tables are on stdout above."]
    assert list(tmp_path.iterdir()) == []


def _data(command="lorabench report --method lora"):
    return report.build_report([from_name("llama-3-8b")], (METHODS["lora"],), (8,), None, TrainingSetup(),
                               None, 0.4, command=command)


def test_rewrite_replaces_the_old_report(tmp_path):
    target = tmp_path / "r"
    assert report.write_report(_data("first"), tmp_path, "r") == (target, None)
    assert report.write_report(_data("second"), tmp_path, "r") == (target, None)
    assert {p.name for p in target.iterdir()} == MARKED
    assert json.loads((target / "results.json").read_text())["command"] == "second"
    assert leftovers(tmp_path) == []


def test_a_report_folder_with_a_users_file_is_not_replaced(tmp_path):
    target = tmp_path / "r"
    report.write_report(_data("first"), tmp_path, "r")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(LorabenchError, match="holds files lorabench did not write"):
        report.write_report(_data("second"), tmp_path, "r")
    assert (target / "notes.txt").read_text() == "mine"
    # --force moves it aside whole: nothing is deleted
    path, moved = report.write_report(_data("second"), tmp_path, "r", force=True)
    assert (moved / "notes.txt").read_text() == "mine" and moved.name.startswith("r.replaced-")
    assert json.loads((path / "results.json").read_text())["command"] == "second"


def test_interrupt_during_library_write_cleans_up(tmp_path, monkeypatch):
    data = report.build_report([from_name("llama-3-8b")], (METHODS["lora"],), (8,), None, TrainingSetup(),
                               None, 0.4, command="x")
    monkeypatch.setattr(report, "report_markdown", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        report.write_report(data, tmp_path, "r")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Bench rendering, with a fake lorabench.measure.bench (the real one needs torch and a device).


def fake_run_bench(calls):
    def run_bench(spec, methods, ranks, targets, setup, *, layers=None, steps=5, warmup=2, impl="lorabench",
                  tolerance_pct=5.0, progress=True, gpu=None, on_row=None):
        calls.append({"model": spec.name, "layers": layers, "steps": steps, "warmup": warmup, "gpu": gpu})
        cut = spec.with_layers(layers) if layers else spec
        rows = []
        for i, row in enumerate(memory_rows(cut, methods, ranks, targets, setup, gpu)):
            oom = row["method"] == "full"
            measured = None if oom else int(row["peak_bytes"] * 0.98)
            row.update({
                "layers": cut.num_layers, "impl": impl, "device": "cuda", "device_name": "Fake GPU",
                "status": "oom" if oom else "ok", "error": "CUDA out of memory" if oom else None,
                "measured_weights_bytes": None if oom else row["weights_bytes"],
                "measured_adapter_bytes": None if oom else row["adapter_bytes"],
                "measured_gradients_bytes": None if oom else row["gradients_bytes"],
                "measured_optimizer_bytes": None if oom else row["optimizer_bytes"],
                "estimated_after_forward_bytes": row["activations_bytes"] + row["logits_bytes"],
                "measured_activations_bytes": None if oom else row["activations_bytes"] + row["logits_bytes"],
                "measured_peak_bytes": measured, "measured_device_bytes": None,
                "peak_error_pct": None if oom else 100.0 * (row["peak_bytes"] - measured) / measured,
                "within_tolerance": None if oom else True,
                "measured_step_ms": None if oom else 10.0 + i, "measured_forward_ms": None if oom else 3.0,
                "measured_backward_ms": None if oom else 6.0, "measured_optimizer_ms": None if oom else 1.0,
                "measured_tokens_per_s": None if oom else 2048 / 0.01, "achieved_tflops": None if oom else 100.0,
                "matmul_tflops": 700.0, "full_projected_peak_bytes": None,
            })
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows
    return run_bench


@pytest.fixture
def fake_bench(monkeypatch):
    calls = []
    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = fake_run_bench(calls)
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    return calls


def test_bench_rows_and_plots(tmp_path, fake_bench):
    res = run("report", "-m", "llama-3-8b", "--d", "4096", "--method", "lora,full", "--bench", "--layers", "2",
              "--steps", "3", "--warmup", "1", "--out-dir", str(tmp_path), "--name", "b")
    assert res.exit_code == 0, res.output
    # Benched once, for the model only (a --d matrix has no forward pass), estimating for its own device.
    assert fake_bench == [{"model": "llama-3-8b", "layers": 2, "steps": 3, "warmup": 1, "gpu": None}]
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["settings"]["bench"] == {"layers": 2, "steps": 3, "warmup": 1}
    by = {(r["model"], r["method"]): r for r in data["rows"]}
    lora, full = by["llama-3-8b", "lora"], by["llama-3-8b", "full"]
    assert lora["bench_status"] == "ok" and lora["bench_layers"] == 2 and lora["bench_device_name"] == "Fake GPU"
    # The bench's estimate is for 2 layers; the row's own estimate stays the whole model's.
    assert lora["bench_estimated_peak_bytes"] < lora["peak_bytes"]
    assert lora["measured_peak_bytes"] == int(lora["bench_estimated_peak_bytes"] * 0.98)
    assert lora["bench_full_projected_peak_bytes"] is None and "full_projected_peak_bytes" not in lora
    assert full["bench_status"] == "oom" and full["measured_peak_bytes"] is None
    assert "bench_status" not in by["d=4096", "lora"]
    md = (tmp_path / "b" / "report.md").read_text()
    assert "Not measured" not in md and "oom: CUDA out of memory" in md and "Measured on Fake GPU" in md
    assert "d=4096: one matrix, not a model; not benched." in md
    # what forward leaves alive, measured, beside the bench's estimate of the same (saved activations + logits)
    after = lora["bench_estimated_after_forward_bytes"]
    assert lora["measured_activations_bytes"] == after > lora["bench_estimated_activations_bytes"]
    assert f" {after / 2 ** 30:,.2f} / {after / 2 ** 30:,.2f} |" in md
    page = (tmp_path / "b" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "http://" not in page and "https://" not in page
    rows = list(csv.DictReader((tmp_path / "b" / "results.csv").open()))
    assert len(rows) == 2 * 2 and "measured_peak_bytes" in rows[0]


@pytest.mark.parametrize("signal_exc, name, code", [(KeyboardInterrupt, "SIGINT", 130),
                                                     (signals.Terminated, "SIGTERM", 143)])
def test_interrupted_bench_writes_the_report_with_what_finished(tmp_path, monkeypatch, signal_exc, name, code):
    measure_first = fake_run_bench([])

    def run_bench(spec, methods, ranks, targets, setup, **kw):
        measure_first(spec, methods[:1], ranks, targets, setup, **kw)
        raise signal_exc

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    res = run("report", "-m", "llama-3-8b", "--method", "lora,vera", "--bench", "--out-dir", str(tmp_path),
              "--name", "cut")
    assert res.exit_code == code, res.output
    assert f"interrupted ({name}) after 1 measured case(s)" in res.stderr
    data = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert data["settings"]["interrupted"] == name
    assert [(r["method"], r.get("bench_status")) for r in data["rows"]] == [("lora", "ok"), ("vera", None)]
    md = (tmp_path / "cut" / "report.md").read_text()
    assert (f"The bench was interrupted ({name}) after 1 measured case(s); 1 case(s) after it are estimates "
            "only.") in md


def test_bench_unavailable_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", None)  # import fails as without torch
    res = run("report", "--method", "lora", "--bench", "--out-dir", str(tmp_path))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "--bench cannot run" in res.output and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("args, message", [
    (("--model", "llama3-8b"), "Did you mean llama-3-8b"),
    (("--gpu", "H1000"), "unknown GPU"),
    (("--rank", "0"), "must be from 1 to"),
    (("--d", "0"), "must be from 1 to"),
    (("--method", "loraa"), "unknown method"),
    (("--name", "../escape"), "plain folder name"),
    (("--name", ".hidden"), "plain folder name"),
    (("--layers", "2"), "--layers only apply with --bench"),
    (("--steps", "3"), "--steps only apply with --bench"),
    (("--mfu", "2"), "--mfu"),
    (("--model", "gpt2", "--targets", "q,v"), "use qkv"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    res = run("report", *args, "--out-dir", str(tmp_path))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "r").write_text("not a folder")
    res = run("report", "--method", "lora", "--out-dir", str(tmp_path), "--name", "r")
    assert res.exit_code == 2 and "not a folder" in res.output


# --------------------------------------------------------------------------------------------------
# Environment.


def test_environment_without_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    env = envinfo.capture_environment()
    assert env["gpu_name"] is None and env["driver_version"] is None
    assert env["python_version"].count(".") == 2 and env["date"].endswith("+00:00")


def test_environment_with_failing_nvml(monkeypatch):
    def fail():
        raise OSError("NVML Shared Library Not Found")

    monkeypatch.setitem(sys.modules, "pynvml", types.SimpleNamespace(nvmlInit=fail))
    assert envinfo.nvml_info()["gpu_name"] is None


def test_environment_reads_nvml(monkeypatch):
    handle = object()
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15", nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: handle,
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=85_520_809_984))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    info = envinfo.nvml_info()
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["driver_version"] == "550.54.15"
    assert info["cuda_driver_version"] == "12.4" and info["gpus"][0]["memory_bytes"] == 85_520_809_984


def test_git_commit_outside_a_checkout(tmp_path, monkeypatch):
    (tmp_path / "lorabench").mkdir()
    monkeypatch.setattr(lorabench, "__file__", str(tmp_path / "lorabench" / "__init__.py"))
    assert envinfo.git_commit() == {"git_commit": None, "git_dirty": None}


def test_command_line_is_runnable():
    assert envinfo.command_line(["/usr/bin/lorabench", "report", "--name", "a b"]) == "lorabench report --name 'a b'"
    assert envinfo.command_line(["/x/lorabench/__main__.py", "report"]) == "python -m lorabench report"
    assert shlex.split(envinfo.command_line(["lorabench", "report", "-m", "x;y"]))[-1] == "x;y"


# --------------------------------------------------------------------------------------------------
# The seed's table, recomputed: our side against hand calculations.

D, R = 4096, 8
# One 4096 x 4096 matrix at r=8.
FULL_W = D * D                # 16,777,216
LORA_W = 2 * D * R            # A (r x d) + B (d x r) = 65,536
LORA_FA_W = D * R             # B only = 32,768
VERA_W = R + D                # vectors d (r) and b (out) = 4,104
DORA_W = 2 * D * R + D        # LoRA + magnitude (out) = 69,632
# Llama-3-8B, q (4096 -> 4096) and v (4096 -> 1024, grouped-query), 32 layers, r=8.
LLAMA3_8B = 8_030_261_248
LORA_QV = 32 * ((D + D) * R + (D + 1024) * R)     # 3,407,872
LORA_FA_QV = 32 * (D * R + 1024 * R)              # 1,310,720
VERA_QV = 32 * ((R + D) + (R + 1024))             # 164,352


def test_seed_table_matches_hand_calculations():
    rows = {r["method"]: r for r in seed_rows()}
    assert list(rows) == ["full", "lora", "lora-fa", "vera", "delta-lora", "lora-plus", "dora"]
    expected = {"full": FULL_W, "lora": LORA_W, "lora-fa": LORA_FA_W, "vera": VERA_W, "delta-lora": LORA_W,
                "lora-plus": LORA_W, "dora": DORA_W}
    for method, n in expected.items():
        assert rows[method]["matrix_trainable_params"] == n, method
        assert rows[method]["matrix_pct_of_full"] == pytest.approx(100.0 * n / FULL_W)
    assert (FULL_W, LORA_W, LORA_FA_W, VERA_W) == (16_777_216, 65_536, 32_768, 4_104)
    assert rows["lora"]["matrix_pct_of_full"] == pytest.approx(0.390625)       # not the seed's 0.8
    assert rows["vera"]["matrix_pct_of_full"] == pytest.approx(0.0244617, rel=1e-5)  # not 0.05
    assert rows["lora"]["model_qv_trainable_params"] == LORA_QV == 3_407_872
    assert rows["lora-fa"]["model_qv_trainable_params"] == LORA_FA_QV
    assert rows["vera"]["model_qv_trainable_params"] == VERA_QV
    assert rows["delta-lora"]["model_qv_trainable_params"] == LORA_QV
    assert rows["full"]["model_qv_trainable_params"] == LLAMA3_8B
    # all-linear: q, k, v, o, gate, up, down of 32 layers (kv 1024, ffn 14336).
    per_layer = (D + D) + (D + 1024) + (D + 1024) + (D + D) + 2 * (D + 14336) + (14336 + D)
    assert rows["lora"]["model_all_linear_trainable_params"] == 32 * R * per_layer == 20_971_520


def test_seed_table_keeps_the_seeds_claims_and_explains():
    rows = {r["method"]: r for r in seed_rows()}
    assert {m: r["seed_pct"] for m, r in rows.items()} == {
        "full": 100.0, "lora": 0.8, "lora-fa": 0.4, "vera": 0.05, "delta-lora": 1.4, "lora-plus": 0.8,
        "dora": None}
    assert rows["delta-lora"]["seed_w_updated"] is True and rows["delta-lora"]["updates_base_weights"] is True
    assert "2·4096·8 = 65,536" in rows["lora"]["why"] and "0.39%" in rows["lora"]["why"]
    assert "8 + 4096 = 4,104" in rows["vera"]["why"]
    assert "LoRA's 65,536" in rows["delta-lora"]["why"]
    assert all(r["why"] for r in rows.values())


def test_a_signal_just_after_the_bench_keeps_what_it_measured(tmp_path, monkeypatch):
    """A Ctrl-C that lands after the last case (the environment being read) ends the run with the report of
    what was measured, as one during the bench does; it used to throw the measurements away."""
    import os
    import signal

    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", types.SimpleNamespace(run_bench=fake_run_bench([])))
    real = report.capture_environment

    def interrupted(**kw):
        os.kill(os.getpid(), signal.SIGINT)
        return real(**kw)

    monkeypatch.setattr(report, "capture_environment", interrupted)
    res = run("report", "-m", "llama-3-8b", "--method", "lora", "--bench", "--out-dir", str(tmp_path), "--name", "b")
    assert res.exit_code == 130, res.output
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert data["settings"]["interrupted"] == "SIGINT" and data["rows"][0]["bench_status"] == "ok"
    assert data["environment"]["lorabench_version"]
