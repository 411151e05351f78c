#!/usr/bin/env python3
"""Load report.html files in headless Chromium and check what a reader sees.

For each page, at each viewport width (1280 and 800 px by default):
- no broken image (every <img> complete, naturalWidth > 0);
- no page-wide horizontal overflow (document.documentElement.scrollWidth <= clientWidth);
- the verdict columns ("fits 1 GPU", "GPUs (FSDP)") visible without scrolling their table sideways;
and a full-page screenshot per page and width when --screenshots DIR is given.

Chromium is driven over the Chrome DevTools Protocol on a pipe (--remote-debugging-pipe: commands on fd 3,
replies on fd 4, each message JSON ended by a NUL byte), so nothing beyond the standard library and the
browser is needed.

Example:
    python scripts/check_reports.py                       # every reports/*/report.html
    python scripts/check_reports.py reports/h100-llama-3-8b/report.html --screenshots /tmp/shots
Exit status: 0 when every page passes, 1 otherwise, 2 when Chromium cannot start.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

CHROMIUM = "/usr/bin/chromium"
WIDTHS = (1280, 800)
HEIGHT = 900
# The network is closed here: without the background-networking flags chromium floods refused connections.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-pipe")
VERDICT_HEADERS = ("fits 1 GPU", "GPUs (FSDP)")
MAX_SHOT_HEIGHT = 16384  # Chromium's largest texture
TIMEOUT_S = 60  # for any one reply

# Evaluated in the page: what a reader would see broken.
PROBE = """(() => {
  const root = document.documentElement;
  const broken = Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => (i.alt || i.src.slice(0, 40)));
  const wide = Array.from(document.body.querySelectorAll('*'))
    .filter(e => e.getBoundingClientRect().right > root.clientWidth + 0.5 && !e.closest('.scroll'))
    .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : ''));
  const hidden = Array.from(document.querySelectorAll('th'))
    .filter(th => HEADERS.includes(th.textContent.trim()))
    .filter(th => {
      const box = th.closest('.scroll') || root;
      const right = Math.min(box.getBoundingClientRect().right, root.clientWidth);
      return th.getBoundingClientRect().right > right + 0.5;
    }).map(th => th.textContent.trim());
  return {scrollWidth: root.scrollWidth, clientWidth: root.clientWidth, height: root.scrollHeight,
          images: document.images.length, broken: broken, wide: wide, hidden: hidden};
})()"""


class Browser:
    """One headless Chromium, driven over its DevTools pipe."""

    def __init__(self, executable: str = CHROMIUM):
        self.profile = tempfile.mkdtemp(prefix="lorabench-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # the child reads commands on fd 3 and writes replies on fd 4: bash moves the pipe ends there
        # (numbered 10 and up first, so that moving one cannot overwrite the other; dash takes one digit)
        r, w = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
        for fd in (to_child_r, from_child_w):
            os.close(fd)
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{r} 4>&{w} {r}<&- {w}>&-',
             executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(r, w))
        os.close(r)
        os.close(w)
        self._reader = os.fdopen(self._from_child, "rb", buffering=0)
        self._buf = b""
        self._next_id = 0
        self.session: Optional[str] = None

    def _send(self, method: str, params: Optional[Dict] = None, session: Optional[str] = None) -> int:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        return self._next_id

    def _read(self) -> Dict:
        while b"\0" not in self._buf:
            if not select.select([self._reader], [], [], TIMEOUT_S)[0]:
                raise RuntimeError(f"chromium did not answer within {TIMEOUT_S} s")
            chunk = self._reader.read(1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed its DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: Optional[Dict] = None, *, wait_event: Optional[str] = None,
             browser: bool = False) -> Dict:
        """Send a command, return its result (after wait_event has arrived too, when given)."""
        msg_id = self._send(method, params, None if browser else self.session)
        result, seen = None, wait_event is None
        while result is None or not seen:
            msg = self._read()
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error'].get('message')}")
                result = msg.get("result", {})
            elif wait_event and msg.get("method") == wait_event:
                seen = True
        return result

    def open_page(self) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")

    def load(self, path: Path, width: int, height: int = HEIGHT) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": path.resolve().as_uri()}, wait_event="Page.loadEventFired")

    def evaluate(self, expression: str):
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def screenshot(self, out: Path, width: int, height: int) -> None:
        """The whole page (up to Chromium's largest texture) as a PNG."""
        import base64

        full = min(height, MAX_SHOT_HEIGHT)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": full, "deviceScaleFactor": 1, "mobile": False})
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        out.write_bytes(base64.b64decode(data))
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})

    def close(self) -> None:
        try:
            self._send("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_child)
            self._reader.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        try:
            self.open_page()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_page(browser: Browser, page: Path, widths: Sequence[int] = WIDTHS,
               screenshots: Optional[Path] = None) -> List[Dict]:
    """One result per width: the probe's findings and the problems found (an empty list passes)."""
    results = []
    for width in widths:
        browser.load(page, width)
        found = browser.evaluate(f"const HEADERS = {json.dumps(list(VERDICT_HEADERS))}; {PROBE}")
        problems = []
        if found["broken"]:
            problems.append(f"broken images: {', '.join(found['broken'])}")
        if found["images"] == 0 and "<img" in page.read_text(encoding="utf-8"):
            problems.append("images in the file but none in the page")
        if found["scrollWidth"] > found["clientWidth"]:
            problems.append(f"page-wide horizontal overflow: scrollWidth {found['scrollWidth']} > clientWidth "
                            f"{found['clientWidth']} (widest: {', '.join(found['wide'])})")
        if found["hidden"]:
            problems.append(f"verdict columns out of view: {', '.join(found['hidden'])}")
        shot = None
        if screenshots is not None:
            shot = screenshots / f"{page.parent.name}-{width}.png"
            browser.screenshot(shot, width, found["height"])
        results.append({"page": str(page), "width": width, **found, "problems": problems,
                        "screenshot": str(shot) if shot else None})
    return results


def committed_reports(root: Path) -> List[Path]:
    """Every reports/*/report.html under root."""
    return sorted(root.glob("reports/*/report.html"))


def check_reports(pages: Sequence[Path], widths: Sequence[int] = WIDTHS, screenshots: Optional[Path] = None,
                  executable: str = CHROMIUM) -> List[Dict]:
    """check_page for each page in one browser."""
    if screenshots is not None:
        screenshots.mkdir(parents=True, exist_ok=True)
    with Browser(executable) as browser:
        return [r for page in pages for r in check_page(browser, page, widths, screenshots)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="report.html files (default: reports/*/report.html)")
    parser.add_argument("--screenshots", type=Path, default=None, help="folder for full-page PNGs")
    parser.add_argument("--width", type=int, action="append", help=f"viewport width (default {WIDTHS})")
    parser.add_argument("--chromium", default=CHROMIUM, help=f"the browser (default {CHROMIUM})")
    args = parser.parse_args(argv)
    pages = args.pages or committed_reports(Path(__file__).resolve().parent.parent)
    if not Path(args.chromium).exists():
        print(f"check_reports: {args.chromium} not found (apt-get install -y chromium)", file=sys.stderr)
        return 2
    results = check_reports(pages, tuple(args.width or WIDTHS), args.screenshots, args.chromium)
    for r in results:
        verdict = "ok" if not r["problems"] else "FAIL: " + "; ".join(r["problems"])
        print(f"{r['page']} @{r['width']}px: {r['images']} images, scrollWidth {r['scrollWidth']}/"
              f"{r['clientWidth']}: {verdict}" + (f" [{r['screenshot']}]" if r["screenshot"] else ""))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
