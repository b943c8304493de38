"""A run's report (one self-contained HTML file) and tables comparing runs.

A run folder (see rundir) holds the config, the training log, the run info (where and how fast it
trained), the metrics (from evaluation) and the figures. `write_report` turns them into one
HTML page in the run folder: figures are embedded as base64 data URIs and the CSS is inline, so the
file opens offline and can be mailed around. `compare` and `write_compare_page` put the
metrics of several runs side by side. What each metric key means, which way is better
and which numbers go beside it come from the metric registry (`omnivae.registry.METRICS`).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
import tempfile
from pathlib import Path

from . import rundir
from .config import AUTOREGRESSIVE_DECODERS
from .plots import bar_chart
from .registry import CI95, METRICS

# Figures a run may hold, in the order the report shows them, with their captions.
FIGURES: dict[str, str] = {
    "reconstructions.png": "Reconstructions: held-out drawings (input rows) and their reconstructions (the rows below).",
    "samples.png": "Samples: content and style codes drawn from the prior N(0, I) and decoded.",
    "swap.png": "Content/style swap: cell (r, c) decodes the content code of the drawing at the left of row r with the style code of the drawing at the top of column c.",
    "one_shot.png": "One-shot generation: each row starts with a single drawing of an unseen character (evaluation set), followed by new drawings of it in styles drawn from the prior.",
    "interpolation.png": "Interpolations: decoding points on straight lines between the codes of two drawings.",
    "tsne_content_characters.png": "t-SNE of content means, coloured by character: one tight cluster per character is the goal.",
    "tsne_style_characters.png": "t-SNE of style means, coloured by character: no structure by character is the goal.",
    "tsne_content_alphabets.png": "t-SNE of content means, coloured by alphabet.",
    "tsne_style_alphabets.png": "t-SNE of style means, coloured by alphabet.",
    "training_curves.png": "Training curves: each logged term per epoch, training and validation on the same axes.",
}
_GRID_FIGURES = {"reconstructions.png", "samples.png", "swap.png", "one_shot.png", "interpolation.png"}
# What the decoded cells of the grid figures are, by whether the run's decoder is autoregressive.
_DECODED = {
    False: "Decoded cells are pixel probabilities p(x = 1 | z) (dark: likely ink), not samples.",
    True: "Decoded cells are binary drawings sampled pixel by pixel from the autoregressive decoder, not "
          "probabilities.",
}

_RUN_INFO = (  # run info key -> label in "How it was trained"
    ("device", "Device"),
    ("hardware", "Hardware"),
    ("cpu_threads", "CPU threads"),
    ("torch", "PyTorch"),
    ("train_seconds", "Training time"),
    ("images_per_second", "Throughput"),
)

_CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2230;
       background: #f6f7f9; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; min-height: 100vh;
       box-shadow: 0 0 0 1px #e3e6ea; }
h1 { font-size: 26px; margin: 8px 0 2px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #e3e6ea; }
.sub { color: #5b6272; margin: 0 0 8px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { padding: 5px 10px; text-align: left; vertical-align: top; border-bottom: 1px solid #e6e8ec; }
th { background: #eef1f5; font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.key, td.metric { font-family: ui-monospace, "SF Mono", Menlo, Consolas, monospace; font-size: 13px; white-space: nowrap; }
td.desc { color: #4a5161; font-size: 13px; }
td.better { color: #4a5161; font-size: 13px; white-space: nowrap; }
td.missing { color: #9aa1ad; text-align: center; }
figure { margin: 18px 0 30px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e6ea; display: block; }
figure img.grid { image-rendering: pixelated; }
figcaption { color: #4a5161; font-size: 14px; margin-top: 6px; }
figcaption code, p code { font-size: 13px; }
.note { color: #7a8190; font-style: italic; }
.warning { color: #8a4b00; background: #fff4e0; padding: 6px 10px; border-left: 3px solid #e0a040; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 0 24px; }
.charts figure { margin: 10px 0 20px; }
"""


# ----------------------------------------------------------------------------- reading a run folder


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the metrics are mostly flat, nested parts are tolerated."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def read_metrics(run_dir) -> dict:
    """The metrics of a run as a flat dict ({} when there are none)."""
    metrics = rundir.read_metrics(run_dir)
    return _flatten(metrics) if isinstance(metrics, dict) else {}


# ----------------------------------------------------------------------------- formatting


def format_value(value) -> str:
    """How tables show a value: ints as they are, floats to 4 decimals (3 significant digits when
    very small or large), None as "-", anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3g}"
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def format_metric(key: str, value) -> str:
    """format_value, except durations (keys ending in _seconds) to one decimal."""
    if key.endswith("_seconds") and _is_number(value):
        return f"{value:.1f}"
    return format_value(value)


def _format_setting(value) -> str:
    """Config values as written: 0.001 stays 0.001, 2e-4 stays 0.0002, tuples as 19, 20."""
    if isinstance(value, float):
        return f"{value:g}"
    return format_value(value)


def format_seconds(seconds) -> str:
    """3723 -> "1 h 02 min"; 192 -> "3 min 12 s"; 12.34 -> "12.3 s"."""
    seconds = float(seconds)
    if seconds >= 3600:
        hours, rest = divmod(round(seconds), 3600)
        return f"{hours} h {rest // 60:02d} min"
    if seconds >= 60:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    return f"{seconds:.1f} s"


def format_with_ci95(key: str, values: dict) -> str:
    """format_metric of values[key], followed by " ± half-width" when `values` holds the key's 95%
    half-width (e.g. content_20way_1shot and content_20way_1shot_ci95 -> "0.8000 ± 0.0100")."""
    text = format_metric(key, values[key])
    half_width = values.get(CI95.get(key))
    if _is_number(half_width):
        text += f" ± {format_value(half_width)}"
    return text


def _shown_with_its_value(key: str, keys) -> bool:
    """Is `key` a 95% half-width whose value is among `keys` (so it is shown as "value ± it")?"""
    metric = METRICS.get(key)
    return metric is not None and metric.ci95_of is not None and metric.ci95_of in keys


def _better(key: str) -> str:
    """"higher" or "lower" (which way is better), or "" for counts, settings and references."""
    metric = METRICS.get(key)
    return (metric.direction or "") if metric else ""


def _run_info_value(key: str, value) -> str:
    if key == "train_seconds" and isinstance(value, (int, float)):
        return format_seconds(value)
    if key == "images_per_second" and isinstance(value, (int, float)):
        return f"{value:,.0f} images/s"
    return format_value(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _describe(text: str) -> str:
    """A registry description as HTML: escaped, with `key` spans set as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


# ----------------------------------------------------------------------------- the report


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _figure_order(figures_dir: Path) -> list[Path]:
    """Known figures in the order of FIGURES, then any other PNGs by name."""
    if not figures_dir.is_dir():
        return []
    present = {p.name: p for p in figures_dir.glob("*.png") if p.is_file()}
    known = [present[name] for name in FIGURES if name in present]
    others = sorted(p for name, p in present.items() if name not in FIGURES)
    return known + others


def _caption(name: str, decoder: str = "deconv") -> str:
    """A figure's caption; the grid figures say what their decoded cells are for the run's `decoder`."""
    if name in _GRID_FIGURES:
        return f"{FIGURES[name]} {_DECODED[decoder in AUTOREGRESSIVE_DECODERS]}"
    if name in FIGURES:
        return FIGURES[name]
    return Path(name).stem.replace("_", " ").capitalize() + "."


def _kv_table(rows: list[tuple[str, str]], table_id: str, per_line: int = 1, names=("setting", "value")) -> str:
    """Key/value pairs as a table, `per_line` pairs side by side to keep long lists compact."""
    cells = []
    for i in range(0, len(rows), per_line):
        chunk = rows[i:i + per_line]
        line = "".join(f'<td class="key">{_e(k)}</td><td class="num">{_e(v)}</td>' for k, v in chunk)
        line += '<td></td><td></td>' * (per_line - len(chunk))
        cells.append(f"<tr>{line}</tr>")
    head = f"<th>{_e(names[0])}</th><th>{_e(names[1])}</th>" * per_line
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(cells)}</tbody></table>'


def _metrics_tables(metrics: dict) -> str:
    """The metrics table (metric, this run, the numbers beside it, seed document, which way is
    better, description), in registry order, and an "other values" table for keys the registry
    does not know."""
    beside = {b for key in metrics if key in METRICS for b in METRICS[key].baselines if b in metrics}
    rows = []
    for metric in METRICS.values():
        key = metric.key
        if key not in metrics or key in beside or _shown_with_its_value(key, metrics):
            continue
        references = "; ".join(f"{METRICS[b].label}: {format_with_ci95(b, metrics)}"
                               for b in metric.baselines if b in metrics) or "-"
        seed = format_value(metric.seed_document) if metric.seed_document is not None else "-"
        better = _better(key)
        num = "num" if _is_number(metrics[key]) else ""
        rows.append(
            f'<tr><td class="metric">{_e(key)}</td><td class="{num}">{_e(format_with_ci95(key, metrics))}</td>'
            f'<td class="{"num" if references != "-" else "missing"}">{_e(references)}</td>'
            f'<td class="{"num" if seed != "-" else "missing"}">{_e(seed)}</td>'
            f'<td class="better">{_e(better)}</td>'
            f'<td class="desc">{_describe(metric.description)}</td></tr>')
    if rows:
        out = ('<table id="metrics"><thead><tr><th>metric</th><th>this run</th><th>beside it</th>'
               '<th>seed document</th><th>better</th><th>what it measures</th></tr></thead>'
               f'<tbody>{"".join(rows)}</tbody></table>')
    else:
        out = f'<p class="note">No {rundir.METRICS_FILE} in this run folder: run the evaluation to fill this table.</p>'
        seeds = "".join(f'<tr><td class="metric">{_e(m.key)}</td><td class="num">{_e(format_value(m.seed_document))}'
                        "</td></tr>" for m in METRICS.values() if m.seed_document is not None)
        out += ('<p>The seed document reports:</p><table id="seed-document"><thead><tr><th>metric</th>'
                f'<th>seed document</th></tr></thead><tbody>{seeds}</tbody></table>')
    other = [(k, format_metric(k, v)) for k, v in metrics.items() if k not in METRICS]
    if other:
        out += "<h3>Other values</h3>" + _kv_table(other, "other-metrics", per_line=2, names=("metric", "value"))
    return out


def _training_section(run_info: dict | None, records: list[dict], config: dict | None) -> str:
    rows = []
    info = run_info if isinstance(run_info, dict) else {}
    for key, label in _RUN_INFO:
        if key in info:
            rows.append((label, _run_info_value(key, info[key])))
    epochs = [r["epoch"] for r in records if isinstance(r.get("epoch"), (int, float))]
    if epochs:
        done = format_value(max(epochs))
        planned = config.get("epochs") if isinstance(config, dict) else None
        rows.append(("Epochs", f"{done} of {planned}" if planned is not None else done))
    last = records[-1] if records else {}
    for key in ("recon", "val_recon"):
        if isinstance(last.get(key), (int, float)):
            rows.append((f"Final {key.replace('_', ' ')}", format_value(last[key])))
    for key, value in info.items():
        if key not in dict(_RUN_INFO):
            rows.append((key, format_value(value)))
    if not rows:
        return f'<p class="note">No {rundir.RUN_INFO_FILE} or {rundir.LOG_FILE} in this run folder.</p>'
    return _kv_table(rows, "training")


def write_report(run_dir) -> Path:
    """Write the report page of a run folder, a single self-contained page about one run, and
    return its path.

    Reads whatever of the config, run info, log, metrics and figures exists; missing parts are
    noted in the page rather than raising.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    rundir.check_writable(run_dir, "report writes its page there")
    config = rundir.read_config_values(run_dir)
    run_info = rundir.read_run_info(run_dir)
    records = rundir.read_log(run_dir)
    metrics = read_metrics(run_dir)
    name = run_dir.resolve().name

    parts = [f"<h1>omnivae run: {_e(name)}</h1>"]
    data = "an image folder" if isinstance(config, dict) and config.get("data") == "folder" else "Omniglot"
    subtitle = f"A structured VAE on {data}: a content code (which character) and a style code (how it was drawn)."
    parts.append(f'<p class="sub">{_e(subtitle)}</p>')

    parts.append("<h2>How it was trained</h2>")
    parts.append(_training_section(run_info, records, config))

    parts.append("<h2>Configuration</h2>")
    if isinstance(config, dict) and config:
        parts.append(_kv_table([(k, _format_setting(v)) for k, v in config.items()], "config", per_line=3))
    else:
        parts.append(f'<p class="note">No readable {rundir.CONFIG_FILE} in this run folder.</p>')

    parts.append("<h2>Metrics</h2>")
    parts.append("<p>Each number is beside its references (the same measure on raw pixels, the chance "
                 "references of style leakage, the noise floor of the prior match) and, where it reports one, "
                 "the seed document's value. ± is the 95% interval over few-shot episodes.</p>")
    parts.append(_metrics_tables(metrics))

    parts.append("<h2>Figures</h2>")
    figures = _figure_order(rundir.figures_dir(run_dir))
    decoder = config.get("decoder", "deconv") if isinstance(config, dict) else "deconv"
    if not figures:
        parts.append('<p class="note">No figures in this run folder.</p>')
    for path in figures:
        css = ' class="grid"' if path.name in _GRID_FIGURES else ""
        parts.append(
            f'<figure id="fig-{_e(path.stem)}"><img{css} src="{_png_data_uri(path)}" alt="{_e(path.name)}">'
            f"<figcaption><code>{_e(path.name)}</code>: {_e(_caption(path.name, decoder))}</figcaption></figure>")

    page = _page(f"omnivae report: {name}", "\n".join(parts))
    return rundir.write_text(rundir.report_path(run_dir), page)


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


# ----------------------------------------------------------------------------- comparing runs


def _run_names(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent folder added where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def _compare_rows(run_dirs, fold_ci95: bool = True) -> tuple[list[str], list[list[str]], list[dict]]:
    """Header and rows of the comparison table, plus each run's raw values. fold_ci95: show a 95%
    half-width beside its value ("0.80 ± 0.01") rather than in a column of its own."""
    run_dirs = [Path(p) for p in run_dirs]
    values = []
    for run_dir in run_dirs:
        found = read_metrics(run_dir)
        info = rundir.read_run_info(run_dir)
        if isinstance(info, dict) and "train_seconds" in info:
            found["train_seconds"] = info["train_seconds"]
        values.append(found)
    columns = [k for k in METRICS if any(k in v for v in values)]
    if fold_ci95:
        columns = [k for k in columns if not _shown_with_its_value(k, columns)]
    if any("train_seconds" in v for v in values):
        columns.append("train_seconds")
    show = format_with_ci95 if fold_ci95 else (lambda k, v: format_metric(k, v[k]))
    header = ["run"] + columns
    rows = [[name] + [show(k, v) if k in v else "-" for k in columns] for name, v in zip(_run_names(run_dirs), values)]
    return header, rows, values


def protocol_warnings(run_dirs) -> list[str]:
    """One line for each way the runs' metrics differ in what their numbers mean: the
    evaluation protocol version (files without one are version 1) or the split they were
    computed on. Runs without metrics are left out."""
    run_dirs = [Path(p) for p in run_dirs]
    found = {name: read_metrics(d) for name, d in zip(_run_names(run_dirs), run_dirs)}
    found = {name: m for name, m in found.items() if m}
    lines = []
    for key, default, what in (("protocol_version", 1, "evaluation protocol versions"), ("split", None, "splits")):
        seen = {name: m.get(key, default) for name, m in found.items()}
        if len(set(map(str, seen.values()))) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in seen.items())
            lines.append(f"warning: these runs were measured under different {what} ({listed}); "
                         "their numbers are not comparable")
    return lines


def compare(run_dirs, fmt: str = "table") -> str:
    """The metrics of several runs, one row per run: fmt "table" (aligned text), "markdown" or "csv".

    Columns are the metrics any run has, in registry order, then train_seconds; "-" marks a
    value a run lacks. "table" and "markdown" show a 95% half-width beside its value
    ("0.8000 ± 0.0100"); "csv" keeps every key in a column of its own, as plain numbers.
    """
    header, rows, _ = _compare_rows(run_dirs, fold_ci95=fmt != "csv")
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buffer.getvalue()
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    if fmt == "table":
        widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]

        def line(cells):  # run names left-aligned, numbers right-aligned
            padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
            return "  ".join(padded).rstrip()

        return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]) + "\n"
    raise ValueError(f"unknown format {fmt!r}; choose table, markdown or csv")


def write_compare_page(run_dirs, path) -> Path:
    """Write a self-contained HTML page with the comparison table and one bar chart per key metric."""
    run_dirs = [Path(p) for p in run_dirs]
    header, rows, values = _compare_rows(run_dirs)
    names = _run_names(run_dirs)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    def cell_class(i, text):
        return "key" if i == 0 else ("missing" if text == "-" else "num")

    body_rows = "".join("<tr>" + "".join(f'<td class="{cell_class(i, c)}">{_e(c)}</td>' for i, c in enumerate(row))
                        + "</tr>" for row in rows)
    parts = [f"<h1>omnivae: {len(run_dirs)} runs compared</h1>"]
    parts += [f'<p class="warning">{_e(line)}</p>' for line in protocol_warnings(run_dirs)]
    parts += [
             f'<div style="overflow-x:auto"><table id="compare"><thead><tr>{head}</tr></thead>'
             f"<tbody>{body_rows}</tbody></table></div>"]
    described = [k for k in header[1:] if k in METRICS]
    if described:
        items = "".join(f'<tr><td class="metric">{_e(k)}</td><td>{_e(METRICS[k].label)}</td>'
                        f'<td class="better">{_e(_better(k))}</td>'
                        f'<td class="desc">{_describe(METRICS[k].description)}</td></tr>' for k in described)
        parts.append('<h2>What the columns mean</h2><table><thead><tr><th>metric</th><th>label</th><th>better</th>'
                     f"<th>what it measures</th></tr></thead><tbody>{items}</tbody></table>")
    charts = [m for m in METRICS.values() if m.chart and any(_is_number(v.get(m.key)) for v in values)]
    if charts:
        parts.append('<h2>Key metrics</h2><div class="charts">')
        with tempfile.TemporaryDirectory() as tmp:
            for metric in charts:
                key = metric.key
                numbers = [v.get(key) if _is_number(v.get(key)) else None for v in values]
                # A dashed reference line: the first number the registry shows beside this one (raw
                # pixels, the drawer-code reference), else the seed document's number.
                reference, label = None, ""
                for baseline in metric.baselines:
                    found = [v[baseline] for v in values if _is_number(v.get(baseline))]
                    if found:
                        reference, label = found[0], METRICS[baseline].label
                        break
                if reference is None and metric.seed_document is not None:
                    reference, label = metric.seed_document, "seed document"
                title = f"{metric.label} ({metric.direction} is better)" if metric.direction else metric.label
                png = bar_chart(names, numbers, Path(tmp) / f"{key}.png", title=title, reference=reference,
                                reference_label=label)
                parts.append(f'<figure><img src="{_png_data_uri(png)}" alt="{_e(key)}"><figcaption>'
                             f"<code>{_e(key)}</code>: {_describe(metric.description)}</figcaption></figure>")
        parts.append("</div>")
    return rundir.write_text(path, _page("omnivae: runs compared", "\n".join(parts)))
