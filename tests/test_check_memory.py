"""benchmarks/check_memory.py: peak-memory regressions between two pytest-benchmark runs."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_memory.py"
_spec = importlib.util.spec_from_file_location("check_memory", SCRIPT)
check_memory = sys.modules["check_memory"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(check_memory)

MiB = 1024 ** 2
FILE = "benchmarks/test_bench_train.py"
LORA, FULL, DORA, CORE = (f"{FILE}::test_train_step_cuda[lora-r8]", f"{FILE}::test_train_step_cuda[full]",
                          f"{FILE}::test_train_step_cuda[dora-r8]", "benchmarks/test_bench_core.py::test_params")
BASE_PEAKS = {LORA: 7000 * MiB, FULL: 14000 * MiB}


def _bench(fullname, peak=None, error=None, group="lora"):
    """One entry as pytest-benchmark writes it (fields check_memory does not read abridged)."""
    extra = {} if peak is None else {"peak_bytes": peak}
    if error is not None:
        extra["peak_error_pct"] = error
    return {"group": group, "name": fullname.split("::")[-1], "fullname": fullname, "params": None,
            "param": None, "extra_info": extra, "options": {"disable_gc": False, "timer": "perf_counter"},
            "stats": {"min": 0.02, "max": 0.03, "mean": 0.025, "median": 0.025, "rounds": 10}}


def _run_file(path, benchmarks):
    path.write_text(json.dumps({"machine_info": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "commit_info": {},
                                "benchmarks": benchmarks, "datetime": "2026-11-24T17:00:00",
                                "version": "5.2.3"}))
    return str(path)


@pytest.fixture
def baseline(tmp_path):
    return _run_file(tmp_path / "baseline.json",
                     [_bench(n, p) for n, p in BASE_PEAKS.items()] + [_bench(CORE, group="estimate")])


def _current(tmp_path, peaks, errors=None):
    errors = errors or {}
    return _run_file(tmp_path / "current.json", [_bench(n, p, errors.get(n)) for n, p in peaks.items()])


def test_growth_within_the_threshold_passes(tmp_path, baseline, capsys):
    # LoRA +4.9%, full -10%: neither grew past 5%.
    current = _current(tmp_path, {LORA: int(7000 * MiB * 1.049), FULL: 12600 * MiB})
    assert check_memory.main([baseline, current, "--max-increase-pct", "5"]) == 0
    out = capsys.readouterr().out
    assert "+4.90" in out and "-10.00" in out and "12600.0" in out
    assert "0 peak(s) grew" in out


def test_growth_past_the_threshold_fails(tmp_path, baseline, capsys):
    current = _current(tmp_path, {LORA: 7420 * MiB, FULL: 14000 * MiB})  # LoRA +6%
    assert check_memory.main([baseline, current, "--max-increase-pct", "5"]) == 1
    out = capsys.readouterr().out
    lora_line = next(line for line in out.splitlines() if "lora-r8" in line)
    assert "+6.00" in lora_line and "REGRESSION" in lora_line
    assert "1 peak(s) grew more than 5%" in out
    # A looser threshold lets it through.
    assert check_memory.main([baseline, current, "--max-increase-pct", "6.5"]) == 0


def test_compare_rows_exact_numbers():
    base = {LORA: _bench(LORA, 1000), FULL: _bench(FULL, 2000)}
    now = {LORA: _bench(LORA, 1050), DORA: _bench(DORA, 3000, error=-3.5)}
    rows = {r.fullname: r for r in check_memory.compare(base, now, 5.0, max_estimate_error_pct=3.0)}
    assert rows[LORA].change_pct == 5.0 and not rows[LORA].grew and rows[LORA].status == "ok"  # 5% is allowed
    assert (rows[DORA].baseline_bytes, rows[DORA].current_bytes, rows[DORA].change_pct) == (None, 3000, None)
    assert rows[DORA].estimate_off and rows[DORA].status == "ESTIMATE"
    assert rows[FULL].current_bytes is None and rows[FULL].status == "missing" and not rows[FULL].failed
    assert check_memory.change_pct(0, 0) == 0.0 and math.isinf(check_memory.change_pct(0, 1))


def test_new_and_missing_benchmarks_do_not_fail(tmp_path, baseline, capsys):
    current = _current(tmp_path, {LORA: 7000 * MiB, DORA: 7100 * MiB})
    assert check_memory.main([baseline, current]) == 0
    out = capsys.readouterr().out
    assert "new" in next(line for line in out.splitlines() if "dora-r8" in line)
    assert "missing" in next(line for line in out.splitlines() if "[full]" in line)
    assert "test_params" not in out  # timing-only benchmarks have no peak to compare


def test_estimate_error_fails_only_when_asked(tmp_path, baseline, capsys):
    current = _current(tmp_path, dict(BASE_PEAKS), errors={LORA: -1.2, FULL: 3.5})
    assert check_memory.main([baseline, current]) == 0
    assert check_memory.main([baseline, current, "--max-estimate-error-pct", "5"]) == 0
    capsys.readouterr()
    assert check_memory.main([baseline, current, "--max-estimate-error-pct", "2"]) == 1
    out = capsys.readouterr().out
    assert "1 estimate(s) off by more than 2%" in out
    full_line = next(line for line in out.splitlines() if "[full]" in line)
    assert "+3.50" in full_line and "ESTIMATE" in full_line


def _bad_input(capsys, *argv):
    assert check_memory.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_missing_file(tmp_path, baseline, capsys):
    assert "cannot read" in _bad_input(capsys, baseline, tmp_path / "nope.json")


def test_bad_json(tmp_path, baseline, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    assert "is not JSON" in _bad_input(capsys, tmp_path / "bad.json", baseline)


@pytest.mark.parametrize("content", [[], {"benchmarks": {}}, {"results": []}, {"benchmarks": [{"name": "x"}]}],
                         ids=["list", "dict-benchmarks", "no-benchmarks", "no-fullname"])
def test_not_a_benchmark_run(tmp_path, baseline, capsys, content):
    (tmp_path / "other.json").write_text(json.dumps(content))
    _bad_input(capsys, baseline, tmp_path / "other.json")


@pytest.mark.parametrize("field, value", [("peak_bytes", "7 GiB"), ("peak_bytes", -1), ("peak_bytes", True),
                                          ("peak_error_pct", "2%")])
def test_bad_numbers(tmp_path, baseline, capsys, field, value):
    bench = _bench(LORA, 1000, error=1.0)
    bench["extra_info"][field] = value
    _run_file(tmp_path / "current.json", [bench])
    assert f"bad {field}" in _bad_input(capsys, baseline, tmp_path / "current.json")


def test_current_run_without_peaks(tmp_path, baseline, capsys):
    # A run on a machine without CUDA: every training benchmark skipped, nothing to check.
    _run_file(tmp_path / "cpu.json", [_bench(CORE, group="estimate")])
    assert "were the CUDA benchmarks skipped" in _bad_input(capsys, baseline, tmp_path / "cpu.json")


def test_negative_threshold_is_a_usage_error(baseline):
    with pytest.raises(SystemExit) as exc:
        check_memory.main([baseline, baseline, "--max-increase-pct", "-1"])
    assert exc.value.code == 2


def test_script_on_a_real_pytest_benchmark_run(tmp_path):
    """The layout check_memory reads is the one the installed pytest-benchmark writes; the script
    runs as a command and reports bad input without a traceback."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_fake.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('peak', [1000, 2000])\n"
        "def test_peak(benchmark, peak):\n"
        "    benchmark.pedantic(lambda: None, rounds=1)\n"
        "    benchmark.extra_info.update(peak_bytes=peak, peak_error_pct=0.5)\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                           "--benchmark-json", "base.json", "test_fake.py"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    run = json.loads((tmp_path / "base.json").read_text())
    run["benchmarks"][1]["extra_info"]["peak_bytes"] = 2200  # test_peak[2000] grows 10%
    (tmp_path / "current.json").write_text(json.dumps(run))

    def script(*argv):
        return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=tmp_path, capture_output=True, text=True)

    grew = script("base.json", "current.json", "--max-increase-pct", "5")
    assert grew.returncode == 1 and "+10.00" in grew.stdout
    assert script("base.json", "current.json", "--max-increase-pct", "10").returncode == 0
    missing = script("base.json", "absent.json")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
