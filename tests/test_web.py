"""The browser page (export/web): served on localhost and driven in headless Chromium, it loads an
exported generator with onnxruntime-web, draws faces in its canvas (not blank), and draws other
faces after a click on "New faces" and after a move of the latent-walk slider."""

import functools
import http.server
import os
import shutil
import threading

import pytest
import torch
from conftest import REPO

from distgan.checkpoint import save_generator
from distgan.models import Generator, ModelConfig
from export.onnx_export import export_onnx

WEB = REPO / "export" / "web"
ORT_WEB = WEB / "node_modules" / "onnxruntime-web" / "dist" / "ort.min.js"
try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

MISSING = [
    name
    for name, present in [
        ("chromium", shutil.which("chromium")),
        ("chromedriver", shutil.which("chromedriver")),
        ("selenium", webdriver is not None),
        ("onnxruntime-web (npm install in export/web)", ORT_WEB.is_file()),
    ]
    if not present
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}; .ci/run installs them"),
]


@pytest.fixture
def site(tmp_path):
    """The page, its script, onnxruntime-web and a small exported model, served on 127.0.0.1."""
    torch.manual_seed(0)
    run = tmp_path / "run"
    run.mkdir()
    generator = Generator(ModelConfig(resolution=32, g_channels=8, z_dim=16)).eval()
    with torch.no_grad():  # an untrained G draws flat grey; larger weights give visible images
        for module in generator.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.mul_(8)
    save_generator(run, generator, step=1, images_seen=1)
    root = tmp_path / "site"
    root.mkdir()
    export_onnx(run / "generator.safetensors", root / "model.onnx", log=lambda _: None)
    for name in ("index.html", "app.js", "node_modules"):
        os.symlink(WEB / name, root / name)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    types = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}
    handler.extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **types}
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/index.html"
    server.shutdown()


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    headless = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    quiet = ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    fresh = ["--no-first-run", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}"]
    for arg in [*headless, *quiet, *fresh]:
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    yield driver
    driver.quit()


CANVAS_STATS = """
const canvas = document.getElementById('faces');
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let sum = 0, sumSq = 0, n = 0;
for (let i = 0; i < data.length; i += 4) for (let c = 0; c < 3; c++) { sum += data[i + c]; sumSq += data[i + c] ** 2; n++; }
const mean = sum / n;
return {std: Math.sqrt(sumSq / n - mean * mean), url: canvas.toDataURL()};
"""


def wait_for_renders(driver, count: int):
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script("return window.distgan && window.distgan.renders") >= count
    )


def test_page_draws_faces_and_changes_them(site, browser):
    browser.get(site)
    wait_for_renders(browser, 1)
    assert browser.find_element(By.ID, "status").text.startswith("ready: 16 faces")
    first = browser.execute_script(CANVAS_STATS)
    assert first["std"] > 2  # faces, not a blank or uniform canvas

    browser.find_element(By.ID, "new").click()
    wait_for_renders(browser, 2)
    clicked = browser.execute_script(CANVAS_STATS)
    assert clicked["std"] > 2 and clicked["url"] != first["url"]

    browser.execute_script(
        "const s = document.getElementById('walk'); s.value = 100;"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_for_renders(browser, 3)
    walked = browser.execute_script(CANVAS_STATS)
    assert walked["url"] != clicked["url"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
