"""A small parser of report pages for the tests: sections, images, links, text."""
from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

from PIL import Image


class ReportPage(HTMLParser):
    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.section_ids: list[str] = []
        self.ids: set[str] = set()
        self.images: list[dict[str, str]] = []
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, value) of every src/href
        self.tags: list[str] = []
        self.text_by_section: dict[str, list[str]] = {}
        self._section: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "section":
            self._section = a.get("id", "")
            self.section_ids.append(self._section)
        if tag == "img":
            self.images.append(a)
        for key in ("src", "href", "srcset", "poster", "data"):
            if key in a:
                self.urls.append((tag, key, a[key] or ""))

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None

    def handle_data(self, data):
        if self._section is not None:
            self.text_by_section.setdefault(self._section, []).append(data)

    def text(self, section: str) -> str:
        return " ".join(" ".join(self.text_by_section.get(section, [])).split())


def decode_data_image(uri: str) -> Image.Image:
    head, _, payload = uri.partition(",")
    assert head == "data:image/png;base64", head[:40]
    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
    img.load()
    return img
