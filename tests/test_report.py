"""The run report is one self-contained, escaped HTML file; compare tables runs side by side."""
import csv
import io
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from omnivae import plots, report
from omnivae.config import make_config
from omnivae.registry import METRICS as REGISTRY
from fixtures import find_chromium

METRICS = {
    "split": "evaluation",
    "kl_total": 41.25,
    "kl_content": 30.5,
    "kl_style": 10.75,
    "content_kmeans_accuracy": 0.61234,
    "content_nmi": 0.87654,
    "pixel_kmeans_accuracy": 0.21,
    "pixel_nmi": 0.55,
    "content_20way_1shot": 0.912,
    "content_20way_1shot_ci95": 0.0123,
    "style_20way_1shot": 0.08,
    "drawer_code_20way_1shot": 0.051,
    "random_code_20way_1shot": 0.049,
    "pixel_20way_1shot": 0.43,
    "nll_iwae": 95.4321,
    "nll_k": 64,
    "prior_mmd2_content": 0.000123,
    "mystery_number": 7.5,
}
FIGURE_NAMES = ["reconstructions.png", "swap.png", "tsne_content_characters.png", "training_curves.png", "extra_plot.png"]


def make_run(root, name="run_a", metrics=METRICS, figures=True, train_seconds=754.2, decoder="deconv"):
    """A run folder like training and evaluation leave behind, with small figures."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = make_config("quick", {"decoder": decoder}).to_dict()
    config["device"] = "<script>alert('x')</script>"  # Config.validate does not check device; written raw
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    records = [dict(epoch=e, seconds=1.5, recon=120.0 / e, val_recon=125.0 / e, content=3.0 / e) for e in (1, 2)]
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "not json\n")
    run_info = dict(device="cpu", hardware="x86_64", cpu_threads=2, torch="2.x", images_per_second=1234.5)
    if train_seconds is not None:
        run_info["train_seconds"] = train_seconds
    (run_dir / "run.json").write_text(json.dumps(run_info))
    if figures:
        figures_dir = run_dir / "figures"
        rng = np.random.default_rng(0)
        images = (rng.random((8, 28, 28)) > 0.8).astype(np.float32)
        plots.reconstruction_grid(images, images * 0.5, figures_dir / "reconstructions.png", ncols=4)
        plots.swap_grid(images[:2], images[2:5], rng.random((2, 3, 28, 28)), figures_dir / "swap.png")
        plots.tsne_plot(rng.normal(size=(50, 2)), rng.integers(0, 5, 50), figures_dir / "tsne_content_characters.png", "content")
        plots.training_curves(records, figures_dir / "training_curves.png")
        plots.image_grid(images, figures_dir / "extra_plot.png")
    return run_dir


def test_report_holds_metrics_baselines_and_seed_numbers(tmp_path):
    run_dir = make_run(tmp_path)
    path = report.write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text()
    assert "run_a" in page
    metrics_table = re.search(r'<table id="metrics">.*?</table>', page, re.S).group(0)
    for value in ("41.2500", "0.6123", "0.8765", "0.9120", "95.4321", "0.000123", ">64<"):
        assert value in metrics_table, value
    # Raw-pixel baselines sit in the same rows as the metrics they compare with.
    row = re.search(r"<tr><td class=\"metric\">content_kmeans_accuracy</td>.*?</tr>", metrics_table).group(0)
    assert "0.6123" in row and "0.2100" in row and "0.0017" in row
    row = re.search(r"<tr><td class=\"metric\">kl_total</td>.*?</tr>", metrics_table).group(0)
    assert "41.2500" in row and "63.1432" in row
    assert html_escape(REGISTRY["kl_total"].description) in row
    # A 95% half-width is shown with its value, not in a row of its own.
    row = re.search(r"<tr><td class=\"metric\">content_20way_1shot</td>.*?</tr>", metrics_table).group(0)
    assert "0.9120 ± 0.0123" in row and "0.4300" in row
    assert "content_20way_1shot_ci95" not in page.split('id="other-metrics"')[0].split('id="metrics"')[1]
    # Style leakage sits beside its references: a code of the drawer alone and random codes.
    row = re.search(r"<tr><td class=\"metric\">style_20way_1shot</td>.*?</tr>", metrics_table).group(0)
    assert "drawer code: 0.0510" in row and "random code: 0.0490" in row
    # Unknown keys are shown apart; training facts and config are there.
    assert "mystery_number" in page and "7.5000" in page
    assert "12 min 34 s" in page and "1,234 images/s" in page and "2 of 2" in page


def test_report_says_which_way_is_better(tmp_path):
    page = report.write_report(make_run(tmp_path, figures=False)).read_text()
    metrics_table = re.search(r'<table id="metrics">.*?</table>', page, re.S).group(0)
    assert REGISTRY["nll_iwae"].direction == "lower"
    row = re.search(r"<tr><td class=\"metric\">nll_iwae</td>.*?</tr>", metrics_table).group(0)
    assert '<td class="better">lower</td>' in row
    row = re.search(r"<tr><td class=\"metric\">content_nmi</td>.*?</tr>", metrics_table).group(0)
    assert '<td class="better">higher</td>' in row
    row = re.search(r"<tr><td class=\"metric\">nll_k</td>.*?</tr>", metrics_table).group(0)
    assert '<td class="better"></td>' in row  # a count: neither


def html_escape(text):
    import html

    return html.escape(text, quote=True)


def test_report_is_self_contained_and_escaped(tmp_path):
    run_dir = make_run(tmp_path)
    page = report.write_report(run_dir).read_text()
    images = re.findall(r"<img[^>]*>", page)
    assert len(images) == len(FIGURE_NAMES)
    assert all('src="data:image/png;base64,' in tag for tag in images)
    for name in FIGURE_NAMES:
        assert name in page
    # Known figures come in their order, unknown ones after.
    positions = [page.index(f"<code>{name}</code>") for name in FIGURE_NAMES]
    assert positions == sorted(positions)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))


def test_report_says_what_decoded_cells_are(tmp_path):
    def caption(page, name):
        return re.search(rf"<code>{re.escape(name)}</code>: ([^<]*)</figcaption>", page).group(1)

    plain = report.write_report(make_run(tmp_path, "plain")).read_text()
    sampled = report.write_report(make_run(tmp_path, "sampled", decoder="pixelcnn")).read_text()
    for name in ("reconstructions.png", "swap.png"):
        assert "pixel probabilities" in caption(plain, name) and "sampled" not in caption(plain, name)
        assert "binary drawings sampled pixel by pixel" in caption(sampled, name)
        assert "probabilities p(x" not in caption(sampled, name)
    for page in (plain, sampled):  # other figures keep their captions
        assert caption(page, "training_curves.png") == report.FIGURES["training_curves.png"]
    bare = tmp_path / "bare"  # no config: the decoded cells are the default decoder's
    (bare / "figures").mkdir(parents=True)
    plots.image_grid(np.zeros((2, 28, 28)), bare / "figures" / "samples.png")
    assert "pixel probabilities" in caption(report.write_report(bare).read_text(), "samples.png")


def test_report_of_a_bare_run_folder(tmp_path):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    page = report.write_report(run_dir).read_text()
    assert "No metrics.json" in page and "63.1432" in page and "<img" not in page


def test_format_value():
    assert report.format_value(0.61234) == "0.6123"
    assert report.format_value(63.1432) == "63.1432"
    assert report.format_value(0.000123) == "0.000123"
    assert report.format_value(64) == "64"
    assert report.format_value(None) == "-"
    assert report.format_seconds(3723) == "1 h 02 min"
    assert report.format_seconds(12.34) == "12.3 s"


def test_compare_formats(tmp_path):
    a = make_run(tmp_path, "run_a", figures=False)
    b = make_run(tmp_path, "run_b", metrics={"kl_total": 50.0, "content_nmi": 0.5}, figures=False, train_seconds=None)
    markdown = report.compare([a, b], fmt="markdown").strip().splitlines()
    assert len(markdown) == 4  # header, rule, one row per run
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    assert header[0] == "run" and header[-1] == "train_seconds"
    # Registry order, known keys only, a 95% half-width beside its value rather than in a column.
    assert header[1:-1] == [k for k in REGISTRY if k in METRICS and k != "content_20way_1shot_ci95"]
    assert markdown[2].startswith("| run_a |") and markdown[3].startswith("| run_b |")
    assert "0.9120 ± 0.0123" in markdown[2]

    rows = list(csv.DictReader(io.StringIO(report.compare([a, b], fmt="csv"))))
    assert [r["run"] for r in rows] == ["run_a", "run_b"]
    assert rows[0]["content_kmeans_accuracy"] == "0.6123" and rows[1]["content_kmeans_accuracy"] == "-"
    assert rows[1]["kl_total"] == "50.0000" and rows[1]["train_seconds"] == "-"
    assert rows[0]["train_seconds"] == "754.2"
    assert rows[0]["content_20way_1shot"] == "0.9120" and rows[0]["content_20way_1shot_ci95"] == "0.0123"

    table = report.compare([a, b]).splitlines()
    assert table[0].split()[0] == "run" and len(table) == 4
    with pytest.raises(ValueError):
        report.compare([a], fmt="xml")


def test_compare_page(tmp_path):
    a = make_run(tmp_path, "run_a", figures=False)
    b = make_run(tmp_path, "run_b", metrics={"kl_total": 50.0}, figures=False)
    page = report.write_compare_page([a, b], tmp_path / "compare.html").read_text()
    assert '<table id="compare">' in page and "run_a" in page and "run_b" in page
    images = re.findall(r"<img[^>]*>", page)
    assert images and all('src="data:image/png;base64,' in tag for tag in images)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    # One chart per key metric any run has, and the column legend says which way is better.
    charts = [m.key for m in REGISTRY.values() if m.chart and m.key in METRICS]
    assert len(images) == len(charts) and "nll_iwae" in charts
    row = re.search(r'<tr><td class="metric">nll_iwae</td>.*?</tr>', page).group(0)
    assert '<td class="better">lower</td>' in row


# ----------------------------------------------------------------------------- in a real browser


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        if os.environ.get("OMNIVAE_REQUIRE_BROWSER") == "1":
            pytest.fail("OMNIVAE_REQUIRE_BROWSER=1 but no chromium found")
        pytest.skip("chromium not installed")
    run_dir = make_run(tmp_path)
    page = report.write_report(run_dir)
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars"]
    url = page.resolve().as_uri()

    dom = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=60)
    assert dom.returncode == 0, dom.stderr[-2000:]
    metrics_table = re.search(r'<table id="metrics">.*?</table>', dom.stdout, re.S)
    assert metrics_table is not None
    for value in ("41.2500", "0.6123", "63.1432", "0.0017"):
        assert value in metrics_table.group(0)
    images = re.findall(r"<img[^>]*>", dom.stdout)
    assert len(images) == len(FIGURE_NAMES) and all('src="data:image/png;base64,' in t for t in images)
    assert "<script>alert" not in dom.stdout  # the escaped config value stayed text

    shot = tmp_path / "shot.png"
    result = subprocess.run(flags + [f"--user-data-dir={tmp_path / 'profile-shot'}", f"--screenshot={shot}",
                                     "--window-size=1280,4000", url], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    colours = np.unique(pixels.reshape(-1, 3) // 16, axis=0)
    assert len(colours) > 20, "screenshot looks blank"
    dark = pixels.max(-1) < 60
    assert dark.mean() > 0.001  # text and the ink of the figures
    # The figures are drawn: some rows far down the page (below the tables) hold dark ink.
    assert dark[pixels.shape[0] // 3:].any(axis=1).sum() > 100


def test_compare_warns_when_protocols_or_splits_differ(tmp_path):
    old = make_run(tmp_path, "old", metrics={"split": "evaluation", "content_nmi": 0.5}, figures=False)
    new = make_run(tmp_path, "new", metrics={"protocol_version": 2, "split": "evaluation", "content_nmi": 0.6}, figures=False)
    val = make_run(tmp_path, "val", metrics={"protocol_version": 2, "split": "validation", "content_nmi": 0.7}, figures=False)
    assert report.protocol_warnings([new, new]) == []
    [line] = report.protocol_warnings([old, new])
    assert "different evaluation protocol versions (old: 1, new: 2)" in line
    [line] = report.protocol_warnings([new, val])
    assert "different splits (new: evaluation, val: validation)" in line
    assert len(report.protocol_warnings([old, val])) == 2
    page = report.write_compare_page([old, new], tmp_path / "compare.html").read_text()
    assert 'class="warning"' in page and "protocol versions" in page
