"""index.html: one page for a whole run, in the spirit of MultiQC's report.

The failed inputs with their stage and reason come first, then a sortable table of every
input, then per format the plots across files (FASTQ: seqkit stats' and FastQC's figures;
VCF: bcftools stats'; CSV/TSV: rows, columns, empty cells). The page opens from disk with no
request to any other host: plotly.js is inlined once (plotly.offline.get_plotlyjs), figures
travel as JSON in <script type="application/json"> (every <, > and & escaped, so no key can
end the script), no MathJax, no fonts or style sheets from elsewhere. Keys are hostile:
Jinja2 escapes everything it prints, and the labels handed to plotly are HTML-escaped
because plotly.js reads <br>, <a href=...> and entities in text as markup.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

import jinja2
import plotly.graph_objects as go
import plotly.io
from markupsafe import Markup
from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from .results import SUMMARY_COLUMNS, empty_cells

TEMPLATES = Path(__file__).parent / "templates"
TABLE_COLUMNS = tuple(c for c in SUMMARY_COLUMNS if c not in ("report", "log"))
TEMPLATE = "plotly_white"
MAX_TICK_LABELS = 40       # past this many files the x axis shows no names (hover does)
TICK_CHARACTERS = 40       # a name on the axis: its last characters, where R1 and R2 differ
MAX_LEGEND = 20            # past this many lines, no legend (hover names the file)
MAX_CHROMOSOMES = 24       # per-chromosome bars: the largest, the rest as "other"
# Plotly.newPlot's config: no MathJax typesetting, no link to Chart Studio, no logo.
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "typesetMath": False,
               "showLink": False, "showSendToCloud": False}


def plot_label(key):
    """Return a key as plotly text that shows the key itself (pure): plotly.js renders <b>,
    <br>, <a href=...> and &entities; in labels, so <, > and & are escaped."""
    return html.escape(key, quote=False)


def tick_label(key):
    """Return a key shortened for an axis (pure): its last TICK_CHARACTERS characters."""
    short = key if len(key) <= TICK_CHARACTERS else "…" + key[-TICK_CHARACTERS:]
    return plot_label(" ".join(short.split()))


def script_json(value):
    """Return JSON that is safe inside a <script> element (pure): <, > and & as \\u escapes, so
    no string in it can close the element or open a comment; U+2028/2029 escaped too."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def href(path):
    """Return a relative link to a file below DIR (pure): every part percent-encoded."""
    return quote(path, safe="/") if path else ""


def figure(traces, title, keys=None, **layout):
    """Return a figure as plotly.js takes it: {"data": traces as JSON, "layout": {...}} (pure).

    The layout is a plain dict, not a validated go.Layout: validating a template per figure
    was nine tenths of the page's time. The template (plotly_white) is put in once by the
    page's script (render_page).
    """
    layout = {"title": {"text": title}, "height": 380, "hovermode": "closest",
              "margin": {"l": 60, "r": 20, "t": 50, "b": 40}, **layout}
    if keys is not None:
        shown = len(keys) <= MAX_TICK_LABELS
        layout["xaxis"] = {"automargin": True, "showticklabels": shown, "type": "category"}
        if shown:
            layout["xaxis"].update(tickangle=-45, tickmode="array",
                                   tickvals=[plot_label(k) for k in keys],
                                   ticktext=[tick_label(k) for k in keys])
        else:
            layout["xaxis"]["title"] = {"text": f"{len(keys):,} files (hover for names)"}
    return {"data": [trace.to_plotly_json() for trace in traces], "layout": layout}


def bar_figure(items, field, title):
    """Return a bar chart of summary `field` across files, or None when no file has it."""
    points = [(item["key"], item["summary"].get(field)) for item in items]
    points = [(key, value) for key, value in points if isinstance(value, (int, float))]
    if not points:
        return None
    keys = [key for key, _ in points]
    return figure([go.Bar(x=[plot_label(k) for k in keys], y=[v for _, v in points],
                          hovertemplate="%{x}<br>%{y}<extra></extra>")], title, keys)


def stacked_figure(items, fields, title):
    """Return stacked bars of several summary fields per file, or None."""
    items = [i for i in items if any(isinstance(i["summary"].get(f), (int, float)) for f in fields)]
    if not items:
        return None
    keys = [i["key"] for i in items]
    return figure([go.Bar(name=field, x=[plot_label(k) for k in keys],
                          y=[i["summary"].get(field) or 0 for i in items])
                   for field in fields], title, keys, barmode="stack")


def chromosome_figure(items, title="Records per chromosome"):
    """Return stacked bars per file of records_per_chromosome: the MAX_CHROMOSOMES largest
    chromosomes over all files, the rest summed as "other"; None when no file has them."""
    items = [i for i in items if isinstance(i["summary"].get("records_per_chromosome"), dict)]
    if not items:
        return None
    totals = {}
    for item in items:
        for name, count in item["summary"]["records_per_chromosome"].items():
            totals[name] = totals.get(name, 0) + count
    top = sorted(totals, key=lambda name: (-totals[name], name))[:MAX_CHROMOSOMES]
    keys = [i["key"] for i in items]
    traces = [go.Bar(name=plot_label(name), x=[plot_label(k) for k in keys],
                     y=[i["summary"]["records_per_chromosome"].get(name, 0) for i in items])
              for name in top]
    if len(totals) > len(top):
        chosen = set(top)
        traces.append(go.Bar(name="other", x=[plot_label(k) for k in keys], y=[
            sum(c for n, c in i["summary"]["records_per_chromosome"].items() if n not in chosen)
            for i in items]))
    return figure(traces, title, keys, barmode="stack")


def histogram_points(value):
    """Return [(x, count)] from a report histogram, or None when it is absent or malformed
    (pure): read_length_histogram is {"bin_width": W, "bins": [[length_from, reads], ...]},
    mean_quality_histogram is [[phred, reads], ...] (older reports have neither)."""
    bins = value.get("bins") if isinstance(value, dict) else value
    if not isinstance(bins, list):
        return None
    points = [tuple(pair) for pair in bins if isinstance(pair, (list, tuple)) and len(pair) == 2
              and all(isinstance(n, (int, float)) for n in pair)]
    return sorted(points) or None


def lines_figure(items, field, title, x_title):
    """Return one line per file of a histogram field (histogram_points), or None."""
    traces = []
    for item in items:
        points = histogram_points(item["summary"].get(field))
        if points:
            name = plot_label(item["key"])
            traces.append(go.Scatter(x=[x for x, _ in points], y=[y for _, y in points],
                                     mode="lines", line_shape="hv", name=tick_label(item["key"]),
                                     hovertext=name, hovertemplate="%{hovertext}<br>%{x}: %{y}"
                                     "<extra></extra>"))
    if not traces:
        return None
    return figure(traces, title, showlegend=len(traces) <= MAX_LEGEND,
                  xaxis={"title": {"text": x_title}}, yaxis={"title": {"text": "reads"}})


def format_sections(inputs):
    """Return [{"title", "files", "figures": [(id, figure dict)]}] per format present (pure)."""
    by_format = {}
    for item in inputs:
        report = item["report"]
        if report and report.get("status") != "error" and isinstance(report.get("summary"), dict):
            fmt = "csv" if report.get("format") == "tsv" else report.get("format")
            by_format.setdefault(fmt, []).append({"key": item["key"], "summary": report["summary"]})
    plans = {
        "fastq": ("FASTQ", lambda f: [
            bar_figure(f, "reads", "Reads"), bar_figure(f, "bases", "Bases"),
            bar_figure(f, "mean_quality", "Mean quality (Phred)"),
            bar_figure(f, "q30_percent", "Q30 bases (%)"), bar_figure(f, "gc_percent", "GC (%)"),
            lines_figure(f, "read_length_histogram", "Read length distribution", "read length"),
            lines_figure(f, "mean_quality_histogram", "Per-read mean quality",
                         "mean quality (Phred)")]),
        "vcf": ("VCF", lambda f: [
            bar_figure(f, "records", "Records"),
            stacked_figure(f, ("snvs", "indels", "others"), "SNVs, indels and others"),
            bar_figure(f, "ts_tv_ratio", "Ts/Tv"), chromosome_figure(f)]),
        "csv": ("CSV and TSV", lambda f: [
            bar_figure(f, "rows", "Rows"), bar_figure(f, "columns", "Columns"),
            bar_figure([{**i, "summary": {"empty_cells": empty_cells(i["summary"])}} for i in f],
                       "empty_cells", "Empty cells (profiled columns)")]),
    }
    sections = []
    for fmt, (title, plan) in plans.items():
        if fmt in by_format:
            figures = [fig for fig in plan(by_format[fmt]) if fig is not None]
            sections.append({"title": title, "files": len(by_format[fmt]), "figures": [
                (f"plot-{fmt}-{n}", fig) for n, fig in enumerate(figures)]})
    return sections


def render_page(inputs, rows, title="awsfun results"):
    """Return index.html's text for collect_inputs' items and their summary rows."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    sections = format_sections(inputs)
    figures = [{"id": fid, "figure": fig}
               for section in sections for fid, fig in section["figures"]]
    template = plotly.io.templates[TEMPLATE].to_plotly_json()
    plotly_js = get_plotlyjs().replace("</script", "<\\/script")
    failed = [row for row in rows if row["status"] == "error"]
    counts = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return environment.get_template("results.html.j2").render(
        title=title, rows=rows, failed=failed, counts=sorted(counts.items()),
        columns=TABLE_COLUMNS, sections=sections, href=href,
        figures_json=Markup(script_json(json.dumps(figures, cls=PlotlyJSONEncoder,
                                                   ensure_ascii=False))),
        template_json=Markup(script_json(template)),
        config_json=Markup(script_json(PLOT_CONFIG)),
        plotly_js=Markup(plotly_js))


def write_page(path, inputs, rows, title="awsfun results"):
    """Write index.html to path."""
    Path(path).write_text(render_page(inputs, rows, title), encoding="utf-8",
                          errors="surrogateescape")
