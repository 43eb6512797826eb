"""The report page: one HTML file, styles inline, every image a base64 data URI, no script, no network."""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

__all__ = ["SECTION_IDS", "Page", "GalleryRowView", "render", "data_uri", "fmt_number"]

#: Section ids, in page order (tests and links rely on them).
SECTION_IDS = ("run", "curves", "prototypes", "embedding-map", "evaluations", "config")
SECTION_TITLES = {
    "run": "Run", "curves": "Training curves", "prototypes": "Prototypes",
    "embedding-map": "Embedding map", "evaluations": "Evaluations", "config": "Configuration",
}

_CSS = """
body{font:14px/1.45 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#263238;color:#fff;padding:14px 28px}
header h1{margin:0 0 4px;font-size:22px} header p{margin:0;color:#cfd8dc}
nav{margin-top:8px} nav a{color:#80cbc4;margin-right:14px;text-decoration:none}
main{padding:6px 28px 28px;max-width:1500px}
section{background:#fff;border:1px solid #e0e0e0;border-radius:6px;padding:10px 18px 16px;margin:16px 0}
h2{font-size:18px;margin:6px 0 10px} h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #e0e0e0;padding:3px 9px;text-align:left;vertical-align:top}
th{background:#f3f5f6} td.num{text-align:right;font-variant-numeric:tabular-nums}
.facts td:first-child{color:#555;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;max-width:560px} figure img{max-width:100%;height:auto} figcaption{font-size:12px;color:#555}
.note{color:#6d4c41;background:#fff8e1;border-left:3px solid #ffb300;padding:4px 10px;margin:6px 0}
.warn{color:#b71c1c}
.protorow{display:flex;align-items:center;gap:10px;margin:4px 0;padding:4px 0;border-bottom:1px solid #f0f0f0}
.protolabel{width:190px;flex:none;font-size:12px;line-height:1.35}
.protolabel b{font-size:13px}
.protoimgs{display:flex;gap:3px;flex-wrap:wrap}
.protoimgs img{image-rendering:pixelated;border:1px solid #ddd;background:#000}
code,pre{font-family:"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
pre{background:#f5f5f5;padding:8px 12px;overflow:auto;max-height:520px}
footer{color:#777;font-size:12px;padding:0 28px 20px}
"""


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode('ascii')}"


def fmt_number(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.4g}"


@dataclass
class GalleryRowView:
    title: str
    details: list[str]
    images: list[tuple[bytes, str]]  # (png, alt text)
    size: int = 84


@dataclass
class Page:
    title: str
    subtitle: str
    run_facts: list[tuple[str, str]] = field(default_factory=list)
    environment: list[tuple[str, str]] = field(default_factory=list)
    run_notes: list[str] = field(default_factory=list)
    run_warnings: list[str] = field(default_factory=list)
    curves: list[Any] = field(default_factory=list)  # plots.Figure
    curves_notes: list[str] = field(default_factory=list)
    gallery_intro: str = ""
    gallery_rows: list[GalleryRowView] = field(default_factory=list)
    gallery_figures: list[Any] = field(default_factory=list)
    gallery_notes: list[str] = field(default_factory=list)
    map_figure: Any = None
    map_notes: list[str] = field(default_factory=list)
    eval_rows: list[dict[str, Any]] = field(default_factory=list)  # command, dataset, metrics[(name, v, init, baseline)], verdict, ...
    eval_notes: list[str] = field(default_factory=list)
    config_yaml: str = ""
    config_source: str = ""
    footer: str = ""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _notes(notes: Iterable[str]) -> str:
    return "".join(f'<p class="note">{_e(n)}</p>' for n in notes)


def _figure(fig, alt: str | None = None) -> str:
    cap = f"<figcaption>{_e(fig.caption)}</figcaption>" if fig.caption else ""
    return (f'<figure id="fig-{_e(fig.key)}"><img src="{data_uri(fig.png)}" alt="{_e(alt or fig.title)}">'
            f"{cap}</figure>")


def _facts_table(rows: list[tuple[str, str]], cls: str = "facts") -> str:
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _section(sid: str, inner: str) -> str:
    return f'<section id="{sid}"><h2>{_e(SECTION_TITLES[sid])}</h2>{inner}</section>\n'


def _run_section(p: Page) -> str:
    parts = [_notes(p.run_notes), "<h3>The run</h3>", _facts_table(p.run_facts),
             "<h3>Where this report was made</h3>",
             "<p>Read at report time (the training machine is described above, from run.json and the checkpoint).</p>",
             _facts_table(p.environment)]
    if p.run_warnings:
        items = "".join(f"<li>{_e(w)}</li>" for w in p.run_warnings)
        parts.append(f'<h3>Warnings of the run</h3><p>The first ones, as run.json keeps them.</p>'
                     f'<ul class="warn">{items}</ul>')
    return _section("run", "".join(parts))


def _curves_section(p: Page) -> str:
    figs = "".join(_figure(f) for f in p.curves)
    return _section("curves", _notes(p.curves_notes) + f'<div class="grid">{figs}</div>')


def _gallery_section(p: Page) -> str:
    parts = [f"<p>{_e(p.gallery_intro)}</p>" if p.gallery_intro else "", _notes(p.gallery_notes)]
    for k, row in enumerate(p.gallery_rows):
        imgs = "".join(f'<img src="{data_uri(png)}" width="{row.size}" height="{row.size}" alt="{_e(alt)}" '
                       f'title="{_e(alt)}">' for png, alt in row.images)
        details = "<br>".join(_e(d) for d in row.details)
        parts.append(f'<div class="protorow" id="proto-row-{k}"><div class="protolabel"><b>{_e(row.title)}</b>'
                     f'<br>{details}</div><div class="protoimgs">{imgs}</div></div>')
    if p.gallery_figures:
        parts.append('<h3>Prototype usage</h3><div class="grid">'
                     + "".join(_figure(f) for f in p.gallery_figures) + "</div>")
    return _section("prototypes", "".join(parts))


def _map_section(p: Page) -> str:
    inner = _notes(p.map_notes)
    if p.map_figure is not None:
        inner += _figure(p.map_figure).replace("<figure ", '<figure style="max-width:1000px" ', 1)
    return _section("embedding-map", inner)


def _eval_section(p: Page) -> str:
    if not p.eval_rows:
        inner = _notes(p.eval_notes) + ("<p>No evaluation results in this run folder yet. The <code>swav eval</code> "
                                        "commands save theirs in <code>RUN_DIR/eval/*.json</code>; run "
                                        "<code>swav report</code> again to include them.</p>")
        return _section("evaluations", inner)
    head = ("<tr><th>command</th><th>data</th><th>metric</th><th>learned</th><th>at init</th>"
            "<th>raw pixels</th><th>time</th><th>source</th></tr>")
    body, verdicts = [], []
    for r in p.eval_rows:
        metrics = r["metrics"] or [("(none)", None, None, None)]
        n = len(metrics)
        if r.get("verdict"):
            verdicts.append(f'<p class="verdict"><b>{_e(r["command"])}</b>: {_e(r["verdict"])}</p>')
        for j, (name, value, init, baseline) in enumerate(metrics):
            cells = []
            if j == 0:
                span = f' rowspan="{n}"' if n > 1 else ""
                cells.append(f"<td{span}><code>{_e(r['command'])}</code></td><td{span}>{_e(r.get('dataset', ''))}</td>")
            cells.append(f'<td>{_e(name)}</td><td class="num">{fmt_number(value)}</td>'
                         f'<td class="num">{fmt_number(init)}</td><td class="num">{fmt_number(baseline)}</td>')
            if j == 0:
                cells.append(f"<td{span}>{_e(r.get('time', ''))}</td><td{span}>{_e(r.get('source', ''))}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    table = f'<table id="eval-table">{head}{"".join(body)}</table>'
    return _section("evaluations", _notes(p.eval_notes) + "".join(verdicts) + table)


def _config_section(p: Page) -> str:
    if not p.config_yaml:
        return _section("config", _notes(["No configuration found (neither checkpoint.pt nor config.yaml)."]))
    src = f"<p>From <code>{_e(p.config_source)}</code>; pass it back with <code>swav pretrain --config</code>.</p>"
    return _section("config", src + f"<pre>{_e(p.config_yaml)}</pre>")


def render(p: Page) -> str:
    nav = "".join(f'<a href="#{sid}">{_e(SECTION_TITLES[sid])}</a>' for sid in SECTION_IDS)
    body = (_run_section(p) + _curves_section(p) + _gallery_section(p) + _map_section(p) + _eval_section(p)
            + _config_section(p))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<meta name=\"generator\" content=\"swav report\"><title>{_e(p.title)}</title>"
            "<link rel=\"icon\" href=\"data:,\">"
            f"<style>{_CSS}</style></head>\n<body>\n<header><h1>{_e(p.title)}</h1><p>{_e(p.subtitle)}</p>"
            f"<nav>{nav}</nav></header>\n<main>\n{body}</main>\n<footer>{_e(p.footer)}</footer>\n</body></html>\n")
