"""The explorer (notebooks/explore.ipynb) in a real JupyterLab, driven by headless Chromium: the
widgets render, a plot is drawn from cached records, and changing a control redraws it. Chromium is
Debian's (scripts/install_browser.sh, run by `make test`); playwright drives it."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from repro import widgets
from repro.config import load_tier, sweep_configs

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.browser, pytest.mark.embedded]


def test_selection_lists_the_runs_each_figure_reads():
    configs = widgets.selection_configs("ci", "smollm2-135m", "wiki", ["rtn", "gptq"], [4, 3], None, "tensor")
    assert [c.label() for c in configs] == ["fp", "rtn int4", "rtn int3", "gptq int4", "gptq int3"]
    grouped = widgets.selection_configs("ci", "smollm2-135m", "wiki", ["rtn"], [4], None, "group")
    assert grouped[1].label() == "rtn int4 g128" and grouped[1].observer == "minmax"
    pareto = widgets.selection_configs("ci", "smollm2-135m", "wiki", ["rtn"], [4], None, "tensor", widgets.FIGURES[2])
    assert {c.model for c in pareto} == set(load_tier("ci")["models"])
    spectrum = widgets.selection_configs("ci", "smollm2-135m", "wiki", ["rtn"], [3], None, "tensor", widgets.FIGURES[5])
    assert sum(c.method == "blockwise" for c in spectrum) == len(load_tier("ci")["cross_block"]["variants"])


@pytest.fixture
def lab(tmp_path, seed_records):
    """JupyterLab on a free loopback port over a copy of the explorer notebook, its kernel reading
    records (FP and RTN of SmolLM2 at the ci widths: the session's, copied) from a fresh results
    directory that holds nothing else."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: `make test` installs it (scripts/install_browser.sh)")
        pytest.skip("Debian's chromium is not installed (bash scripts/install_browser.sh)")
    outputs = tmp_path / "outputs"
    seed_records(outputs, sweep_configs(("fp", "rtn"), [8, 4, 3], "ci"))
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "explore.ipynb", root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    settings = tmp_path / "settings"  # a user's own JupyterLab settings stay out; no news prompt over the page
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false"}')
    env = {**os.environ, "REPRO_OUTPUTS": str(outputs), "REPRO_PROGRESS": "0",
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1",
                               f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                               *(["--allow-root"] if os.geteuid() == 0 else [])],  # CI runs as root
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # the server answers within seconds; 60 s at most
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"jupyter lab exited: {(tmp_path / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, token
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_explorer_renders_and_redraws_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    shots = ROOT / "outputs" / "explorer"  # the checkout's outputs/, as every other result
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/explore.ipynb?token={token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=90_000)
        page.get_by_text("| Idle").first.wait_for(timeout=90_000)  # the kernel is up (status bar)
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        plot = page.locator(".widget-output img").first
        try:
            plot.wait_for(timeout=120_000)  # the widgets rendered and drew a figure from the cached records
        except Exception:
            page.screenshot(path=str(shots / "explorer-failed.png"), full_page=True)  # what was there instead
            raise
        before = plot.get_attribute("src")
        page.screenshot(path=str(shots / "explorer-before.png"), full_page=True)
        bits = page.locator(".widget-select-multiple", has_text="bits").locator("select")
        bits.select_option(label="4")  # int8 and int3 deselected: the figure redraws with int4 only
        for _ in range(120):
            after = page.locator(".widget-output img").first.get_attribute("src")
            if after and after != before:
                break
            time.sleep(0.5)
        page.screenshot(path=str(shots / "explorer.png"), full_page=True)
        status = page.locator(".widget-html").first.inner_text()
        browser.close()
    assert status.startswith("2 cached run(s)"), status  # FP and RTN int4, nothing missing
    assert after and after != before, "changing the bits control did not redraw the figure"
