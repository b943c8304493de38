"""The demo page: drawings turned into Omniglot images, the start-up choices on arrays with known
answers, the JSON API and the command line on a tiny run, the page in headless Chromium, and
one-shot neighbours of unseen drawings on the real data (slow)."""
from __future__ import annotations

import base64
import functools
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fixtures import expected_ink, find_chromium, make_tiny_omniglot, png_bytes, real_data
from omnivae import cli, load
from omnivae import data as omni_data
from omnivae import demo as omni_demo
from omnivae import metrics
from omnivae.config import make_config
from omnivae.demo import Demo, DemoError
from omnivae.train import new_character_kinds
from omnivae.train import train

REPO = Path(__file__).resolve().parents[1]


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def canvas_drawing(size=(336, 336), box=(120, 90, 200, 230), width=10) -> Image.Image:
    """A browser canvas after a few strokes: transparent, black strokes forming a 'Z' in box."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    left, top, right, bottom = box
    ImageDraw.Draw(image).line([(left, top), (right, top), (left, bottom), (right, bottom)],
                               fill=(0, 0, 0, 255), width=width)
    return image


def ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    ink = np.asarray(image.convert("L")) < 128
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))), dtype=np.int16)


# ----------------------------------------------------------------------------- drawing -> Omniglot form


def test_a_canvas_drawing_keeps_its_size_and_is_centred():
    drawing = canvas_drawing()
    rows = np.flatnonzero((np.asarray(drawing)[..., 3] > 127).any(1))
    height = (rows[-1] + 1 - rows[0]) * 105 / 336  # about 47 of 105: inside Omniglot's range
    image = omni_demo.to_upstream(drawing)
    assert image.size == (105, 105) and image.mode == "1"
    top, bottom, left, right = ink_box(image)
    assert abs((bottom - top) - height) <= 1.5
    assert abs((top + bottom) / 2 - 52.5) <= 1 and abs((left + right) / 2 - 52.5) <= 1


@pytest.mark.parametrize("box, side", [((150, 150, 160, 166), 43),   # a tiny drawing is enlarged
                                       ((2, 2, 334, 334), 86)])      # one that fills the canvas shrinks
def test_a_drawing_outside_omniglot_sizes_is_scaled_into_range(box, side):
    top, bottom, left, right = ink_box(omni_demo.to_upstream(canvas_drawing(box=box, width=4)))
    assert abs(max(bottom - top, right - left) - side) <= 2


def test_an_omniglot_file_gives_exactly_its_training_pixels(tmp_path):
    upstream = Image.open(io.BytesIO(png_bytes(expected_ink(3, 2))))
    assert omni_demo.to_upstream(upstream) is upstream
    make_tiny_omniglot(tmp_path, "evaluation", alphabets=1, characters=3, drawers=2)
    row = omni_data.load_set("evaluation", 28, tmp_path, tmp_path / "cache", progress=False,
                             check_counts=False).tensors()[2 * 2 + 1]  # character 3, drawer 2
    assert torch.equal(omni_data.prepare(omni_demo.to_upstream(upstream), 28), row)


def sixteen_bit_png() -> bytes:
    return png(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)))


@pytest.mark.parametrize("payload, message", [
    (lambda: png(Image.new("RGBA", (336, 336), (0, 0, 0, 0))), "empty"),
    (lambda: png(Image.new("L", (336, 336), 255)), "empty"),
    (lambda: png(Image.new("L", (100, 100), 0)), "mostly dark"),
    (sixteen_bit_png, "pixel mode"),
    (lambda: png(Image.new("L", (3000, 40), 255)), "3000x40"),
    (lambda: png(Image.new("L", (8, 8), 255)), "8x8"),
    (lambda: png(canvas_drawing().convert("RGB"), format="JPEG"), "JPEG"),
    (lambda: b"\x89PNG\r\n\x1a\n not a png", "not a readable PNG"),
])
def test_bad_images_get_one_clear_sentence(payload, message):
    with pytest.raises(DemoError, match=message):
        omni_demo.to_upstream(omni_demo.read_png(payload()))


def test_data_uris():
    assert omni_demo.decode_data_uri("data:image/png;base64," + base64.b64encode(b"abc").decode()) == b"abc"
    for bad in (None, "", "data:image/png,abc", "data:image/png;base64,***"):
        with pytest.raises(DemoError):
            omni_demo.decode_data_uri(bad)


# ----------------------------------------------------------------------------- start-up choices


def bar(shear=0.0, length=16, value=0.75, size=28) -> np.ndarray:
    """A one-pixel-wide stroke `length` rows tall, leaning right by `shear` (x shift per row up)."""
    image = np.zeros((size, size))
    top = (size - length) // 2
    for y in range(top, top + length):
        image[y, int(round(14 + shear * ((top + length / 2) - y)))] = value
    return image


def test_stroke_measures_known_answers():
    thickness, slant, height = metrics.stroke_measures(np.stack([bar(), bar(0.5), bar(-0.5, value=1.0)]))
    np.testing.assert_allclose(thickness, [0.75, 0.75, 1.0])
    np.testing.assert_allclose(slant, [0.0, 0.5, -0.5], atol=0.03)
    np.testing.assert_allclose(height[0], np.sqrt((16**2 - 1) / 12))  # 16 rows, evenly inked


def test_choose_examples_finds_the_planted_hands():
    """Six characters x five drawers of one-pixel bars, all with the same amount of ink (12),
    among them the planted drawings: a thick one, a thin one, a slanted one, and an upright
    drawing of a character that the other drawers slant."""
    images, character = [], []
    for c in range(6):
        for d in range(5):
            image = bar(0.3 if c == 3 and d > 0 else 0.0)
            if (c, d) == (0, 2):
                image = bar(length=12, value=1.0)  # thick: fully inked pixels
            if (c, d) == (1, 4):
                image = bar(length=24, value=0.5)  # thin: half-inked pixels
            if (c, d) == (2, 1):
                image = bar(0.5)  # slanted
            images.append(image)
            character.append(c)
    examples = omni_demo.choose_examples(np.stack(images), np.array(character))
    assert [e.name for e in examples] == ["thick", "thin", "slanted", "upright"]
    assert [e.row for e in examples] == [0 * 5 + 2, 1 * 5 + 4, 2 * 5 + 1, 3 * 5 + 0]
    assert "100%" in examples[0].why and "shear +0.5" in examples[2].why


def test_principal_directions_known_answer():
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.normal(size=(4, 4)))[0]
    codes = (rng.normal(size=(20000, 4)) * [3.0, 2.0, 1.0, 0.5]) @ rotation.T + 7.0
    mean, directions, sd, explained = omni_demo.principal_directions(codes, 3)
    np.testing.assert_allclose(mean, 7.0, atol=0.1)
    np.testing.assert_allclose(sd, [3.0, 2.0, 1.0], rtol=0.03)
    np.testing.assert_allclose(np.abs(np.sum(directions * rotation.T[:3], axis=1)), 1.0, atol=0.01)
    np.testing.assert_allclose(explained, np.array([9, 4, 1]) / 14.25, rtol=0.05)


def test_move_style_sets_the_coordinates_and_keeps_the_rest():
    rng = np.random.default_rng(1)
    directions = np.linalg.qr(rng.normal(size=(5, 5)))[0][:2]  # (2, 5) orthonormal rows
    mean, sd, style = rng.normal(size=5), np.array([2.0, 0.5]), rng.normal(size=5)
    moved = omni_demo.move_style(style, np.array([1.5, -3.0]), mean, directions, sd)
    np.testing.assert_allclose(directions @ (moved - mean) / sd, [1.5, -3.0])
    rest = np.eye(5) - directions.T @ directions  # projection onto what the sliders leave alone
    np.testing.assert_allclose(rest @ moved, rest @ style)
    own = directions @ (style - mean) / sd
    np.testing.assert_allclose(omni_demo.move_style(style, own, mean, directions, sd), style)


def test_nearest_is_by_cosine():
    gallery = np.array([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    rows, similarity = omni_demo.nearest(np.array([2.0, 0.0]), gallery, 3)
    assert rows.tolist() == [0, 1, 2]
    np.testing.assert_allclose(similarity, [1.0, 10 / np.sqrt(101), 0.0])


def test_bench_scores_the_demos_neighbours():
    """bench/demo_neighbours.py's rates: the right character first, and among the 5 shown."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "demo_neighbours.py"
    spec = importlib.util.spec_from_file_location("demo_neighbours", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    angles = np.linspace(0, np.pi / 2, 7)  # 7 gallery characters on a quarter circle
    gallery = np.stack([np.cos(angles), np.sin(angles)], 1)  # (7, 2) unit rows
    characters = np.arange(10, 17)
    codes = gallery[[0, 3, 6]]  # three drawings that sit on gallery codes 0, 3 and 6
    # Their characters: right (first), second-nearest of 5 (inside), and the farthest (outside).
    rates = bench.rates(codes, gallery, np.array([10, 12, 10]), characters)
    assert rates == {"nearest": pytest.approx(1 / 3), "five": pytest.approx(2 / 3)}


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run trained for one epoch on tiny zips, and its demo on a tiny evaluation set
    (2 alphabets x 10 characters x 4 drawers)."""
    root = tmp_path_factory.mktemp("demo")
    data_dir, cache_dir = root / "data", root / "cache"
    make_tiny_omniglot(data_dir, "background", alphabets=2, characters=4, drawers=4)
    make_tiny_omniglot(data_dir, "evaluation", alphabets=2, characters=10, drawers=4, start_charid=965)
    background = omni_data.load_set("background", 28, data_dir, cache_dir, progress=False, check_counts=False)
    config = make_config("quick", {"epochs": 1, "val_drawers": (4,), "channels": 4, "hidden": 16, "groups": 2,
                                   "group_size": 2})
    run = train(config, root / "run", dataset=background, progress=False)
    evaluation = omni_data.load_set("evaluation", 28, data_dir, cache_dir, progress=False, check_counts=False)
    return SimpleNamespace(run=run, data_dir=data_dir, cache_dir=cache_dir, evaluation=evaluation,
                           demo=Demo(load(run), evaluation, "tiny", views=new_character_kinds(config)))


@contextmanager
def serving(demo, host="127.0.0.1"):
    server = omni_demo.make_server(demo, host, 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield omni_demo.url_of(server)
    finally:
        server.shutdown()
        server.server_close()


def call(url, path, body=None, raw: bytes | None = None, headers=None):
    """(status, JSON answer) of a GET (no body) or a POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url.rstrip("/") + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def data_uri(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def test_neighbours_read_the_turned_views_as_evaluate_does(tiny):
    """The quick preset trains with quarter turns: the gallery's codes are `metrics.view_codes`
    in 4 views, and a drawing's neighbours are ranked by the cosine of its own view code."""
    demo, evaluation = tiny.demo, tiny.evaluation
    assert demo.views == 4
    images = evaluation.tensors()
    expected = metrics.view_codes(demo.model, images[demo.gallery_rows], 4)  # (G, 4 * Dc)
    np.testing.assert_allclose(demo.gallery_codes, expected, atol=1e-6)
    row = int(np.flatnonzero((evaluation.character == 972) & (evaluation.drawer == 3))[0])
    answer = demo.answer(images[row])
    similarity = expected @ metrics.view_codes(demo.model, images[row:row + 1], 4)[0]  # (G,)
    order = np.argsort(-similarity, kind="stable")[:5]
    assert [n["id"] for n in answer["neighbours"]] == evaluation.character[demo.gallery_rows[order]].tolist()
    np.testing.assert_allclose([n["similarity"] for n in answer["neighbours"]], similarity[order], atol=1e-5)
    # One view is the content means by cosine, as before turned views.
    plain = Demo(demo.model, evaluation, "tiny")
    content = metrics.encode_images(demo.model, images)[0][plain.gallery_rows]
    np.testing.assert_allclose(plain.gallery_codes, metrics.unit_rows(content), atol=1e-6)


def test_api_answers_a_drawing_a_pick_and_a_slider(tiny):
    model = tiny.demo.model
    with serving(tiny.demo) as url:
        with urllib.request.urlopen(url, timeout=30) as response:
            html = response.read().decode()
        assert 'id="canvas"' in html and "<script>" in html
        assert "http://" not in html and "https://" not in html  # nothing loaded from the network

        status, info = call(url, "/api/info")
        assert status == 200 and info["gallery_size"] == 20 and info["gallery_drawers"] == [1]
        assert [a["name"] for a in info["alphabets"]] == ["Alphabet_00", "Alphabet_01"]
        assert [e["name"] for e in info["examples"]] == ["thick", "thin", "slanted", "upright"]

        status, answer = call(url, "/api/draw", {"image": data_uri(png(canvas_drawing()))})
        assert status == 200, answer
        assert len(answer["neighbours"]) == 5 and len(answer["sampled"]) == 8 and len(answer["examples"]) == 4
        assert len(answer["content"]) == model.content_dim and len(answer["style"]) == model.style_dim
        assert pixels(answer["reconstruction"]).shape == (28, 28)
        similarity = [n["similarity"] for n in answer["neighbours"]]
        assert similarity == sorted(similarity, reverse=True)

        # A picked evaluation drawing is the training image itself, and its nearest gallery
        # drawing is its own character's when the pick is the gallery drawing.
        status, picked = call(url, "/api/pick", {"character": 970, "drawer": 1})
        assert status == 200 and picked["picked"] == {"alphabet": "Alphabet_00", "number": 6, "id": 970, "drawer": 1}
        row = int(np.flatnonzero((tiny.evaluation.character == 970) & (tiny.evaluation.drawer == 1))[0])
        assert picked["input"] == omni_demo.png_uri(tiny.evaluation.tensors()[row])
        assert picked["neighbours"][0]["id"] == 970 and picked["neighbours"][0]["similarity"] == pytest.approx(1.0)

        # Sliders at the drawing's own coordinates give its reconstruction.
        body = {"content": picked["content"], "style": picked["style"], "coordinates": picked["coordinates"]}
        status, same = call(url, "/api/style", body)
        assert status == 200 and np.abs(pixels(same["image"]) - pixels(picked["reconstruction"])).max() <= 1


def test_api_rejects_bad_requests_with_a_message(tiny):
    with serving(tiny.demo) as url:
        for path, body, status, message in [
            ("/api/draw", {"image": data_uri(png(Image.new("RGBA", (300, 300))))}, 400, "empty"),
            ("/api/draw", {"image": data_uri(sixteen_bit_png())}, 400, "pixel mode"),
            ("/api/draw", {}, 400, "no image"),
            ("/api/pick", {"character": 970, "drawer": 17}, 400, "no drawing of character 970"),
            ("/api/style", {"content": [0.0], "style": [], "coordinates": []}, 400, "content must be a list"),
            ("/api/nothing", {}, 404, "no such endpoint"),
        ]:
            code, answer = call(url, path, body)
            assert code == status and message in answer["error"], (path, answer)
        code, answer = call(url, "/api/draw", raw=b"{not json")
        assert code == 400 and "not a JSON object" in answer["error"]
        code, answer = call(url, "/api/draw", raw=b"x" * (omni_demo.MAX_BODY + 1))
        assert code == 413 and "accepts up to 2 MB" in answer["error"]
        code, answer = call(url, "/api/info", headers={"Host": "attacker.example:80"})
        assert code == 403
        assert call(url, "/missing")[0] == 404


def test_cli_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["demo", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for option in ("--host", "--port", "--no-browser", "--data-dir", "--cache-dir", "127.0.0.1"):
        assert option in out


def test_cli_reports_a_missing_run_folder_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:  # argparse checks the folder before the page starts
        cli.main(["demo", str(tmp_path / "nothing"), "--no-browser"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omnivae: error: ") and "is not a run folder" in err and "\n" not in err


def test_cli_reports_a_busy_port_in_one_line(tiny, monkeypatch, capsys):
    monkeypatch.setattr(omni_data, "load_set", functools.partial(omni_data.load_set, check_counts=False))
    with serving(tiny.demo) as url:
        port = url.rsplit(":", 1)[1].strip("/")
        assert cli.main(["--quiet", "demo", str(tiny.run), "--port", port, "--no-browser", "--data-dir",
                         str(tiny.data_dir), "--cache-dir", str(tiny.cache_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"omnivae: error: cannot listen on 127.0.0.1:{port}") and "\n" not in err


def test_cli_serves_until_ctrl_c(tiny):
    # Ctrl-C as a terminal delivers it: a shell that starts the tests in the background makes them
    # ignore SIGINT, and a child process keeps that, so the demo gets Python's handler back first.
    code = ("import functools, signal, sys; from omnivae import cli, data; "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "data.load_set = functools.partial(data.load_set, check_counts=False); sys.exit(cli.main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-c", code, "--quiet", "demo", str(tiny.run), "--no-browser",
                                "--data-dir", str(tiny.data_dir), "--cache-dir", str(tiny.cache_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 180)
        assert ready, "no URL printed"
        line = process.stdout.readline()
        assert line.startswith("omnivae demo: http://127.0.0.1:"), line
        url = line.split()[2]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err


# ----------------------------------------------------------------------------- in a real browser


@contextmanager
def browser_page():
    """A Playwright page in the system's headless Chromium (Playwright never downloads one here)."""
    required = os.environ.get("OMNIVAE_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("OMNIVAE_REQUIRE_BROWSER=1 but playwright is not installed")
        pytest.skip("playwright not installed")
    chromium = find_chromium()
    if chromium is None:
        if required:
            pytest.fail("OMNIVAE_REQUIRE_BROWSER=1 but no chromium found")
        pytest.skip("chromium not installed")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def answers(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.answers || 0)"))


def wait_for_answer(page, before: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.answers || 0) > {before}")


@pytest.mark.browser
def test_page_draws_reads_and_restyles_in_headless_chromium(tiny):
    with serving(tiny.demo) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        box = page.locator("#canvas").bounding_box()

        def stroke(points):
            x0, y0 = box["x"], box["y"]
            page.mouse.move(x0 + points[0][0] * box["width"], y0 + points[0][1] * box["height"])
            page.mouse.down()
            for x, y in points[1:]:
                page.mouse.move(x0 + x * box["width"], y0 + y * box["height"], steps=8)
            page.mouse.up()

        stroke([(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)])  # a Z
        stroke([(0.5, 0.2), (0.5, 0.8)])
        page.wait_for_function("Number(document.body.dataset.answers || 0) >= 1")
        before = answers(page)
        page.click("#submit")
        wait_for_answer(page, before)
        assert page.get_attribute("#reconstruction", "src").startswith("data:image/png;base64,")
        assert page.get_attribute("#input-image", "src").startswith("data:image/png;base64,")
        assert page.locator("#neighbours .neighbour").count() == 5
        assert "Alphabet" in page.inner_text("#neighbours")
        assert page.locator("#sampled-styles img").count() == 8
        assert page.locator("#example-styles figure").count() == 4
        assert "thick" in page.inner_text("#example-styles")
        assert page.inner_text("#error") == ""
        # The drawing the model saw has ink in the middle: the strokes arrived.
        assert (pixels(page.get_attribute("#input-image", "src"))[10:18, 10:18] < 128).any()

        # A slider asks for the character in a moved hand (the tiny model draws every hand alike).
        page.locator("#sliders input").first.focus()
        with page.expect_response("**/api/style") as response:
            page.keyboard.press("ArrowRight")
        assert response.value.status == 200
        assert page.get_attribute("#slider-image", "src").startswith("data:image/png;base64,")

        # An evaluation drawing by a drawer outside the gallery.
        page.select_option("#pick-drawer", "3")
        before = answers(page)
        page.click("#pick")
        wait_for_answer(page, before)
        assert "drawer 3" in page.inner_text("#picked")

        # Bad input: a message on the page.
        page.click("#clear")
        page.click("#submit")
        page.wait_for_function("document.getElementById('error').textContent.includes('empty')")
        page.set_input_files("#file", files=[{"name": "deep.png", "mimeType": "image/png",
                                              "buffer": sixteen_bit_png()}])
        page.wait_for_function("document.getElementById('error').textContent.includes('pixel mode')")
        page.set_input_files("#file", files=[{"name": "big.png", "mimeType": "image/png",
                                              "buffer": b"\x89PNG" + bytes(1_700_000)}])
        page.wait_for_function("document.getElementById('error').textContent.includes('accepts PNG files up to')")


# ----------------------------------------------------------------------------- on the real data


def upstream_png(data_dir: Path, character: int, drawer: int) -> bytes:
    """The upstream file of one evaluation drawing, from the zip or the extracted folder."""
    suffix = f"/{character:04d}_{drawer:02d}.png"
    archive = data_dir / "images_evaluation.zip"
    if archive.is_file():
        with zipfile.ZipFile(archive) as z:
            [name] = [n for n in z.namelist() if n.endswith(suffix)]
            return z.read(name)
    [path] = (data_dir / "images_evaluation").glob(f"*/*/{suffix[1:]}")
    return path.read_bytes()


@pytest.mark.slow
@pytest.mark.browser
def test_page_finds_unseen_drawers_characters_among_five_neighbours(tmp_path):
    """Through the page's canvas, five evaluation drawings by drawers outside the gallery must
    find their character among the 5 nearest gallery characters (of 659) at least 4 times.
    The drawings are chosen by a fixed rule: 5 characters and, for each, a drawer from 2-20,
    drawn with numpy's default_rng(0).

    It needs a model trained as the README's main job trains it (the `default` preset, about
    7 minutes on 2 CPU cores): OMNIVAE_TEST_RUN names its run folder. A model small enough to
    train inside the test (the `quick` preset, 2 epochs) finds only 2 of the 5, so the test
    does not train one; without OMNIVAE_TEST_RUN it is skipped."""
    data_dir = real_data()
    trained = os.environ.get("OMNIVAE_TEST_RUN")
    if not trained:
        pytest.skip("OMNIVAE_TEST_RUN does not name a trained default-preset run folder")
    run = Path(trained)
    assert (run / "config.json").is_file(), f"OMNIVAE_TEST_RUN={trained} is not a run folder"
    cache = os.environ.get("OMNIVAE_CACHE_DIR") or tmp_path / "cache"
    demo = Demo.build(run, data_dir, cache)
    rng = np.random.default_rng(0)
    characters = rng.choice(np.unique(demo.evaluation.character), 5, replace=False)
    drawers = rng.integers(2, 21, 5)
    assert not set(drawers.tolist()) & set(demo.gallery_drawers)

    draw = """async (uri) => {
        const image = new Image(); image.src = uri; await image.decode();
        const canvas = document.getElementById('canvas'), ctx = canvas.getContext('2d');
        ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, canvas.width, canvas.height);
        ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    }"""
    found, seconds = [], []
    with serving(demo) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']")
        for character, drawer in zip(characters.tolist(), drawers.tolist()):
            page.evaluate(draw, data_uri(upstream_png(data_dir, character, drawer)))
            before = answers(page)
            start = time.perf_counter()
            page.click("#submit")
            wait_for_answer(page, before)
            seconds.append(time.perf_counter() - start)
            neighbours = [int(v) for v in page.locator("#neighbours .neighbour").evaluate_all(
                "nodes => nodes.map(n => n.dataset.character)")]
            found.append(character in neighbours)
    print(f"found {sum(found)} of 5; page round trips {np.median(seconds):.3f} s median, {max(seconds):.3f} s max")
    assert sum(found) >= 4, found
