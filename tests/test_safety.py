"""Output safety (lorabench.safety.files) and the hostile-user findings of issue 9, one plain test each: no run
deletes a file it did not create, no result is lost, every bad value is one line and exit code 2."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.report import folder as reportfolder
from lorabench.safety import files as safeio, signals
from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.report.build import FILES
from lorabench.report.folder import MARKER

LLAMA_TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "vocab_size": 100}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(res, code=2):
    """The run ended with `code` and said why in exactly one line on stderr, with no traceback."""
    assert res.exit_code == code, (res.exit_code, res.output)
    errors = [line for line in res.stderr.splitlines() if line.strip() and not line.startswith("lorabench: note:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.stderr
    return errors[0]


def model_folder(parent: Path, name="my-model") -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_TINY))
    (folder / "model.safetensors").write_bytes(b"weights that took a week to train")
    return folder


def snapshot(folder: Path):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------------------------------
# Data loss: report never replaces a folder it did not make.


def test_report_named_after_a_model_folder_does_not_delete_it(tmp_path, monkeypatch):
    folder = model_folder(tmp_path)
    before = snapshot(folder)
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run("report", "--config", "my-model", "--method", "lora", "--out-dir", "."))
    assert "was not written by 'lorabench report'" in line and "choose another --out-dir or --name" in line
    assert snapshot(folder) == before


def test_report_name_of_a_source_folder_does_not_delete_it(tmp_path):
    src = tmp_path / "proj" / "src"
    src.mkdir(parents=True)
    (src / "main.py").write_text("print('mine')\n")
    one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path / "proj", "--name", "src"))
    assert (src / "main.py").read_text() == "print('mine')\n"


def test_refusal_comes_before_the_bench_runs(tmp_path, monkeypatch):
    model_folder(tmp_path, "r")
    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = lambda *a, **k: pytest.fail("the bench ran although the report could not be written")
    module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)  # the real one times products on this CPU
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    one_error_line(run("report", "--method", "lora", "--bench", "--out-dir", tmp_path, "--name", "r"))


def test_force_never_moves_a_folder_lorabench_did_not_make(tmp_path):
    """Issue 21, finding 9: `report --out-dir / --name tmp --force` as root moved the machine's /tmp aside.
    Here a stand-in (a busy folder of someone else's, in tmp_path): refused in one line naming it, --force
    or not, and left exactly as it was."""
    root = tmp_path / "root"
    busy = root / "tmp"
    busy.mkdir(parents=True)
    (busy / "socket-of-another-program").write_text("in use")
    (busy / "sub").mkdir()
    (busy / "sub" / "x").write_text("x")
    before = snapshot(busy)
    line = one_error_line(run("report", "--method", "lora", "--out-dir", root, "--name", "tmp", "--force"))
    assert line == (f"lorabench: error: {busy} exists and was not written by 'lorabench report'; choose another "
                    "--out-dir or --name (--force replaces only lorabench's own reports and empty folders).")
    assert snapshot(busy) == before and sorted(p.name for p in root.iterdir()) == ["tmp"]


def test_force_replaces_an_empty_folder_and_moves_a_report_of_lorabenchs_aside(tmp_path):
    empty = tmp_path / "r"
    empty.mkdir()
    assert "add --force to replace it" in one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path,
                                                             "--name", "r"))
    res = run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r", "--force")
    assert res.exit_code == 0, res.output
    assert reportfolder.is_report_folder(empty) and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    (empty / "notes.txt").write_text("mine")  # lorabench's folder, with a file of the user's: moved whole
    res = run("report", "--method", "vera", "--out-dir", tmp_path, "--name", "r", "--force")
    assert res.exit_code == 0, res.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine" and f"now {aside[0]}" in res.stderr


@pytest.mark.parametrize("make", ["symlink", "mount point"])
def test_force_refuses_a_symlink_or_a_mount_point(tmp_path, monkeypatch, make):
    target = tmp_path / "r"
    if make == "symlink":
        (tmp_path / "elsewhere").mkdir()
        target.symlink_to(tmp_path / "elsewhere")
    else:  # an empty mount point (/mnt/usb) is no empty folder to replace
        target.mkdir()
        real = os.path.ismount
        monkeypatch.setattr(reportfolder.os.path, "ismount", lambda p: Path(p) == target or real(p))
    one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r", "--force"))
    assert reportfolder.force_action(target) is None and os.path.lexists(target)
    assert not any(p.name.startswith("r.replaced-") for p in tmp_path.iterdir())


def test_publish_rechecks_what_force_may_do(tmp_path):
    """A folder that became someone else's between the check and the swap is not moved."""
    tmp = tmp_path / ".r.tmp-1-00000000"
    tmp.mkdir()
    target = tmp_path / "r"
    target.mkdir()
    (target / "data").write_text("arrived during the run")
    with pytest.raises(LorabenchError, match="not written there"):
        reportfolder.publish_report(tmp, target, force=True)
    assert (target / "data").read_text() == "arrived during the run"


def test_report_replaces_its_own_report(tmp_path):
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    res = run("report", "--method", "vera", "--out-dir", tmp_path, "--name", "r")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["vera"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_a_forged_marker_listing_other_names_deletes_nothing_else(tmp_path):
    """The marker lists what may be deleted; a folder holding anything more is not lorabench's."""
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    (folder / MARKER).write_text(json.dumps({"files": ["report.md"]}))
    one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r"))
    assert (folder / "keep.txt").read_text() == "mine"


def test_a_symlink_or_file_under_the_name_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "r").symlink_to(tmp_path / "elsewhere")
    assert "is a symlink" in one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r"))
    (tmp_path / "f").write_text("x")
    assert "not a folder" in one_error_line(run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "f"))


# --------------------------------------------------------------------------------------------------
# Crashes at any moment: one complete report under the name, stale temporaries cleaned.


def test_swap_is_one_atomic_exchange_where_the_os_has_it(tmp_path, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) there is no moment without a report: the two-rename fallback
    (which has one) is never used."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    if not reportfolder._exchange(tmp_path / "r", tmp_path / "r"):
        pytest.skip("no atomic exchange on this OS/filesystem: the fallback and clean_stale apply")
    renames = []
    real = os.rename
    monkeypatch.setattr(safeio.os, "rename", lambda a, b: (renames.append((a, b)), real(a, b)))
    assert run("report", "--method", "vera", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    assert renames == []
    assert json.loads((tmp_path / "r" / "results.json").read_text())["rows"][0]["method"] == "vera"


def test_kill_between_the_fallback_renames_is_repaired_by_the_next_run(tmp_path):
    """The state a SIGKILL leaves between the two renames (no exchange): the old report aside, the new
    one complete, nothing under the name. The next run puts a complete report back first."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    pid = dead_pid()
    os.rename(tmp_path / "r", tmp_path / f".r.old-{pid}-0123abcd")
    assert not (tmp_path / "r").exists()
    reportfolder.clean_stale(tmp_path, "r", FILES)
    assert reportfolder.is_report_folder(tmp_path / "r")
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    pid = dead_pid()
    unfinished = tmp_path / f".r.tmp-{pid}-0123abcd"  # killed while writing: some files, no marker
    unfinished.mkdir()
    (unfinished / "results.json").write_text("{")
    finished_old = tmp_path / f".r.tmp-{pid}-4567abcd"  # killed after the exchange: the old report
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "x").exit_code == 0
    os.rename(tmp_path / "x", finished_old)
    alive = tmp_path / f".r.tmp-{os.getppid()}-89abcdef"  # a running writer's: left alone
    alive.mkdir()
    res = run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r", alive.name])


def test_a_leftover_with_foreign_files_is_not_deleted(tmp_path):
    odd = tmp_path / f".r.tmp-{dead_pid()}-0123abcd"
    odd.mkdir()
    (odd / "mine.txt").write_text("not lorabench's")
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    assert (odd / "mine.txt").read_text() == "not lorabench's"


def test_files_and_folders_get_the_users_umask(tmp_path, fake_bench):
    old = os.umask(0o027)
    try:
        assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
        assert run("bench", "-m", "tiny-llama", "--method", "lora", "-o", tmp_path / "b.json").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "r").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "r" / "report.md").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


# --------------------------------------------------------------------------------------------------
# bench -o: checked before the run, written row by row, kept on SIGINT and SIGTERM.


@pytest.fixture
def fake_bench(monkeypatch):
    """lorabench.measure.bench with a run_bench that makes one row per method at once (the real one needs torch)."""
    calls = []

    def run_bench(spec, methods, ranks, targets, setup, *, on_row=None, **kw):
        calls.append(spec.name)
        rows = []
        for m in methods:
            row = {"lorabench_version": "test", "model": spec.name, "method": m.name,
                   "rank": ranks[0] if m.uses_rank else None,
                   "status": "ok", "impl": setup.impl, "layers": spec.num_layers, "full_layers": spec.num_layers,
                   "device_name": "cpu", "peak_bytes": 1000, "measured_peak_bytes": 1000,
                   "peak_error_pct": 0.0, "within_tolerance": True}
            rows.append(row)
            if on_row:
                on_row(row)
        return rows

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)  # the real one times products on this CPU
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    return calls


@pytest.mark.parametrize("name, message", [
    ("missing-dir/out.json", "does not exist"),
    ("out.txt", "must end in .json or .csv"),
    ("", "is empty"),
    ("folder.json", "is a folder"),
])
def test_bad_output_paths_are_refused_before_the_run(tmp_path, fake_bench, name, message):
    (tmp_path / "folder.json").mkdir()
    target = str(tmp_path / name) if name else ""
    line = one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", target))
    assert message in line and fake_bench == []


def test_unwritable_output_folder_is_refused_before_the_run(tmp_path, fake_bench):
    if os.geteuid() == 0:  # root writes through permissions: use a filesystem nobody can write
        folder = Path("/sys")
        if not folder.is_dir() or os.access(folder, os.W_OK) and _can_create(folder):
            pytest.skip("no unwritable folder available to root here")
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
    line = one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", folder / "out.json"))
    assert "cannot write in" in line and fake_bench == []
    line = one_error_line(run("report", "--method", "lora", "--out-dir", folder / "reports"))
    assert "cannot write in" in line


def _can_create(folder: Path) -> bool:
    try:
        (folder / ".lorabench-probe").touch()
    except OSError:
        return False
    (folder / ".lorabench-probe").unlink()
    return True


def test_output_that_lorabench_did_not_write_is_refused_then_moved_aside_with_force(tmp_path, fake_bench):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_TINY))
    line = one_error_line(run("bench", "--config", config, "--method", "lora", "-o", config))
    assert "was not written by lorabench" in line and json.loads(config.read_text()) == LLAMA_TINY
    res = run("bench", "--config", config, "--method", "lora", "-o", config, "--force")
    assert res.exit_code == 0, res.output
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("config.replaced-")]
    assert len(aside) == 1 and json.loads(aside[0].read_text()) == LLAMA_TINY
    assert json.loads(config.read_text())[0]["method"] == "lora"


def test_output_lorabench_wrote_is_replaced(tmp_path, fake_bench):
    out = tmp_path / "out.csv"
    assert run("bench", "-m", "tiny-llama", "--method", "lora,vera", "-o", out).exit_code == 0
    assert run("bench", "-m", "tiny-llama", "--method", "dora", "-o", out).exit_code == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and ",dora," in lines[1]


def test_check_with_nothing_measured_exits_1(tmp_path, monkeypatch):
    def run_bench(spec, methods, ranks, targets, setup, *, on_row=None, **kw):
        row = {"lorabench_version": "test", "model": spec.name, "method": "delta-lora", "rank": 8,
               "status": "skipped", "impl": "peft",
               "layers": 4, "full_layers": 4, "device_name": "cpu", "error": "delta-lora has no PEFT implementation"}
        on_row(row)
        return [row]

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)  # the real one times products on this CPU
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    res = run("bench", "-m", "tiny-llama", "--method", "delta-lora", "--impl", "peft", "--check")
    assert "nothing was measured" in one_error_line(res, code=1)
    assert run("bench", "-m", "tiny-llama", "--method", "delta-lora", "--impl", "peft").exit_code == 0


BENCH = [sys.executable, "-m", "lorabench", "bench", "-m", "tiny-llama", "--device", "cpu", "--method", "all",
         "--seq-len", "32", "--steps", "30", "--warmup", "1", "--no-progress"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_bench_keeps_the_finished_rows(tmp_path, sig, code):
    pytest.importorskip("torch")
    out = tmp_path / "rows.json"
    proc = subprocess.Popen(BENCH + ["-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not out.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    rows = json.loads(out.read_text())
    assert proc.returncode == code, stderr
    assert 1 <= len(rows) < 7 and all(r["status"] == "ok" for r in rows)
    assert "Traceback" not in stderr and f"after {len(rows)} case(s); those are in {out}" in stderr
    assert rows[0]["method"] in stdout  # the table of what finished is printed too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]


def test_ctrl_c_during_start_up_is_one_line():
    """KeyboardInterrupt while the CLI's modules are being imported (a deterministic stand-in for a
    Ctrl-C that lands during start-up)."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'lorabench.cli':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "sys.argv = ['lorabench', 'params']\n"
            "from lorabench.__main__ import main\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 130 and res.stderr == "lorabench: interrupted.\n" and res.stdout == ""


@pytest.mark.parametrize("where", ["estimate_flops", "render_plots"])
def test_sigterm_in_any_command_is_143_without_traceback(tmp_path, where):
    """SIGTERM raises Terminated inside every command: while estimating or writing an estimate-only report,
    nothing is written (a report with measurements is finished first: test_report.py)."""
    module = "estimator.rows" if where == "estimate_flops" else "report.plots"
    code = ("import os, signal\n"
            f"import lorabench.{module} as m\n"
            "from lorabench.cli import cli\n"
            f"real = m.{where}\n"
            "def fake(*args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return real(*args)\n"
            f"m.{where} = fake\n"
            f"cli(['report', '--method', 'lora', '--out-dir', {str(tmp_path)!r}], prog_name='lorabench')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 143 and res.stderr.endswith("lorabench: terminated (SIGTERM).\n"), res.stderr
    assert res.stdout == "" and list(tmp_path.iterdir()) == []


def _signal_report(tmp_path, module, where, sig):
    """`report --method vera` over an existing report in tmp_path/r, with `sig` sent to itself when
    lorabench.<module>.<where> is called."""
    code = ("import os, signal\n"
            f"import lorabench.{module} as m\n"
            "from lorabench.cli import cli\n"
            f"real = m.{where}\n"
            "def fake(*args):\n"
            f"    os.kill(os.getpid(), {int(sig)})\n"
            "    return real(*args)\n"
            f"m.{where} = fake\n"
            f"cli(['report', '--method', 'vera', '--out-dir', {str(tmp_path)!r}, '--name', 'r'],\n"
            "    prog_name='lorabench')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupt_before_the_swap_keeps_the_old_report(tmp_path, sig, code):
    """Issue 21, finding 8: a Ctrl-C during an estimate-only report was held until the report was written,
    then the old folder was replaced and the exit code was 130. Before the swap it stops the run and the
    old report stays, byte for byte."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    before = snapshot(tmp_path / "r")
    res = _signal_report(tmp_path, "report.plots", "render_plots", sig)
    assert res.returncode == code and "Traceback" not in res.stderr, res.stderr
    assert res.stdout == "" and snapshot(tmp_path / "r") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_an_interrupt_during_the_swap_waits_for_it(tmp_path):
    """The swap (a few renames) is not cut: the new report is whole under the name, nothing hidden is
    left, and the signal then ends the run."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    res = _signal_report(tmp_path, "report.folder", "_exchange", signal.SIGINT)
    assert res.returncode == 130 and "Traceback" not in res.stderr, res.stderr
    assert reportfolder.is_report_folder(tmp_path / "r") and sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["rows"][0]["method"] == "vera"


# --------------------------------------------------------------------------------------------------
# Nonsense refused: CLI values.


@pytest.mark.parametrize("args, message", [
    (("memory", "--mfu", "nan", "--gpu", "H100-80GB"), "finite"),
    (("report", "--mfu", "nan"), "finite"),
    (("memory", "--alpha", "nan"), "finite"),
    (("memory", "--alpha", "inf"), "finite"),
    (("memory", "--alpha", "0"), "must be in (0"),
    (("memory", "--dropout", "nan"), "finite"),
    (("memory", "--dropout", "1"), "must be in [0, 1)"),
    (("bench", "--alpha", "nan"), "finite"),
    (("bench", "--tolerance", "nan"), "finite"),
    (("memory", "--seq-len", "1" + "0" * 300), "must be from 1 to 16,777,216"),
    (("memory", "--layers", "9" * 400), "must be from 1 to 10,000"),
    (("params", "--d", "4" * 200), "must be from 1 to 1,048,576"),
    (("params", "--rank", "8.5"), "is not an integer"),
    (("params", "--rank", "1e3"), "is not an integer"),
    (("memory", "--batch-size", "-1"), "must be from 1"),
    (("memory", "--model", ""), "is empty"),
    (("memory", "--config", ""), "is empty"),
    (("memory", "--gpu", ""), "is empty"),
    (("memory", "--targets", ""), "is empty"),
    (("params", "--method", ""), "no method given"),
    (("report", "--name", ""), "is empty"),
    (("report", "--out-dir", ""), "is empty"),
    (("report", "--model", " "), "is empty"),
    (("params", "--d", "4096", "--targets", "q,v"), "does not apply to a --d matrix"),
    (("memory", "--alpha", "\u0663"), "is not a number"),  # float() reads an Arabic-Indic 3 as 3.0
    (("memory", "--alpha", "1_6"), "is not a number"),
    (("params", "-m", "tiny-llama", "--layers", "5"), "tiny-llama has 4 layers; --layers cuts a model to fewer"),
])
def test_bad_cli_values_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(run(*args))
    assert message in line and len(line) < 200, line
    assert list(tmp_path.iterdir()) == []


def test_targets_that_apply_to_nothing_get_a_note():
    res = run("params", "--method", "full", "--targets", "q,v", "-f", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["method"] == "full"
    assert res.stderr == ("lorabench: note: --targets does not apply to full fine-tuning, which trains every "
                          "weight; it is ignored.\n")
    assert run("params", "--method", "full,lora", "--targets", "q,v").stderr == ""


def test_json_never_holds_nan():
    """Every float on stdout is finite JSON (json.dumps would otherwise write NaN for inf/NaN)."""
    from lorabench.render.formats import render

    text = render([{"a": float("nan"), "b": [float("inf")], "c": 1.5}], "json", ())
    assert json.loads(text, parse_constant=lambda t: pytest.fail(t)) == [{"a": None, "b": [None], "c": 1.5}]


# --------------------------------------------------------------------------------------------------
# Models in reports: never mixed.


def test_two_configs_in_folders_of_the_same_name_stay_two_rows(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = model_folder(tmp_path / "a"), model_folder(tmp_path / "b")
    bigger = dict(LLAMA_TINY, num_hidden_layers=4)
    (b / "config.json").write_text(json.dumps(bigger))
    res = run("report", "--config", a, "--config", b, "--method", "lora", "--out-dir", tmp_path / "out",
              "--name", "two")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "two" / "results.json").read_text())["rows"]
    assert len(rows) == 2 and len({r["model"] for r in rows}) == 2
    assert rows[0]["total_params"] < rows[1]["total_params"]


def test_a_config_named_like_a_preset_does_not_mix_with_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_folder(tmp_path, "llama-3-8b")  # a tiny model in a folder named like the preset
    res = run("report", "-m", "llama-3-8b", "--config", "llama-3-8b", "--method", "lora", "--out-dir", "out",
              "--name", "mixed")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "mixed" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["llama-3-8b", "llama-3-8b (config llama-3-8b)"]
    assert rows[0]["base_params"] == 8_030_261_248 and rows[1]["base_params"] < 10 ** 6


def test_the_same_model_twice_is_one_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_folder(tmp_path)
    res = run("report", "-m", "gpt2", "-m", "GPT2", "--config", "my-model", "--config", "./my-model/config.json",
              "--method", "lora", "--out-dir", "out", "--name", "dups")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "dups" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["gpt2", "my-model"]


def test_a_signal_during_a_row_write_waits_for_the_write(tmp_path):
    """SIGTERM (or Ctrl-C) that lands while a row is being written is delivered after the file is whole."""
    sink = safeio.RowFile(tmp_path / "rows.json", lambda rows, fmt: json.dumps(rows))
    real = safeio.atomic_write

    def write_then_signal(path, text):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-write
        real(path, text)

    with signals.sigterm_raises():
        safeio.atomic_write, saved = write_then_signal, safeio.atomic_write
        try:
            with pytest.raises(signals.Terminated):
                sink.add({"method": "lora"})
        finally:
            safeio.atomic_write = saved
    assert json.loads((tmp_path / "rows.json").read_text()) == [{"method": "lora"}]


@pytest.mark.parametrize("args, expected", [
    (("params", "--model", "x" * 400),
     "lorabench: error: unknown model '" + "x" * 49 + "..." + "x" * 48 + "'. (403 characters) Run 'lorabench "
     "models' for the presets, or give a Hugging Face Hub id (ORG/NAME) or --config."),
    (("params", "--config", "0\n"), "lorabench: error: no config.json at '0\\n'."),
    (("params", "--model", "\x1b[2J"), "lorabench: error: unknown model '\\x1b[2J'. Run 'lorabench models' for "
                                       "the presets, or give a Hugging Face Hub id (ORG/NAME) or --config."),
])
def test_error_lines_stay_one_short_line(args, expected):
    """A user's value is escaped (a newline or an escape sequence cannot break the line or clear the
    screen) and shortened in the middle when it is long."""
    assert one_error_line(run(*args)) == expected


def test_a_name_too_long_for_the_filesystem_is_refused_and_nothing_is_made(tmp_path):
    out = tmp_path / "new" / ("x" * 300)
    line = one_error_line(run("report", "--method", "lora", "--out-dir", out))
    assert "longer than the 255 bytes a file name can have here" in line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_results_on_stdout_and_removes_what_it_made(tmp_path, monkeypatch):
    from lorabench.report import plots

    def full_disk(rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "render_plots", full_disk)
    res = run("report", "--method", "lora", "--out-dir", tmp_path / "a" / "b")
    line = one_error_line(res, code=1)
    assert line == ("lorabench: error: cannot write the report: No space left on device; its tables are on "
                    "stdout above.")
    assert res.stdout.startswith("# lorabench report: llama-3-8b") and "| lora " in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_nul_in_a_value_is_bad_input():
    assert "contains a NUL character" in one_error_line(run("params", "--config", "a\0b"))


# --------------------------------------------------------------------------------------------------
# The second audit's findings.


def test_a_folder_named_like_a_report_file_makes_the_folder_not_ours(tmp_path):
    """A folder is lorabench's only if it holds regular files with the marker's names: a notes folder
    called report.md in it is the user's."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r").exit_code == 0
    (tmp_path / "r" / "report.md").unlink()
    (tmp_path / "r" / "report.md").mkdir()
    (tmp_path / "r" / "report.md" / "notes.txt").write_text("mine")
    assert "holds files lorabench did not write" in one_error_line(
        run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "r"))
    assert (tmp_path / "r" / "report.md" / "notes.txt").read_text() == "mine"


def test_a_measured_report_is_not_replaced_by_estimates(tmp_path, fake_bench):
    """An estimate-only rerun under the same name would throw away hours of measurements."""
    def report(*extra):
        return run("report", "-m", "tiny-llama", "--method", "lora", "--out-dir", tmp_path, "--name", "r", *extra)

    assert report("--bench").exit_code == 0
    assert "holds measurements (report --bench) and this run has none" in one_error_line(report())
    assert report("--bench").exit_code == 0  # a new measurement may replace an old one
    res = report("--force")
    assert res.exit_code == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("r.replaced-")]
    assert len(kept) == 1 and json.loads((kept[0] / "results.json").read_text())["settings"]["bench"]


def test_a_users_csv_with_bench_like_columns_is_not_overwritten(tmp_path, fake_bench):
    mine = tmp_path / "mine.csv"
    mine.write_text('model,method,rank,status,impl,my_notes\nllama,lora,8,ok,peft,"3 weeks of H100 runs"\n')
    assert "was not written by lorabench bench" in one_error_line(
        run("bench", "-m", "tiny-llama", "--method", "lora", "-o", mine))
    assert "3 weeks" in mine.read_text()


@pytest.mark.parametrize("make", ["loop", "dangling"])
def test_an_output_symlink_to_nothing_is_refused(tmp_path, fake_bench, make):
    link = tmp_path / "out.json"
    link.symlink_to(link if make == "loop" else tmp_path / "nowhere" / "x.json")
    assert "is a symlink to nothing" in one_error_line(run("bench", "-m", "tiny-llama", "-o", link))
    assert link.is_symlink()


def test_a_dangling_out_dir_symlink_is_refused_before_the_run(tmp_path, fake_bench):
    (tmp_path / "dang").symlink_to(tmp_path / "nowhere")
    line = one_error_line(run("report", "-m", "tiny-llama", "--bench", "--out-dir", tmp_path / "dang"))
    assert "is a symlink to nothing" in line and fake_bench == []


def test_rewriting_an_output_keeps_its_permissions(tmp_path, fake_bench):
    out = tmp_path / "b.json"
    assert run("bench", "-m", "tiny-llama", "--method", "lora", "-o", out).exit_code == 0
    out.chmod(0o600)
    assert run("bench", "-m", "tiny-llama", "--method", "vera", "-o", out).exit_code == 0
    assert out.stat().st_mode & 0o777 == 0o600


def test_a_second_run_into_the_same_output_is_refused(tmp_path, fake_bench):
    out = tmp_path / "same.json"
    first = safeio.RowFile(out, lambda rows, fmt: json.dumps(rows))  # a run in progress holds it
    try:
        line = one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", out))
        assert "is being written by another lorabench run" in line and fake_bench == []
    finally:
        first.close()
    assert run("bench", "-m", "tiny-llama", "--method", "lora", "-o", out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.json"]  # no lock file left


def test_a_too_long_output_name_is_bad_input(tmp_path, fake_bench):
    line = one_error_line(run("bench", "-m", "tiny-llama", "-o", tmp_path / ("x" * 300 + ".json")))
    assert "longer than a file name can be here" in line and fake_bench == []


def test_paths_that_are_not_utf8_stay_valid_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = os.fsdecode(b"bad\xffname")  # a folder name that is not UTF-8, as Python sees it
    os.mkdir(folder)
    Path(folder, "config.json").write_text(json.dumps(LLAMA_TINY))
    res = run("params", "--config", folder, "-f", "json")
    assert res.exit_code == 0 and json.loads(res.stdout)[0]["model"] == "bad\\xffname"
    res = CliRunner().invoke(cli, ["report", "--config", folder, "--method", "lora", "--out-dir", "out"])
    assert res.exit_code == 0, res.output
    data = json.loads(Path("out", "bad-xffname", "results.json").read_text(encoding="utf-8"))
    assert data["rows"][0]["model"] == "bad\\xffname"


def test_configs_in_one_folder_are_named_after_their_files(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.json").write_text(json.dumps(LLAMA_TINY))
    (tmp_path / "configs" / "big.json").write_text(json.dumps(dict(LLAMA_TINY, num_hidden_layers=4)))
    res = run("report", "--config", tmp_path / "configs" / "small.json", "--config", tmp_path / "configs" / "big.json",
              "--method", "lora", "--out-dir", tmp_path / "out", "--name", "two")
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "out" / "two" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["small", "big"]


def test_plain_lorabench_prints_its_help():
    res = run()
    assert res.exit_code == 0 and res.stdout.startswith("Usage: ") and "Commands:" in res.stdout


def test_closed_stdout_is_an_error():
    res = subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} -m lorabench params >&-"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "standard output is closed" in res.stderr


def test_a_rank_given_twice_is_one_row():
    rows = json.loads(run("params", "--method", "lora", "-r", "8", "-r", "16", "-r", "8", "-f", "json").stdout)
    assert [r["rank"] for r in rows] == [8, 16]


def test_ctrl_c_during_the_benchs_imports_ends_cleanly(tmp_path):
    """A signal that lands while torch/transformers modules are importing takes effect once they are whole:
    exit 130 and one line, not a half-imported module's odd error or an abort."""
    pytest.importorskip("torch")
    code = ("import os, signal\n"
            "import lorabench.measure.bench as b\n"
            "from lorabench.cli import cli\n"
            "real = b._preload\n"
            "def preload(*args):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    real(*args)\n"
            "    print('imports finished', flush=True)\n"
            "b._preload = preload\n"
            "cli(['bench', '-m', 'tiny-llama', '--device', 'cpu', '--no-progress', '-o', "
            f"{str(tmp_path / 'rows.json')!r}], prog_name='lorabench')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 130 and "imports finished" in res.stdout, res.stderr
    assert "Traceback" not in res.stderr and "interrupted" in res.stderr


def test_two_first_reports_into_one_name_both_land(tmp_path, monkeypatch):
    """Another run publishes the same new name between our check and our rename: ours is swapped in as
    over any report (the rename's ENOTEMPTY is not a failure)."""
    assert run("report", "--method", "lora", "--out-dir", tmp_path, "--name", "other").exit_code == 0
    real = os.rename
    raced = []

    def rename(src, dst):
        if Path(dst).name == "r" and not raced:  # the other run wins the race
            raced.append(True)
            real(tmp_path / "other", tmp_path / "r")
        return real(src, dst)

    monkeypatch.setattr(safeio.os, "rename", rename)
    res = run("report", "--method", "vera", "--out-dir", tmp_path, "--name", "r")
    assert res.exit_code == 0 and raced, res.output
    assert json.loads((tmp_path / "r" / "results.json").read_text())["rows"][0]["method"] == "vera"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


# --------------------------------------------------------------------------------------------------
# Issue 21: stray lock files, --force on -o, failed cases, short writes to stdout.


def test_bad_input_after_the_output_check_leaves_no_lock(tmp_path, fake_bench):
    """Finding 7: `bench -o out.json --gpu bogus` exited 2 and left .out.json.lock."""
    line = one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", tmp_path / "out.json",
                              "--gpu", "bogus"))
    assert "unknown GPU 'bogus'" in line and list(tmp_path.iterdir()) == []


def test_bad_input_found_by_the_run_leaves_no_lock(tmp_path, monkeypatch):
    def run_bench(*args, **kw):
        raise LorabenchError("--steps and --warmup must be at least 1.")

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)  # the real one times products on this CPU
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", tmp_path / "out.json"))
    assert list(tmp_path.iterdir()) == []


# lorabench.measure.bench imported with a signal sent to the process as its import starts: the stand-in for a
# SIGTERM or Ctrl-C that lands while torch imports (a fake module, so that the test needs no torch).
_SIGNAL_IN_IMPORT = """
import importlib.abc, importlib.util, os, sys, types
class Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        os.kill(os.getpid(), {sig})
        module.run_bench = lambda *a, **k: print('the run started')
        module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)
class Finder:
    def find_spec(self, name, path=None, target=None):
        if name == 'lorabench.measure.bench':
            return importlib.util.spec_from_loader(name, Loader())
sys.meta_path.insert(0, Finder())
sys.argv = ['lorabench', 'bench', '-m', 'tiny-llama', '--device', 'cpu', '-o', {out!r}]
from lorabench.__main__ import main
main()
"""


@pytest.mark.parametrize("sig, code, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_a_signal_while_torch_imports_gives_the_count_and_no_lock(tmp_path, sig, code, name):
    """Finding 7: a signal 0.8 to 4 s into `bench -o` (torch importing) left .out.json.lock and said
    "terminated (SIGTERM)" instead of how many cases finished."""
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, "-c", _SIGNAL_IN_IMPORT.format(sig=int(sig), out=str(out))],
                         capture_output=True, text=True)
    assert res.returncode == code, res.stderr
    assert res.stderr.endswith(f"lorabench: interrupted ({name}) after 0 case(s).\n"), res.stderr
    assert "the run started" not in res.stdout and list(tmp_path.iterdir()) == []


def test_a_sigterm_while_the_cli_imports_is_143_and_one_line():
    code = ("import os, signal, sys\n"
            "class Terminate:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'lorabench.cli':\n"
            "            os.kill(os.getpid(), signal.SIGTERM)\n"
            "sys.meta_path.insert(0, Terminate())\n"
            "sys.argv = ['lorabench', 'params']\n"
            "from lorabench.__main__ import main\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 143 and res.stderr == "lorabench: terminated (SIGTERM).\n" and res.stdout == ""


@pytest.mark.parametrize("make", ["folder", "fifo", "another user's file"])
def test_force_on_an_output_moves_only_a_regular_file_of_the_users(tmp_path, fake_bench, make):
    """Finding 9, for bench -o: --force moves aside a regular file of the user's, nothing else."""
    out = tmp_path / "out.json"
    if make == "folder":
        out.mkdir()
        (out / "keep").write_text("mine")
    elif make == "fifo":
        os.mkfifo(out)
    else:
        if os.geteuid() != 0:
            pytest.skip("only root can give a file to another user")
        out.write_text("someone else's notes")
        os.chown(out, 54321, -1)
    line = one_error_line(run("bench", "-m", "tiny-llama", "--method", "lora", "-o", out, "--force"))
    assert str(out) in line and "choose another name" in line and fake_bench == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_what_appears_at_the_output_during_the_run_is_left_alone(tmp_path):
    """check_output_file ran before the run; a folder made at the path since (or, without --force, a file)
    is not moved aside when the first row is written: the row is refused instead."""
    out = tmp_path / "rows.json"
    for force in (True, False):
        sink = safeio.RowFile(out, lambda rows, fmt: json.dumps(rows), force=force)
        try:
            out.mkdir() if force else out.write_text("notes written during the run")
            with pytest.raises(LorabenchError, match="changed since the run started"):
                sink.add({"method": "lora"})
        finally:
            sink.close()
        assert (out.is_dir() if force else out.read_text() == "notes written during the run")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"]
        out.rmdir() if force else out.unlink()
    with pytest.raises(LorabenchError, match="not a regular file"):
        (tmp_path / "d").mkdir()
        safeio.move_aside(tmp_path / "d")


def test_a_failed_case_makes_bench_exit_1(tmp_path, monkeypatch):
    """Finding 10b: rows that say a case failed (a rank killed, a timeout) ended bench with exit code 0."""
    def run_bench(spec, methods, ranks, targets, setup, *, on_row=None, **kw):
        for rank, status, error in ((0, "stopped", "stopped by torchrun when rank 1 failed"),
                                    (1, "failed", "rank 1 was killed by SIGKILL (exit code -9) before it wrote "
                                                  "its row")):
            on_row({"lorabench_version": "test", "model": spec.name, "method": "lora", "rank": 8, "status": status,
                    "impl": "peft", "gpu_rank": rank, "error": error, "layers": 4, "full_layers": 4})

    module = types.ModuleType("lorabench.measure.bench")
    module.run_bench = run_bench
    module.cpu_dtype = lambda setup, dtype_given, device: (setup, None)  # the real one times products on this CPU
    monkeypatch.setitem(sys.modules, "lorabench.measure.bench", module)
    res = run("bench", "-m", "tiny-llama", "--method", "lora", "-f", "json", "-o", tmp_path / "rows.json")
    assert one_error_line(res, code=1) == ("lorabench: 1 of 2 row(s) failed (lora: rank 1 was killed by SIGKILL "
                                           "(exit code -9) before it wrote its row).")
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 2


TORCHRUN_LOG = """\
W1207 02:26:24.984000 5002 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 5006 closing signal SIGTERM
E1207 02:26:24.997000 5002 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: -9) local_rank: 1 (pid: 5007) of binary: python
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
======================================================
lorabench.measure.distributed_worker FAILED
------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_02:26:24
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 5006)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 5006
------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_02:26:24
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 5007)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 5007
======================================================
"""


def test_torchruns_failure_summary_names_the_rank_and_the_signal(tmp_path):
    """What torch 2.13's torchrun printed when rank 1 of 2 got SIGKILL (the rows said "error_file: <N/A>")."""
    from lorabench.measure.launch import describe_exit, rank_exits

    log = tmp_path / "torchrun.log"
    log.write_text(TORCHRUN_LOG)
    assert rank_exits(str(log)) == ({0: -15, 1: -9}, 1)
    assert describe_exit(-9) == "was killed by SIGKILL (exit code -9)" and describe_exit(3) == "exited with code 3"
    assert rank_exits(str(tmp_path / "missing.log")) == ({}, None)


def _limited_output(args, env_extra, limit=8192):
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(env_extra)
    return lambda out: subprocess.run([sys.executable, "-m", "lorabench", *args], stdout=out, stderr=subprocess.PIPE,
                                      text=True, env=env, preexec_fn=limit_file_size)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE is POSIX")
@pytest.mark.parametrize("unbuffered", [True, False])
def test_stdout_that_cannot_take_the_whole_answer_is_exit_1(tmp_path, unbuffered):
    """Finding 10c: `ulimit -f 8; lorabench memory ... -f json > big.json` exited 0 with the JSON cut at
    8,192 bytes (Python ignores SIGXFSZ; unbuffered, it drops a short write's count), or, buffered, said
    "Exception ignored" and exited 120."""
    args = ("memory", "-m", "llama-3-8b", "--method", "all", "-f", "json")
    whole = subprocess.run([sys.executable, "-m", "lorabench", *args], capture_output=True, text=True).stdout
    assert len(whole) > 8192
    runner = _limited_output(args, {"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    with open(tmp_path / "big.json", "w") as out:
        res = runner(out)
    assert res.returncode == 1 and res.stderr == (
        "lorabench: error: cannot write the whole output to standard output: File too large; what it got is "
        "cut short.\n"), res.stderr
    with open(tmp_path / "small.json", "w") as out:  # an answer under the limit is unaffected
        res = _limited_output(("params", "--method", "lora", "-f", "json"), {})(out)
    assert res.returncode == 0 and res.stderr == ""
    assert json.loads((tmp_path / "small.json").read_text())[0]["method"] == "lora"
