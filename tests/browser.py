"""Reading an HTML page as a person's browser shows it: Debian's headless
Chromium renders it, and a small parser finds the tags and table rows."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of table rows by id of their table."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.table_rows: dict[str, list[list[str]]] = {}
        self._table, self._row = None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = attrs.get("id")
            self.table_rows[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
            self.table_rows[self._table].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        if tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data


def parse(html: str) -> Elements:
    parser = Elements()
    parser.feed(html)
    for rows in parser.table_rows.values():
        rows[:] = [[" ".join(cell.split()) for cell in row] for row in rows]
    return parser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={user_data}", *args],
        capture_output=True, text=True, timeout=120, check=True)
