"""The browser page (export/web): served on localhost and driven in headless Chromium, it loads an
exported generator with onnxruntime-web, draws faces in its canvas (not blank), and draws other
faces after a click on "New faces" and after a move of the latent-walk slider; a seed's face
(?seeds=, the seeds field, psi) has the pixels onnxruntime gives for that seed's z from
export/latents.py, and a grayscale model trained on uniform z is drawn in gray from uniform z.
A conditional model gets a class picker (hidden for unconditional ones), or checkboxes for
attributes, preset by ?class= as `generate --class`: the faces of the class chosen there, and
after a change, have onnxruntime's pixels for that label; a screenshot of the page with the
picker is kept (DISTGAN_WEB_SCREENSHOT=PATH also writes it there, and DISTGAN_WEB_CLASS_MODEL=
FILE.onnx shows a class-conditional model of one's own, such as a trained one, instead of the
test's)."""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from distgan.config.model import ModelConfig
from distgan.models.dcgan import Generator
from distgan.outputs.checkpoint import save_generator
from export.generate import to_pixels
from export.latents import latents
from export.onnx_export import export_onnx
from export.runtime import create_session, model_info
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


def visible_conditional(tmp_path, conditioning: str, classes: list[str], **config):
    """A small conditional G whose images show their class, exported (fp32)."""
    torch.manual_seed(0)
    model = ModelConfig(
        g_channels=8, z_dim=16, conditioning=conditioning, classes=classes, **config
    )
    generator = Generator(model).eval()
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.mul_(8)
            if isinstance(module, torch.nn.Embedding):  # the class's gains and biases
                module.weight.normal_(0.0, 1.0)
    run = tmp_path / conditioning
    save_generator(run, generator, step=1, images_seen=1)
    export_onnx(
        run / "generator.safetensors", tmp_path / f"{conditioning}.onnx", log=lambda _: None
    )
    return tmp_path / f"{conditioning}.onnx"


@pytest.fixture(scope="module")
def conditional_models(tmp_path_factory):
    """digits.onnx (classes 0-9, 28 px gray) and attributes.onnx (Smiling, Male, Eyeglasses;
    32 px RGB); picker.onnx is digits.onnx, or DISTGAN_WEB_CLASS_MODEL."""
    tmp = tmp_path_factory.mktemp("conditional")
    digits = visible_conditional(
        tmp, "class", [str(d) for d in range(10)], resolution=28, channels=1
    )
    attributes = ["Smiling", "Male", "Eyeglasses"]
    own = os.environ.get("DISTGAN_WEB_CLASS_MODEL")
    return {
        "digits.onnx": digits,
        "attributes.onnx": visible_conditional(tmp, "attributes", attributes, resolution=32),
        "picker.onnx": Path(own).resolve() if own else digits,
    }


@pytest.fixture
def site(tmp_path, conditional_models):
    """The page, its script, onnxruntime-web and small exported models, served on 127.0.0.1."""
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
    for name, path in conditional_models.items():
        os.symlink(path, root / name)
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
    assert not browser.find_element(By.ID, "conditioning").is_displayed()  # no class picker
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


def label_faces(model: Path, seeds: list[int], label) -> np.ndarray:
    """onnxruntime's pixels (int [B, H, W, 3]) of `seeds` with one label for all (a class
    index, or a multi-hot list), as `generate --seeds --class` draws them."""
    session = create_session(model, "cpu")
    info = model_info(session)
    z = latents(seeds, info.z_dim, info.z_distribution)
    dtype = np.int64 if info.conditioning == "class" else np.float32
    labels = np.repeat(np.array([label], dtype=dtype), len(seeds), axis=0)
    pixels = to_pixels(session.run(None, {"z": z, "label": labels})[0]).astype(int)
    return np.repeat(pixels[..., None], 3, axis=3) if pixels.ndim == 3 else pixels


def pick(driver, script: str, *args):
    """Change the picker with `script` (it dispatches "change") and wait for the new faces."""
    renders = driver.execute_script("return window.distgan.renders")
    driver.execute_script(script, *args)
    wait_for_renders(driver, renders + 1)


def test_the_class_picker_draws_the_class_onnxruntime_draws(site, browser, tmp_path):
    model = tmp_path / "site" / "picker.onnx"
    info = model_info(create_session(model, "cpu"))
    classes, seeds = info.classes, [3, 5, 8, 13, 21, 34]
    first, second = min(7, len(classes) - 1), min(2, len(classes) - 1)
    browser.set_window_size(760, 900)
    browser.get(
        site.replace(
            "index.html",
            f"index.html?model=picker.onnx&class={classes[first]}&seeds=3,5,8,13,21,34",
        )
    )
    wait_for_renders(browser, 1)
    assert browser.find_element(By.ID, "class").is_displayed()
    assert not browser.find_element(By.ID, "attributes").is_displayed()
    options = browser.execute_script(
        "return [...document.getElementById('class').options].map(o => o.text)"
    )
    assert options == list(classes)
    assert browser.find_element(By.ID, "class").get_attribute("value") == str(first)
    assert f"class {classes[first]}" in browser.find_element(By.ID, "status").text
    size = info.resolution
    sevens = label_faces(model, seeds, first)
    assert sevens.std() > 10
    assert_same_pixels(face_pixels(browser, len(seeds), size), sevens)

    shot = tmp_path / "web-class-picker.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    if os.environ.get("DISTGAN_WEB_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["DISTGAN_WEB_SCREENSHOT"])

    select = "const s = document.getElementById('class'); s.value = arguments[0]; s.dispatchEvent(new Event('change'));"
    pick(browser, select, str(second))
    twos = label_faces(model, seeds, second)
    assert np.abs(twos - sevens).mean() > 5  # another class: other images, from the same z
    assert_same_pixels(face_pixels(browser, len(seeds), size), twos)
    assert f"class={classes[second]}" in browser.current_url
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors

    browser.get(site.replace("index.html", "index.html?model=picker.onnx&class=nope&seeds=3"))
    wait_for_renders(browser, 1)
    status = browser.find_element(By.ID, "status").text
    assert "?class=nope is not a class of this model: showing the first" in status


def test_attribute_checkboxes_feed_a_multi_hot_label(site, browser, tmp_path):
    model = tmp_path / "site" / "attributes.onnx"
    browser.get(
        site.replace(
            "index.html", "index.html?model=attributes.onnx&class=Smiling,Eyeglasses&seeds=1,2"
        )
    )
    wait_for_renders(browser, 1)
    assert not browser.find_element(By.ID, "class-picker").is_displayed()
    boxes = browser.find_elements(By.CSS_SELECTOR, "#attributes input")
    assert [box.is_selected() for box in boxes] == [True, False, True]
    assert "attributes Smiling,Eyeglasses" in browser.find_element(By.ID, "status").text
    before = label_faces(model, [1, 2], [1, 0, 1])
    assert_same_pixels(face_pixels(browser, 2, 32), before)

    pick(browser, "arguments[0].click();", boxes[1])  # Male too
    after = label_faces(model, [1, 2], [1, 1, 1])
    assert np.abs(after - before).mean() > 5
    assert_same_pixels(face_pixels(browser, 2, 32), after)
    assert "class=Smiling%2CMale%2CEyeglasses" in browser.current_url
