"""The browser page (export/web): served on localhost and driven in headless Chromium, it loads an
exported generator with onnxruntime-web, draws faces in its canvas (not blank), and draws other
faces after a click on "New faces" and after a move of the latent-walk slider; a seed's face
(?seeds=, the seeds field, psi) has the pixels onnxruntime gives for that seed's z from
export/latents.py, and a grayscale model trained on uniform z is drawn in gray from uniform z."""

import functools
import http.server
import os
import shutil
import threading

import numpy as np
import pytest
import torch

from distgan.config.model import ModelConfig
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import save_generator
from export.generate import to_pixels
from export.latents import latents
from export.onnx_export import export_onnx
from export.runtime import create_session
from tests.helpers import REPO, linear_onnx_generator

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


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the site's files with the types the page's scripts need, without a log line each."""

    types = {".wasm": "application/wasm", ".mjs": "text/javascript", ".js": "text/javascript"}
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **types}

    def log_message(self, *args):
        pass


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
    linear_onnx_generator(root / "gray.onnx", z_dim=8, resolution=4, channels=1)
    for name in ("index.html", "app.js", "latents.js", "node_modules"):
        os.symlink(WEB / name, root / name)
    handler = functools.partial(QuietHandler, directory=str(root))
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
    first_seeds = browser.find_element(By.ID, "seeds").get_attribute("value")
    assert len(first_seeds.split(",")) == 16  # which seeds they are: shown, to make them again

    browser.find_element(By.ID, "new").click()
    wait_for_renders(browser, 2)
    clicked = browser.execute_script(CANVAS_STATS)
    assert clicked["std"] > 2 and clicked["url"] != first["url"]
    assert browser.find_element(By.ID, "seeds").get_attribute("value") != first_seeds

    browser.execute_script(
        "const s = document.getElementById('walk'); s.value = 100;"
        "s.dispatchEvent(new Event('input'));"
    )
    wait_for_renders(browser, 3)
    walked = browser.execute_script(CANVAS_STATS)
    assert walked["url"] != clicked["url"]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


FACE_PIXELS = """
const [count, size] = arguments;
const canvas = document.getElementById('faces');
const columns = Math.ceil(Math.sqrt(count)), cell = canvas.width / columns, scale = cell / size;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const faces = [];
for (let f = 0; f < count; f++) {
  const left = (f % columns) * cell, top = Math.floor(f / columns) * cell;
  for (let y = 0; y < size; y++) for (let x = 0; x < size; x++) {
    const row = top + y * scale + Math.floor(scale / 2), column = left + x * scale + Math.floor(scale / 2);
    const i = (row * canvas.width + column) * 4;
    faces.push(data[i], data[i + 1], data[i + 2]);
  }
}
return faces;
"""


def face_pixels(driver, count: int, size: int) -> np.ndarray:
    """The faces on the canvas, one sample per model pixel: int [count, size, size, 3]."""
    flat = driver.execute_script(FACE_PIXELS, count, size)
    return np.array(flat, dtype=int).reshape(count, size, size, 3)


def assert_same_pixels(page: np.ndarray, expected: np.ndarray):
    """onnxruntime-web (WebAssembly) and onnxruntime's CPU kernels round a little differently:
    a pixel at a rounding boundary may differ by one level, nothing more."""
    difference = np.abs(page - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.02, difference.max()


def show(driver, seeds: str, psi: str, drawn: bool = True):
    renders = driver.execute_script("return window.distgan.renders")
    driver.execute_script(
        "document.getElementById('seeds').value = arguments[0];"
        "document.getElementById('psi').value = arguments[1];"
        "document.getElementById('show').click();",
        seeds,
        psi,
    )
    if drawn:
        wait_for_renders(driver, renders + 1)


def test_a_seeds_face_is_the_one_onnxruntime_draws_for_it(site, browser, tmp_path):
    session = create_session(tmp_path / "site" / "model.onnx", "cpu")

    def onnxruntime_faces(seeds, psi=1.0):
        return to_pixels(session.run(None, {"z": latents(seeds, 16, psi=psi)})[0]).astype(int)

    browser.get(site + "?seeds=3,7")
    wait_for_renders(browser, 1)
    assert browser.find_element(By.ID, "status").text.startswith("ready: 2 faces")
    assert browser.find_element(By.ID, "seeds").get_attribute("value") == "3,7"
    expected = onnxruntime_faces([3, 7])
    assert expected.std() > 10 and not np.array_equal(expected[0], expected[1])
    assert_same_pixels(face_pixels(browser, 2, 32), expected)

    show(browser, "7", "1")  # alone, in a batch of one: the same face
    assert_same_pixels(face_pixels(browser, 1, 32), expected[1:])
    show(browser, "7,3,100-102", "0.6")
    assert_same_pixels(face_pixels(browser, 5, 32), onnxruntime_faces([7, 3, 100, 101, 102], 0.6))
    assert (
        "seeds=7%2C3%2C100%2C101%2C102" in browser.current_url and "psi=0.6" in browser.current_url
    )

    show(browser, "1-3,x", "1", drawn=False)  # a mistake is reported, and nothing is drawn
    assert "is not a seed or a range" in browser.find_element(By.ID, "status").text
    assert browser.execute_script("return window.distgan.seeds") == [7, 3, 100, 101, 102]
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_grayscale_uniform_model_is_drawn_in_gray_from_uniform_z(site, browser, tmp_path):
    weight = linear_onnx_generator(tmp_path / "same-gray.onnx", z_dim=8, resolution=4, channels=1)
    browser.get(site.replace("index.html", "index.html?model=gray.onnx&seeds=5,9,12&psi=0.6"))
    wait_for_renders(browser, 1)
    assert "z uniform" in browser.find_element(By.ID, "status").text
    page = face_pixels(browser, 3, 4)
    assert np.array_equal(page[..., 0], page[..., 1]) and np.array_equal(page[..., 0], page[..., 2])
    z = latents([5, 9, 12], 8, "uniform", psi=0.6)
    expected = to_pixels(np.tanh(z @ weight).reshape(-1, 1, 4, 4)).astype(int)
    assert expected.std() > 20
    assert_same_pixels(page[..., 0], expected)
