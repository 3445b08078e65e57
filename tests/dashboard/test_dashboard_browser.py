"""The dashboard in a real browser (Debian's Chromium driven by Playwright): a live simulation, hostile text.

Screenshots go to test-artifacts/dashboard/ (ignored by git) for CI to keep.
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pollinate.dashboard.access import Access
from pollinate.dashboard.server import DashboardServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
INSTALL_HINT = ("no browser for the dashboard tests: install Chromium (`apt-get install -y chromium`, as root) and "
                "Playwright (`pip install playwright`); `make setup-dev` does both where it can")


def chromium_path() -> str | None:
    return os.environ.get("POLLINATE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason=INSTALL_HINT)
    executable = chromium_path()
    if executable is None:
        pytest.skip(INSTALL_HINT)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    page.close()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def dashboard_url(stream, lines: queue.Queue, timeout_s: float) -> str:
    """Read the simulation's stderr (on a thread, so the pipe never fills) until it prints the dashboard URL."""
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("dashboard: "):
            return line.split(" ", 1)[1].strip()
    raise AssertionError("no dashboard URL printed:\n" + "".join(seen[-20:]))


def observe(page) -> dict:
    return page.evaluate("""() => ({
        status: document.body.dataset.status, done: Number(document.body.dataset.roundsDone || 0),
        updates: Number(document.body.dataset.updates)})""")


def test_the_page_follows_a_live_two_round_simulation(page, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pollinate.cli", "simulate", "--model", "tiny-llama", "--clients", "2", "--rounds",
         "2", "--out", str(out), "--quiet", "--dashboard", "127.0.0.1:0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    lines: queue.Queue = queue.Queue()
    try:
        page.goto(dashboard_url(proc.stderr, lines, timeout_s=120))
        seen, shot = [], False
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            seen.append(observe(page))
            if seen[-1]["done"] == 1 and seen[-1]["status"] == "running" and not shot:
                screenshot(page, "live-round-1.png")
                shot = True
            page.wait_for_timeout(100)
        assert proc.wait(timeout=60) == 0, "".join(lines.queue)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    live = [s for s in seen if s["status"] == "running"]
    assert any(s["done"] == 0 for s in live) and any(s["done"] >= 1 for s in live), seen[::10]
    page.wait_for_function("() => document.body.dataset.roundsDone === '2'", timeout=10_000)
    assert observe(page)["updates"] > max(s["updates"] for s in live if s["done"] == 0)
    screenshot(page, "finished.png")

    first_cells = page.locator("#rounds-table tbody tr td:first-child").all_text_contents()
    assert first_cells == ["2", "1", "0"]
    clients = page.locator("#clients-table tbody tr")
    assert clients.count() == 2
    assert clients.locator("td:first-child").all_text_contents() == ["0", "1"]
    assert page.locator("#clients-table tbody .badge").all_text_contents() == ["met deadline"] * 2
    points = page.evaluate("Chart.getChart(document.getElementById('chart-rounds')).data.datasets[0].data.length")
    assert points == 3  # eval loss before training and after each round
    assert page.evaluate("Chart.getChart(document.getElementById('chart-bytes')).data.datasets.length") == 1
    assert page.errors == []


HOSTILE_NAME = '<img src=x onerror="window.__pwned = 1">'
HOSTILE_REASON = "<script>window.__pwned = 2</script> update rejected"


def write_run(directory: Path, method: str, events: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text(f'method = "{method}"\n[federation]\nclients = 2\nrounds = 2\n')
    (directory / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "{not json\n")


def test_hostile_client_names_and_reasons_show_as_text(page, tmp_path):
    bench = tmp_path / "bench"
    base = [{"type": "initial_eval", "eval_loss": 3.0, "eval_metrics": {"accuracy": 0.1}},
            {"type": "client", "round": 1, "client_id": HOSTILE_NAME, "bytes_up": 10, "bytes_down": 10,
             "profile": "<b>weak</b>", "met_deadline": True, "round_seconds": 0.1, "compute_seconds": 0.5,
             "comm_seconds": 0.05, "estimated_compute_seconds": 0.4},
            {"type": "rejected", "round": 1, "client_id": HOSTILE_NAME, "reason": HOSTILE_REASON},
            {"type": "round", "round": 1, "eval_loss": 2.0, "eval_metrics": {"accuracy": 0.3}, "bytes_up": 10,
             "bytes_down": 10, "seconds": 1.0}]
    write_run(bench / "fedavg-lora", "fedavg-lora", base)
    write_run(bench / "fedpipe", "fedpipe", base[:1])
    with DashboardServer(bench, Access("127.0.0.1", 0)) as server:
        page.goto(server.url)
        page.wait_for_function("() => Number(document.body.dataset.updates) > 0")
        screenshot(page, "hostile-text.png")
        assert page.locator("#rejections-table tbody td.reason").all_text_contents() == [HOSTILE_REASON]
        assert HOSTILE_NAME in page.locator("#clients-table tbody").text_content()
        assert "<b>weak</b>" in page.locator("#clients-table tbody").text_content()
        assert "0.50 (0.40) / 0.05" in page.locator("#clients-table tbody").text_content()  # measured (planned)
        assert page.evaluate("window.__pwned") is None
        assert page.locator("body img, body b, body script").count() == 0
        assert page.locator("#skipped").text_content().startswith("1 unreadable line")
        assert page.evaluate("Chart.getChart(document.getElementById('chart-bytes')).data.datasets.length") == 2
        page.select_option("#run-select", "1")
        assert page.locator("#title").text_content() == "fedpipe"
    assert page.errors == []


def test_epsilon_shows_in_a_header_card_and_per_round_only_with_dp(page, tmp_path):
    privacy = {"epsilon": 1.23456, "delta": 1e-5, "noise_multiplier": 1.1, "clip_norm": 0.5, "clipped_fraction": 0.5}
    rounds = [{"type": "initial_eval", "eval_loss": 3.0, "eval_metrics": {"accuracy": 0.1}},
              {"type": "round", "round": 1, "eval_loss": 2.0, "privacy": {**privacy, "epsilon": None}},
              {"type": "round", "round": 2, "eval_loss": 1.5, "privacy": privacy}]
    write_run(tmp_path / "private", "fedavg-lora", rounds)
    write_run(tmp_path / "plain", "fedavg-lora", [{k: v for k, v in e.items() if k != "privacy"} for e in rounds])
    for name, shown in (("private", True), ("plain", False)):
        with DashboardServer(tmp_path / name, Access("127.0.0.1", 0)) as server:
            page.goto(server.url)
            page.wait_for_function("() => document.body.dataset.roundsDone === '2'")
            headers = page.locator("#rounds-table thead th").all_text_contents()
            assert page.locator("#privacy-card").is_visible() == shown and ("ε" in headers) == shown
            if shown:
                screenshot(page, "privacy.png")
                assert page.locator("#stat-epsilon").text_content() == "1.23"
                assert page.locator("#stat-round-note").text_content() == "writing the report"  # 2 of 2, no report
                assert page.locator("#stat-epsilon-note").text_content() == "δ 0.00001 · after round 2 · 50% clipped"
                column = headers.index("ε") + 1
                cells = page.locator(f"#rounds-table tbody td:nth-child({column})").all_text_contents()
                assert cells == ["1.23", "∞", ""]
    assert page.errors == []
