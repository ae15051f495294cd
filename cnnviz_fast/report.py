"""A self-contained HTML report: PNG figures embedded as data URIs, written atomically."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

from ._atomic import atomic_write
from .viz import to_pil


@dataclass
class Figure:
    title: str
    image: object  # [3, H, W] tensor in [0, 1]
    caption: str = ""


@dataclass
class Report:
    title: str
    intro: str = ""
    facts: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)

    def add(self, title: str, image, caption: str = "") -> None:
        self.figures.append(Figure(title, image, caption))

    def to_html(self) -> str:
        facts = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                        for k, v in self.facts.items())
        sections = "".join(
            f"<section><h2>{html.escape(f.title)}</h2><img alt='{html.escape(f.title)}' "
            f"src='data:image/png;base64,{_png_base64(f.image)}'><p>{html.escape(f.caption)}</p></section>"
            for f in self.figures)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>"
                f"<p>{html.escape(self.intro)}</p><table>{facts}</table>{sections}</body></html>")

    def write(self, path) -> Path:
        path = Path(path)
        with atomic_write(path, "w") as f:
            f.write(self.to_html())
        return path


def _png_base64(image) -> str:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}"
        "table{border-collapse:collapse;margin:1em 0}th,td{padding:.2em .8em;text-align:left;"
        "border-bottom:1px solid #eee}section{margin:2em 0}")
