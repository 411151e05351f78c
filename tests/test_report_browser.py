"""Every committed reports/*/report.html in headless Chromium (scripts/check_reports.py): no broken image, no
page-wide horizontal overflow at 1280 and 800 px, the verdict columns in view, and a screenshot of each.
Skipped where /usr/bin/chromium is absent (apt-get install -y chromium); the whole check takes a few
seconds."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_reports.py"


def _load():
    spec = importlib.util.spec_from_file_location("check_reports", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_reports = _load()
pytestmark = pytest.mark.skipif(not Path(check_reports.CHROMIUM).exists(),
                                reason=f"{check_reports.CHROMIUM} not installed (apt-get install -y chromium)")


def test_committed_reports_read_well_in_a_browser(tmp_path):
    pages = check_reports.committed_reports(REPO)
    assert len(pages) >= 4
    results = check_reports.check_reports(pages, screenshots=tmp_path)
    assert len(results) == 2 * len(pages)
    problems = [f"{Path(r['page']).parent.name} @{r['width']}px: {p}" for r in results for p in r["problems"]]
    assert problems == []
    for r in results:
        assert r["images"] >= 4  # every figure drawn: none left out, none broken
        shot = Path(r["screenshot"])
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_check_finds_a_broken_image_and_a_wide_page(tmp_path):
    page = tmp_path / "bad" / "report.html"
    page.parent.mkdir()
    page.write_text('<!DOCTYPE html><html><body><img alt="gone" src="data:image/png;base64,AAAA">'
                    '<table><tr><th>fits 1 GPU</th><td style="padding-left: 3000px">x</td></tr></table>'
                    "</body></html>")
    (result,) = check_reports.check_reports([page], widths=(800,))
    assert any(p.startswith("broken images: gone") for p in result["problems"])
    assert any(p.startswith("page-wide horizontal overflow") for p in result["problems"])


def test_script_exit_status(tmp_path):
    page = tmp_path / "ok" / "report.html"
    page.parent.mkdir()
    page.write_text("<!DOCTYPE html><html><body><p>fine</p></body></html>")
    assert check_reports.main([str(page)]) == 0
    assert check_reports.main([str(page), "--chromium", str(tmp_path / "no-such-browser")]) == 2
