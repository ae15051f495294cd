"""A self-contained HTML report: PNG figures embedded as data URIs, written atomically.

``Report(title, intro, facts)`` takes figures (``add``: one picture with a caption), comparison
grids (``add_grid``: rows of images x columns of methods, a colour bar and a how-to-read line per
column, paged when long, click a tile to enlarge it) and tables (``add_table``). No file or
network is referenced: the page opens from a mail attachment as it does from disk.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import atomic_write
from .viz import colormap_stops, to_pil


def _esc(value) -> str:
    return html.escape(str(value))


@dataclass
class Figure:
    title: str
    image: object  # [3, H, W] tensor in [0, 1], or a matplotlib Figure
    caption: str = ""

    def to_html(self) -> str:
        return (f"<section><h2>{_esc(self.title)}</h2>{_img(self.image, self.title, 'figure')}"
                f"<p class='caption'>{_esc(self.caption)}</p></section>")


@dataclass
class Column:
    """A grid column: its name, one line on how to read it, and its colour scale
    (``cmap`` a matplotlib colormap name, ``ends`` the labels of its two ends; None: no bar)."""
    name: str
    how_to_read: str = ""
    cmap: str | None = None
    ends: tuple = ("low", "high")


@dataclass
class Row:
    """A grid row: the input picture, the lines under it, and one picture per column."""
    image: object
    lines: tuple
    cells: list


@dataclass
class Grid:
    title: str
    columns: list
    rows: list
    intro: str = ""
    page_size: int | None = None

    def to_html(self) -> str:
        head = "".join(f"<th><div class='method'>{_esc(c.name)}</div>{_colorbar(c)}</th>" for c in self.columns)
        size = self.page_size or max(1, len(self.rows))
        pages = [self.rows[i:i + size] for i in range(0, len(self.rows), size)] or [[]]
        bodies = "".join(
            f"<tbody class='page' data-page='{p}'{'' if p == 0 else ' hidden'}>"
            + "".join(self._row_html(r) for r in rows) + "</tbody>"
            for p, rows in enumerate(pages))
        nav = ("" if len(pages) < 2 else
               f"<nav class='pager'><button type='button' class='prev' disabled>&#8249; previous</button>"
               f"<span class='where'>page 1 of {len(pages)}</span>"
               f"<button type='button' class='next'>next &#8250;</button></nav>")
        legend = "".join(f"<li><b>{_esc(c.name)}</b>: {_esc(c.how_to_read)}</li>" for c in self.columns
                         if c.how_to_read)
        return (f"<section class='grid-section'><h2>{_esc(self.title)}</h2>"
                + (f"<p>{_esc(self.intro)}</p>" if self.intro else "")
                + nav + f"<div class='scroll'><table class='grid'><thead><tr><th>input</th>{head}</tr></thead>"
                + bodies + "</table></div>" + (f"<ul class='legend'>{legend}</ul>" if legend else "")
                + "</section>")

    def _row_html(self, row: Row) -> str:
        lines = "".join(f"<div>{_esc(line)}</div>" for line in row.lines)
        alt = " / ".join(row.lines)
        cells = "".join(f"<td>{_img(img, f'{c.name}: {alt}', 'tile')}</td>"
                        for c, img in zip(self.columns, row.cells))
        return f"<tr><td class='input'>{_img(row.image, alt, 'tile')}<div class='label'>{lines}</div></td>{cells}</tr>"


@dataclass
class Table:
    title: str
    header: list
    rows: list
    note: str = ""

    def to_html(self) -> str:
        head = "".join(f"<th>{_esc(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        note = f"<p class='caption'>{_esc(self.note)}</p>" if self.note else ""
        return (f"<section><h2>{_esc(self.title)}</h2><div class='wide'><table class='data'><tr>{head}</tr>{body}"
                f"</table></div>{note}</section>")


@dataclass
class Report:
    title: str
    intro: str = ""
    facts: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)  # Figure, Grid and Table sections, in order
    links: dict = field(default_factory=dict)  # text -> relative address of a companion page

    def add(self, title: str, image, caption: str = "") -> None:
        self.figures.append(Figure(title, image, caption))

    def add_grid(self, title: str, columns: list, rows: list, intro: str = "", page_size: int | None = None) -> None:
        """A comparison grid: ``rows`` (``Row``) x ``columns`` (``Column``), ``page_size`` rows a page."""
        for row in rows:
            if len(row.cells) != len(columns):
                raise ValueError(f"rows: expected {len(columns)} cells per row, got {len(row.cells)}")
        self.figures.append(Grid(title, list(columns), list(rows), intro, page_size))

    def add_table(self, title: str, header: list, rows: list, note: str = "") -> None:
        self.figures.append(Table(title, list(header), [list(r) for r in rows], note))

    def to_html(self) -> str:
        facts = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in self.facts.items())
        sections = "".join(f.to_html() for f in self.figures)
        links = ("<p class='links'>" + " · ".join(f"<a href='{_esc(href)}'>{_esc(text)}</a>"
                                                 for text, href in self.links.items()) + "</p>") if self.links else ""
        return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
                f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<link rel='icon' href='data:,'><title>{_esc(self.title)}</title><style>{_CSS}</style></head>"
                f"<body><main><h1>{_esc(self.title)}</h1><p class='intro'>{_esc(self.intro)}</p>{links}"
                f"<div class='wide'><table class='facts'>{facts}</table></div>{sections}</main>"
                f"<div id='zoom' hidden></div>"
                f"<script>{_JS}</script></body></html>")

    def write(self, path) -> Path:
        path = Path(path)
        with atomic_write(path, "w") as f:
            f.write(self.to_html())
        return path


def _img(image, alt: str, cls: str) -> str:
    return f"<img class='{cls}' alt='{_esc(alt)}' src='data:image/png;base64,{_png_base64(image)}'>"


def _png_base64(image) -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _colorbar(column: Column) -> str:
    if column.cmap is None:
        return ""
    stops = ", ".join(colormap_stops(column.cmap))
    lo, hi = column.ends
    return (f"<div class='bar' style='background:linear-gradient(to right, {stops})'></div>"
            f"<div class='ends'><span>{_esc(lo)}</span><span>{_esc(hi)}</span></div>")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1500px;margin:0 auto;padding:1.5em}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em}
.intro,.caption{color:#4a5560;max-width:70em}
table.facts,table.data{border-collapse:collapse;margin:1em 0;background:#fff;max-width:100%}
.facts td,.data td{overflow-wrap:anywhere}.wide{overflow-x:auto}
.facts th,.facts td,.data th,.data td{padding:.3em .9em;text-align:left;border-bottom:1px solid #e4e7eb;
 font-variant-numeric:tabular-nums}
img.figure{max-width:100%;border:1px solid #dde1e6;background:#fff}
.scroll{overflow-x:auto;background:#fff;border:1px solid #dde1e6;border-radius:6px}
table.grid{border-collapse:separate;border-spacing:6px}
.grid th{font-weight:600;font-size:.85em;vertical-align:bottom;min-width:128px;position:sticky;top:0;background:#fff}
.grid th:first-child,.grid td.input{position:sticky;left:0;background:#fff;z-index:1}
.grid td{vertical-align:top;text-align:center}
img.tile{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;border-radius:3px;cursor:zoom-in;
 transition:transform .12s;display:block}
img.tile:hover{transform:scale(1.06);box-shadow:0 2px 8px rgba(0,0,0,.25)}
.label{font-size:.78em;line-height:1.3;max-width:128px;margin-top:.2em;text-align:left;word-break:break-word}
.bar{height:8px;border-radius:2px;margin-top:4px}
.ends{display:flex;justify-content:space-between;font-size:.72em;font-weight:400;color:#4a5560}
.legend{columns:2 28em;font-size:.9em;color:#333}.legend li{margin:.2em 0;break-inside:avoid}
.pager{display:flex;gap:.8em;align-items:center;margin:.5em 0}
.pager button{font:inherit;padding:.3em .9em;border:1px solid #b8c0c8;border-radius:4px;background:#fff;cursor:pointer}
.pager button:disabled{opacity:.4;cursor:default}
#zoom{position:fixed;inset:0;background:rgba(10,14,18,.82);display:flex;align-items:center;justify-content:center;
 z-index:10;cursor:zoom-out}
#zoom[hidden]{display:none}
#zoom img{width:min(80vw,80vh);height:min(80vw,80vh);object-fit:contain;image-rendering:pixelated;background:#fff}
#zoom figcaption{color:#fff;text-align:center;margin-top:.5em}
@media (max-width:700px){main{padding:.6em}.facts th,.facts td,.data th,.data td{padding:.3em .4em}img.tile{width:96px;height:96px}.grid th{min-width:96px}}
"""

_JS = """
(function(){
  var zoom=document.getElementById('zoom');
  document.addEventListener('click', function(e){
    var t=e.target;
    if(t.classList && t.classList.contains('tile')){
      // built on demand so the page holds no image without a source
      var fig=document.createElement('figure'), big=document.createElement('img'), cap=document.createElement('figcaption');
      big.src=t.src; big.alt=t.alt; cap.textContent=t.alt; fig.append(big, cap); zoom.replaceChildren(fig);
      zoom.hidden=false; return;
    }
    if(zoom.contains(t)){zoom.hidden=true;}
  });
  document.addEventListener('keydown', function(e){ if(e.key==='Escape'){zoom.hidden=true;} });
  document.querySelectorAll('.grid-section').forEach(function(sec){
    var pages=sec.querySelectorAll('tbody.page'), nav=sec.querySelector('.pager'), at=0;
    if(!nav){return;}
    var prev=nav.querySelector('.prev'), next=nav.querySelector('.next'), where=nav.querySelector('.where');
    function show(i){
      at=Math.max(0, Math.min(pages.length-1, i));
      pages.forEach(function(p, j){ p.hidden = j!==at; });
      prev.disabled = at===0; next.disabled = at===pages.length-1;
      where.textContent='page '+(at+1)+' of '+pages.length;
    }
    prev.addEventListener('click', function(){ show(at-1); });
    next.addEventListener('click', function(){ show(at+1); });
  });
})();
"""


def results_report(results, max_images: int = 240, page_size: int = 12) -> Report:
    """The report of a result store (``open_results``): a paged gallery (images x methods, the
    first ``max_images`` index images), per-method timing, predictions, metrics, skipped files."""
    from .viz import SIGNED_CMAP, UNSIGNED_CMAP, heat_overlay

    m = results.manifest
    cfg = m["config"]
    index = results.index
    cols = index.select(["path", "label", "prediction", "score", "method", "target", "rank"]).to_pydict()
    methods = results.methods
    def namer(names):
        return lambda i: names[i] if 0 <= i < len(names) else str(i)
    name, label_name = namer(m.get("class_names") or []), namer(m.get("label_names") or [])

    n_images = m.get("images", 0)
    report = Report(f"cnnviz explain: {Path(cfg['data']).name}",
                    intro="Each row: one input (true label and the model's prediction under it) and each "
                          "method's map for the explained class. Click a tile to enlarge it.",
                    facts={"data": cfg["data"], "model": f"{cfg['model']} ({cfg['model_kind']}, sha256 "
                                                         f"{cfg['model_hash'][:12]})",
                           "images": n_images, "explained": len({p for p in cols["path"]}),
                           "skipped (unreadable)": len(m.get("skipped", [])),
                           "methods": ", ".join(methods), "target": f"{cfg['target']} (top-k {cfg['top_k']})",
                           "input": f"resize {cfg['size']}, crop {cfg['crop']}, mean {cfg['mean']}, std {cfg['std']}",
                           "stored maps": cfg["dtype"], "device": cfg["device"],
                           "command": m.get("command") or "explain_dataset(...)"})
    rows_of = {meth: [i for i, x in enumerate(cols["method"]) if x == meth] for meth in methods}
    shown = min(max_images * cfg["top_k"], len(rows_of[methods[0]]) if methods else 0)
    if shown:
        first = rows_of[methods[0]][:shown]
        thumbs = results.inputs(first).float() / 255
        pictures = {}
        for meth in methods:
            maps = results.maps(meth, rows_of[meth][:shown])
            pictures[meth] = heat_overlay(thumbs, maps, m["methods"][meth]["signed"])
        grid_rows = []
        for j, r in enumerate(first):
            label = cols["label"][r]
            lines = (Path(cols["path"][r]).name,
                     f"true: {label_name(label) if label >= 0 else '-'}",
                     f"pred: {name(cols['prediction'][r])} ({cols['score'][r]:.0%})")
            if cfg["top_k"] > 1 or cfg["target"] != "pred":
                lines += (f"explained: {name(cols['target'][r])}",)
            grid_rows.append(Row(thumbs[j], lines, [pictures[meth][j] for meth in methods]))
        columns = [Column(meth, _READING.get(m["methods"][meth]["method"], ""),
                          SIGNED_CMAP if m["methods"][meth]["signed"] else UNSIGNED_CMAP,
                          ("against", "for") if m["methods"][meth]["signed"] else ("low", "high"))
                   for meth in methods]
        note = f" (the first {max_images} images of {n_images})" if n_images > max_images else ""
        report.add_grid(f"Gallery{note}", columns, grid_rows, page_size=page_size)
    seconds = m.get("seconds", {})
    report.add_table("Time per method", ["method", "seconds", "ms / image", "images / s"],
                     [[meth, f"{seconds.get(meth, 0):.2f}", f"{1e3 * seconds.get(meth, 0) / max(1, n_images):.1f}",
                       f"{n_images / seconds[meth]:.1f}" if seconds.get(meth) else "-"] for meth in methods],
                     note="method time only (decode and forward excluded), summed over the run's shards")
    report.add_table("Predictions", ["class", "predicted", "labelled", "correct"], _prediction_rows(cols, methods, name, label_name))
    metric_cols = [c for c in index.column_names if c.endswith("_auc")]
    if metric_cols:
        import pyarrow.compute as pc
        report.add_table("Metrics (mean AUC)", ["method"] + metric_cols,
                         [[meth] + [f"{pc.mean(index.filter(pc.equal(index['method'], meth))[c]).as_py():.4f}"
                                    for c in metric_cols] for meth in methods],
                         note="deletion: lower is better; insertion: higher is better")
    skipped = m.get("skipped", [])
    report.add_table(f"Skipped files ({len(skipped)})", ["file", "reason"], skipped or [["none", ""]])
    return report


def _prediction_rows(cols, methods, name, label_name):
    """Per class: images predicted as it, and (when labels share the model's classes) labelled
    as it and correct."""
    if not methods:
        return []
    first = [i for i, x in enumerate(cols["method"]) if x == methods[0] and cols["rank"][i] == 0]
    same = all(label_name(cols["label"][i]) == name(cols["label"][i]) for i in first if cols["label"][i] >= 0)
    counts = {}
    for i in first:
        pred, label = cols["prediction"][i], cols["label"][i]
        counts.setdefault(name(pred), [0, 0, 0])[0] += 1
        if label >= 0 and same:
            counts.setdefault(name(label), [0, 0, 0])[1] += 1
            counts[name(label)][2] += int(label == pred)
    return [[c, p, lab or "-", corr if lab else "-"] for c, (p, lab, corr) in sorted(counts.items())]


# One line per method on how to read its map (shared by the demo and the explain report).
_READING = {
    "activation_map": "where the last conv block fires at all, whatever the class; bright = strong activation",
    "cam": "class activation map: red regions raise the explained class's score; coarse (the conv grid's "
           "resolution), upsampled",
    "grad_cam": "red = regions whose features raise the explained class's score (gradient-weighted); coarse by "
                "design, at the layer's resolution",
    "grad_cam_pp": "like Grad-CAM with pixel-wise weights: covers several instances of the class better",
    "layer_cam": "like Grad-CAM with per-position weights: finer, works on earlier layers",
    "score_cam": "red = regions that alone keep the class's score high (gradient-free, by masking)",
    "occlusion": "red = covering this patch lowers the score (evidence for), blue = raises it (against); "
                 "blocky at the window size",
    "saliency": "|gradient|: pixels where a small change moves the score most; noisy, edge-like",
    "guided_backprop": "sharp edges of what the network responds to; largely class-independent, reads like a sketch",
    "deconvnet": "reconstruction through transposed convs: the checkerboard is an artefact of strided "
                 "convolutions, not a feature of the image; look at the coarse layout",
    "smoothgrad": "gradients averaged over noisy copies: the saliency story with less noise (signed: red "
                  "raises the score, blue lowers it)",
    "integrated_gradients": "red pixels pushed the score up from a black baseline, blue pushed it down; "
                            "sums to the score difference",
    "deeplift": "like Integrated Gradients (black baseline, rescale rule), in one backward pass",
    "lrp": "relevance: red = evidence for the class, blue = against; sums to about the score",
}
