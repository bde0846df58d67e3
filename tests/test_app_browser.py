"""Real browser: `streamlit run` on a free localhost port, headless Debian chromium through
Selenium; screenshot kept as a test artifact; the plan table must have rendered.

Skips when chromium/chromedriver or selenium is absent.  The screenshot goes to
$TEST_ARTIFACTS_DIR (default: <tmp>/planner-artifacts/ui.png); with UPDATE_UI_SCREENSHOT=1 it
is also copied to docs/ui.png for the README."""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="chromium/chromedriver not installed"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None,
                       reason="selenium not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("streamlit did not become healthy")


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "streamlit_app.py"),
             "--server.headless", "true", "--server.port", str(port), "--server.address",
             "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType",
             "none", "--server.maxUploadSize", "1"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,2300", "--hide-scrollbars"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _artifact_dir() -> Path:
    d = Path(os.environ.get("TEST_ARTIFACTS_DIR",
                            Path(tempfile.gettempdir()) / "planner-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_page_renders_plan_table_in_chromium(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    wait = WebDriverWait(browser, 40)
    for css in ('[data-testid="stDataFrame"]', '[data-testid="stVegaLiteChart"]'):
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]'))
    time.sleep(1.5)  # let vega finish drawing
    shot = _artifact_dir() / "ui.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_UI_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "ui.png")
    html = browser.page_source
    assert "Parallelism planner" in html
    assert "Traceback" not in html and 'data-testid="stException"' not in html
    assert "Ranked plans" in html
    assert "dp=" in html, "the ranked table's layout column did not render"


def test_clicking_a_table_row_selects_that_plan(server, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'):
        browser.get(server)
    wait = WebDriverWait(browser, 40)
    grid = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]'))
    pick = 'input[aria-label="Plan to inspect (or click a table row)"]'

    def picked(d) -> str:
        boxes = d.find_elements(By.CSS_SELECTOR, pick)
        return (boxes[0].get_attribute("value") or "") if boxes else ""

    wait.until(lambda d: picked(d).startswith("#1 "))
    r = grid[0].rect  # glide grid: 35 px header, 35 px rows; the checkbox column is ~36 px wide
    ActionChains(browser).move_to_element_with_offset(
        grid[0], -r["width"] / 2 + 18, -r["height"] / 2 + 35 + 2 * 35 + 17).click().perform()
    wait.until(lambda d: picked(d).startswith("#3 "))
