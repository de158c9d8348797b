"""`qlorax report DIR --html OUT`: one self-contained page, checked in a real headless Chromium.

Chromium is Debian's `chromium`, installed by scripts/install_test_services.sh (make test); a
machine without it fails these tests, it does not skip them. What is checked in the browser:
`--dump-dom` gives the DOM after rendering (the score and the digests must be in it); a
screenshot at 1200x1600 must decode and not be one colour; and Chromium's log
(`--enable-logging=stderr --v=0`) must hold no console message at all: the page has no script,
so any console line is an error, including the Content Security Policy's "violates ... blocked"
line for any resource the page tried to fetch (test_console_check_sees_errors_and_blocked_loads
shows the check catching both). Statically: no src/href attribute points at http(s)://, and no
script, link, iframe or object element is in the page.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import assert_no_traceback, run_cli
from qlorax import layout
from qlorax.analysis.html import REPORT_HTML, write_html
from qlorax.analysis.workflow import run_analyze
from qlorax.artifacts import read_json, write_json_atomic
from synthetic_runs import make_run

CONSOLE_LINE = re.compile(r":CONSOLE[:(]")


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is missing: run `bash scripts/install_test_services.sh` (installs Debian's chromium)")
    return path


def _browser(page: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, page.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_LINE.search(line)]


def render(page: Path, tmp: Path) -> tuple[str, bytes, list[str]]:
    """(the DOM after rendering, a 1200x1600 screenshot PNG, the console messages of both loads)."""
    dom = _browser(page, tmp, "--dump-dom")
    shot = tmp / f"{page.stem}.png"
    screenshot = _browser(page, tmp, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    return dom.stdout, shot.read_bytes(), console_lines(dom.stderr) + console_lines(screenshot.stderr)


def assert_not_blank(png: bytes) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    assert image.size == (1200, 1600)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, f"screenshot has {len(colours or [])} colours: blank?"
    top = image.convert("L").crop((0, 0, 1200, 200)).getextrema()
    assert top[0] < 100 < top[1], "no dark text in the top of the page"


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "srcset", "action")]


def assert_self_contained(text: str) -> None:
    parser = _Elements()
    parser.feed(text)
    external = [link for link in parser.links if re.match(r"\s*(https?:)?//", link, re.I)]
    assert not external, external
    assert not {"script", "link", "iframe", "object", "embed"} & set(parser.tags)
    assert "@import" not in text and "url(" not in text
    assert all(link.startswith("data:image/png;base64,") for link in parser.links), parser.links


# --------------------------------------------------------------------------- a real verification


@pytest.fixture(scope="module")
def verified(tiny_verification: tuple[Path, object]) -> Path:
    out, command = tiny_verification  # conftest: verify --runs 2 --threads 1 of the tiny config, 2 steps
    result = command.result()  # type: ignore[attr-defined]
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_verify_writes_the_page_next_to_the_report(verified: Path) -> None:
    page = verified / REPORT_HTML
    assert page.is_file() and (verified / layout.REPORT_JSON).is_file()
    assert_self_contained(page.read_text(encoding="utf-8"))


def test_report_page_of_a_verification_renders_in_chromium(verified: Path, tmp_path: Path) -> None:
    out = tmp_path / "page" / "verification.html"
    result = run_cli("report", str(verified), "--html", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert_no_traceback(result)
    text = out.read_text(encoding="utf-8")
    assert_self_contained(text)
    dom, png, console = render(out, tmp_path)
    assert console == [], console
    assert_not_blank(png)
    report = read_json(verified / layout.REPORT_JSON)
    metrics = report["overall_analysis"]["metrics_reproducibility"]
    adapter = next(iter(report["overall_analysis"]["artifact_agreement"][layout.ADAPTER_WEIGHTS]["digests"]))
    results = read_json(verified / "run-01" / layout.RESULTS)
    for fact in ("Reproducible: every run is bit-identical", '<strong id="score">1.000</strong>', adapter,
                 metrics["reference_digest"], results["config_hash"], results["data"]["sha256"],
                 results["base_model"]["digest"], "run-01", "run-02", "reproducibility_score", "PASS",
                 'src="data:image/png;base64,', "None: every run matches the reference."):
        assert fact in dom, fact


def test_the_model_card_summary_names_verdict_score_runs_and_digests(verified: Path) -> None:
    from qlorax.publish.card import report_summary
    from qlorax.publish.evidence import Evidence

    report = read_json(verified / layout.REPORT_JSON)
    digest = report["overall_analysis"]["metrics_reproducibility"]["reference_digest"]
    adapter = next(iter(report["overall_analysis"]["artifact_agreement"][layout.ADAPTER_WEIGHTS]["digests"]))
    text = report_summary(Evidence(verified=True, report_path=verified / layout.REPORT_JSON, score=1.0, runs=2))
    for fact in ("## Verification report", "**Verdict: reproducible**", "score 1.000", "2 of 2 runs",
                 f"`{digest}`", f"`{adapter}`", "| run-01 | 1 | 1 |", "| run-02 | 1 | 1 |"):
        assert fact in text, fact
    assert report_summary(Evidence(verified=False)) == ""


# --------------------------------------------------------------------------- runs that differ


@pytest.fixture(scope="module")
def diverging(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic runs: two agree, the third moved 3 ULPs in one tensor from step 5 on another processor."""
    root = tmp_path_factory.mktemp("diverging")
    make_run(root / "runs", "run-01")
    make_run(root / "runs", "run-02", threads=1)
    make_run(root / "runs", "run-03", perturb_ulps=3, diverge_at=5, cpu_capability="AVX2")
    run_analyze([root / "runs"], root / "analysis")
    return root / "analysis"


def test_report_page_of_diverging_runs_shows_divergence_environment_and_gates(diverging: Path,
                                                                             tmp_path: Path) -> None:
    page = write_html(diverging, tmp_path / "diverging.html")
    assert_self_contained(page.read_text(encoding="utf-8"))
    dom, png, console = render(page, tmp_path)
    assert console == [], console
    assert_not_blank(png)
    report = read_json(diverging / layout.REPORT_JSON)
    entry = report["divergence"][0]
    worst = max(entry["tensors"], key=lambda t: t.get("max_ulp_distance", -1))
    assert worst["max_ulp_distance"] == 3
    for fact in ("Not reproducible: runs differ", '<strong id="score">0.667</strong>', "Divergence",
                 f"<td>{entry['first_divergent_step']}</td>", worst["name"], "<td>3</td>",
                 "Environment differences", "cpu_capability", "AVX512", "AVX2", "environment_drift",
                 "FAIL", report["runs"][2]["deterministic_digest"]):
        assert fact in dom, fact


def test_every_value_is_escaped(diverging: Path, tmp_path: Path) -> None:
    report = read_json(diverging / layout.REPORT_JSON)
    hostile = '<img src="https://example.invalid/x.png" onerror="alert(1)"><script>alert(2)</script>'
    report["runs"][0]["name"] = hostile
    report["conclusions"].append(hostile)
    report["divergence"][0]["reason"] = hostile
    folder = tmp_path / "hostile"
    folder.mkdir()
    write_json_atomic(folder / layout.REPORT_JSON, report)
    page = write_html(folder, folder / "page.html")
    text = page.read_text(encoding="utf-8")
    assert hostile not in text and "&lt;script&gt;alert(2)&lt;/script&gt;" in text
    assert_self_contained(text)


def test_console_check_sees_errors_and_blocked_loads(tmp_path: Path) -> None:
    """The console check is real: a thrown error and a load the page's CSP blocks both show up."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="default-src '
                    "'none'; img-src data:; script-src 'unsafe-inline'\"></head><body><p>x</p>"
                    '<script>throw new Error("boom")</script><img src="https://example.invalid/x.png"></body></html>')
    console = console_lines(_browser(page, tmp_path, "--dump-dom").stderr)
    assert any("Uncaught Error: boom" in line for line in console), console
    assert any("example.invalid" in line and "Content Security Policy" in line for line in console), console


# --------------------------------------------------------------------------- the command


def test_a_directory_without_a_report_is_exit_2_in_one_paragraph(tmp_path: Path) -> None:
    result = run_cli("report", str(tmp_path), "--html", str(tmp_path / "page.html"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    assert layout.REPORT_JSON in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "page.html").exists()


def test_the_report_command_does_not_import_torch() -> None:
    code = ("import sys, qlorax.commands.analysis, qlorax.analysis.html, qlorax.cli; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stdout + result.stderr
