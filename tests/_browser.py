"""Headless Chromium (Debian's ``chromium``, driven by Python Playwright) and the built browser device page,
for the web-device tests. Everything is on 127.0.0.1; the browser never downloads anything (the flags
below keep it off the network, which here is closed and would make it hang on refused connections).
Skips with the reason when chromium, node/npm or the page build is missing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests._models import REPO

WEB = REPO / "device_web"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

__all__ = ["browser", "browser_page", "web_dist", "web_page"]


def replay_in_python(bundle_dir: Path, trace: list[dict], threads: int = 2) -> tuple[list[float], list[float]]:
    """The Python step backend on the page's own batches and learning rates (its ``trace``): the losses
    and step times (the first step also creates the session)."""
    import time

    import numpy as np

    from device_runtime.bundle.load import load_bundle
    from device_runtime.step_backend import StepBackend

    backend = StepBackend(load_bundle(bundle_dir), threads=threads)
    losses, seconds = [], []
    for i, tr in enumerate(trace):
        rows, width = tr["batch"]["shape"]
        batch = {k: np.asarray(tr["batch"][k], dtype=np.int64).reshape(rows, width)
                 for k in ("input_ids", "attention_mask")}
        batch["labels"] = np.asarray(tr["batch"]["labels"], dtype=np.int64)
        t0 = time.perf_counter()
        losses.append(backend.train_step(batch, lr=tr["lr"], step=i, seed=0))
        seconds.append(time.perf_counter() - t0)
    return losses, seconds


def _chromium() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)


@pytest.fixture(scope="session")
def web_dist() -> Path:
    """device_web/dist, built here if CI's `make web` did not (needs node_modules from `npm ci`)."""
    dist = WEB / "dist"
    if not (dist / "index.html").is_file():
        if not (WEB / "node_modules").is_dir() or not shutil.which("npm"):
            pytest.skip("the browser device is not built: run `make web` (npm ci && npm run build in device_web/)")
        subprocess.run(["npm", "run", "build"], cwd=WEB, check=True, capture_output=True, timeout=300)
    return dist


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One headless Chromium for the session (a fresh profile directory)."""
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright (Python) not installed")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(profile), executable_path=exe, headless=True,
                                                    args=CHROMIUM_ARGS, viewport={"width": 900, "height": 900})
        yield ctx
        ctx.close()


@pytest.fixture
def browser_page(browser) -> Iterator[Callable[[str], object]]:
    """``browser_page(url)`` -> a Playwright page on ``url`` (console lines go to the test's output)."""
    pages = []

    def open_page(url: str):
        page = browser.new_page()  # type: ignore[attr-defined]
        page.on("console", lambda m: print(f"[page] {m.type}: {m.text}"))
        page.goto(url)
        pages.append(page)
        return page

    yield open_page
    for p in pages:
        p.close()


@pytest.fixture
def web_page(web_dist: Path, browser_page) -> Iterator[Callable[..., object]]:
    """``web_page(broker_ws_url, fleet, device_id)`` -> a Playwright page of the device, served by the
    edge's page server (``edge_broker.web.serve_page``, no bundles: the page then takes the MQTT path)."""
    from edge_broker.broker.base import free_port
    from edge_broker.web import serve_page

    server = serve_page("127.0.0.1", free_port(), root=web_dist)

    def open_page(ws_url: str, fleet: str, device: str):
        return browser_page(server.url("127.0.0.1", broker=ws_url, fleet=fleet, id=device, threads="2"))

    yield open_page
    server.stop()
