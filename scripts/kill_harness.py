"""Send SIGINT or SIGTERM at random moments to `lorabench bench -o`, `bench --nproc 2 -o` and `report`, and check
what each run leaves (issue 21, "Prove it").

    python scripts/kill_harness.py RUNS SEED [--kinds bench,nproc,report] [--log FILE]

Each run gets a folder of its own (its outputs, and $TMPDIR for its processes); half the runs find an old output
there first (bench rows, or a report folder). The signal goes to the lorabench process at a time drawn uniformly
from 0.1 s to 1.2 times the command's calibrated duration: Python's start-up, torch's import, the run, the writing
and, now and then, after the end. After each run:

- exit code 130 (SIGINT) or 143 (SIGTERM), or 0 when the run had finished before the signal was sent;
- no traceback on stderr;
- bench -o: the file absent, untouched (when there was one), or whole JSON/CSV whose rows are bench rows;
- report: the old folder byte for byte, or a new complete report (its marker, results.json loading); none when
  there was none and the run was stopped before its swap; and the signal ends it within HELD_S (an
  estimate-only report holds a signal only through its swap, a few renames: held longer, it was written and
  swapped in after the signal, the old report replaced);
- no .NAME.lock, .NAME.tmp-*, .NAME.old-* or *.replaced-* in the output folder, no lorabench-dist-* (nor
  torchelastic_*) in $TMPDIR;
- no process left whose command line or environment names the run's folder (torchrun and its workers).

One line per run, then a summary; the exit code is 1 when any run broke a rule. Runs take a few seconds each
(tiny-llama, one layer, 32 tokens, one step).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lorabench.report.build import read_results  # noqa: E402
from lorabench.report.folder import MARKER, is_report_folder  # noqa: E402
from lorabench.safety.files import ROW_KEYS  # noqa: E402

TINY = ["-m", "tiny-llama", "--device", "cpu", "--layers", "1", "-s", "32", "-b", "1", "--steps", "1", "--warmup",
        "1", "--no-progress"]
KINDS = ("bench", "nproc", "report")
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}
LEFTOVER = re.compile(r"^\..+\.(lock|tmp-\d+-[0-9a-f]{8}|old-\d+-[0-9a-f]{8})$|\.replaced-")
WAIT_S = 120  # bench --nproc stops torchrun with a 10 s grace; anything past this is a hang
HELD_S = 1.5  # report: the most a signal may wait (the swap takes milliseconds; this allows a loaded machine)


def command(kind: str, out: Path, fmt: str) -> List[str]:
    if kind == "bench":
        return ["bench", *TINY, "--method", "lora,lora-fa", "-o", str(out / f"rows.{fmt}")]
    if kind == "nproc":
        return ["bench", *TINY, "--impl", "lorabench", "--method", "lora,full", "--nproc", "2", "--sharding", "fsdp",
                "-o", str(out / f"rows.{fmt}")]
    return ["report", "-m", "llama-3-8b", "-m", "mistral-7b", "--method", "all", "-r", "8", "-r", "64", "--out-dir",
            str(out), "--name", "r"]


def old_rows(path: Path) -> None:
    """A rows file an earlier bench wrote (bench replaces it at its first row)."""
    row = {"lorabench_version": "0.old", "model": "tiny-llama", "method": "lora", "rank": 8, "status": "ok",
           "impl": "peft", "note": "an earlier run"}
    if path.suffix == ".json":
        path.write_text(json.dumps([row], indent=2) + "\n")
    else:
        path.write_text(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")


def snapshot(folder: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def rows_problem(path: Path) -> Optional[str]:
    """None if path holds whole bench rows, else what is wrong."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except ValueError as exc:
            return f"{path.name} is not whole JSON ({exc})"
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and set(ROW_KEYS) <= set(r)
                                                             for r in rows):
            return f"{path.name} holds no bench rows"
        return None
    lines = list(csv.DictReader(io.StringIO(text)))
    if not lines or not set(ROW_KEYS) <= set(lines[0]) or not text.endswith("\n"):
        return f"{path.name} is not whole CSV with bench rows"
    if any(None in r or None in r.values() for r in lines):
        return f"{path.name} has a row cut short"
    return None


def report_problem(folder: Path) -> Optional[str]:
    if not (folder / MARKER).is_file() or not is_report_folder(folder):
        return "the report folder is not a complete lorabench report"
    try:
        if not read_results(folder)["rows"]:
            return "results.json has no rows"
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"results.json does not load: {exc}"
    return None


def processes_naming(text: str) -> List[str]:
    """'pid cmdline' of every process whose command line or environment contains text."""
    found, needle = [], text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            shown = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            found.append(f"{entry} {shown}")
    return found


def one_run(i: int, kind: str, sig_name: str, at_s: float, prior: bool, fmt: str, old_report: Path,
            python: str = sys.executable, parent: Optional[str] = None) -> Dict:
    """Run kind, send sig_name at at_s seconds, check what is left (see the module's docstring). The run's
    folder is removed unless a rule was broken; "problems" lists those."""
    work = Path(tempfile.mkdtemp(prefix=f"lorabench-kill-{i}-", dir=parent))
    out, tmp = work / "out", work / "tmp"
    out.mkdir()
    tmp.mkdir()
    rows_path = out / f"rows.{fmt}"
    if prior and kind == "report":
        shutil.copytree(old_report, out / "r")
    elif prior:
        old_rows(rows_path)
    before = snapshot(out / "r") if kind == "report" else (rows_path.read_bytes() if prior else None)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp), LORABENCH_KILL_RUN=str(work))
    sig, code = SIGNALS[sig_name]
    started = time.monotonic()
    proc = subprocess.Popen([python, "-m", "lorabench", *command(kind, out, fmt)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=work)
    sent = False
    try:
        proc.wait(at_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        sent = True
    problems = []
    try:
        stdout, stderr = proc.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        problems.append(f"still running {WAIT_S} s after the signal")
    took = time.monotonic() - started
    held = took - at_s if sent else 0.0
    expected = (code, 0) if sent else (0,)  # 0 also when the signal landed after the work, during the exit
    if proc.returncode not in expected:
        problems.append(f"exit code {proc.returncode}, expected {' or '.join(map(str, expected))}")
    if "Traceback" in stderr:
        problems.append("a traceback on stderr")
    outcome = ""
    if kind == "report":
        folder = out / "r"
        if not folder.exists():
            outcome = "no report"
            if prior:
                problems.append("the old report is gone")
        elif prior and snapshot(folder) == before:
            outcome = "old report kept"
        else:
            outcome = "new report"
            if (why := report_problem(folder)):
                problems.append(why)
        if sent and proc.returncode == code and held > HELD_S:
            problems.append(f"the signal was held {held:.1f} s ({outcome})")
    else:
        if not rows_path.exists():
            outcome = "no file"
            if prior:
                problems.append(f"the old {rows_path.name} is gone")
        elif prior and rows_path.read_bytes() == before:
            outcome = "old file kept"
        else:
            outcome = "new rows"
            why = rows_problem(rows_path)
            if why:
                problems.append(why)
            else:
                n = (len(json.loads(rows_path.read_text())) if fmt == "json"
                     else len(rows_path.read_text().splitlines()) - 1)
                outcome = f"new rows ({n})"
    left = sorted(p.name for p in out.iterdir() if LEFTOVER.search(p.name))
    if left:
        problems.append(f"left in the output folder: {', '.join(left)}")
    temps = sorted(p.name for p in tmp.iterdir() if p.name.startswith(("lorabench-dist-", "torchelastic_")))
    if temps:
        problems.append(f"left in $TMPDIR: {', '.join(temps)}")
    deadline, alive = time.monotonic() + 5, processes_naming(str(work))
    while alive and time.monotonic() < deadline:  # a SIGKILLed worker can take a moment to be reaped
        time.sleep(0.2)
        alive = processes_naming(str(work))
    if alive:
        problems.append(f"processes left: {'; '.join(alive)}")
        for entry in alive:
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except OSError:
                pass
    said = next((line for line in reversed(stderr.splitlines()) if line.startswith("lorabench:")
                 and "note:" not in line), "")
    if not problems:
        shutil.rmtree(work, ignore_errors=True)
    return {"i": i, "kind": kind, "signal": sig_name, "at_s": at_s, "sent": sent, "prior": prior, "fmt": fmt,
            "code": proc.returncode, "took_s": took, "held_s": held, "outcome": outcome, "said": said,
            "problems": problems, "work": str(work), "stdout_bytes": len(stdout)}


def make_old_report(folder: Path, python: str = sys.executable) -> Path:
    """A report folder (folder/r) for the runs that find one there."""
    subprocess.run([python, "-m", "lorabench", "report", "-m", "llama-3-8b", "--method", "lora", "--out-dir",
                    str(folder), "--name", "r"], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return folder / "r"


def calibrate(kind: str, python: str) -> float:
    """Seconds one run of kind takes here, with no signal (it must succeed)."""
    work = Path(tempfile.mkdtemp(prefix="lorabench-kill-cal-"))
    (work / "out").mkdir()
    started = time.monotonic()
    res = subprocess.run([python, "-m", "lorabench", *command(kind, work / "out", "json")], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=work)
    took = time.monotonic() - started
    if res.returncode != 0:
        sys.exit(f"calibration run of {kind} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    shutil.rmtree(work, ignore_errors=True)
    return took


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=int, help="how many runs")
    parser.add_argument("seed", type=int, help="random seed: the kinds, signals, moments and old outputs drawn")
    parser.add_argument("--kinds", default=",".join(KINDS), help="which commands, comma-separated (bench,nproc,report)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs lorabench")
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or set(kinds) - set(KINDS):
        parser.error(f"--kinds: choose from {', '.join(KINDS)}")
    rng = random.Random(args.seed)
    durations = {k: calibrate(k, args.python) for k in kinds}
    print("calibrated: " + ", ".join(f"{k} {s:.1f} s" for k, s in durations.items()), flush=True)
    old_report = Path(tempfile.mkdtemp(prefix="lorabench-kill-old-"))
    make_old_report(old_report, args.python)
    results = []
    for i in range(args.runs):
        kind = kinds[i % len(kinds)]
        sig_name = rng.choice(sorted(SIGNALS))
        at_s = round(rng.uniform(0.1, 1.2 * durations[kind]), 2)
        prior = rng.random() < 0.5
        fmt = rng.choice(("json", "csv"))
        r = one_run(i, kind, sig_name, at_s, prior, fmt, old_report / "r", args.python)
        results.append(r)
        what = f"{kind}{'' if kind == 'report' else '-' + fmt}{' (old output there)' if prior else ''}"
        verdict = "ok" if not r["problems"] else "VIOLATION: " + "; ".join(r["problems"]) + f" [kept: {r['work']}]"
        when = (f"exit {r['code']:4d} {r['held_s']:4.1f} s later" if r["sent"]
                else f"ended first, exit {r['code']}")
        print(f"run {i:3d} {what:34s} {sig_name:7s} at {at_s:5.2f} s: {when:22s} {r['outcome']:15s} "
              f"{r['said'][:70]!r}  {verdict}", flush=True)
    shutil.rmtree(old_report, ignore_errors=True)
    counts = collections.Counter((r["kind"], r["signal"]) for r in results)
    sent = collections.Counter((r["kind"], r["signal"]) for r in results if r["sent"])
    bad = [r for r in results if r["problems"]]
    print(f"\nsummary: {len(results)} runs, seed {args.seed}")
    for (kind, sig_name), n in sorted(counts.items()):
        print(f"  {kind:7s} {sig_name:7s} {n:3d} runs, {sent[(kind, sig_name)]:3d} signalled before the end")
    outcomes = collections.Counter((r["kind"], r["outcome"].split(" (")[0]) for r in results)
    print("  outcomes: " + ", ".join(f"{k} {o}: {n}" for (k, o), n in sorted(outcomes.items())))
    print(f"  violations: {len(bad)}" + "".join(f"\n    run {r['i']}: {'; '.join(r['problems'])}" for r in bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
