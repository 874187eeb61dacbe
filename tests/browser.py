"""Reading an HTML page as a person's browser shows it: Debian's headless
Chromium renders it, and a small parser finds the tags and table rows."""

from __future__ import annotations

import html as html_lib
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


# Measures the page as laid out, after the report has rendered: how wide the
# page is against the window, and each table against the box around it. The
# report itself has no scripts; this probe goes into a copy of it.
LAYOUT_PROBE = """<script>
const layout = {viewport: window.innerWidth, page: document.documentElement.scrollWidth, tables: {}};
for (const table of document.querySelectorAll("table")) {
  const box = table.parentElement;
  layout.tables[table.id] = {box_class: box.className, box_right: box.getBoundingClientRect().right,
                             box_width: box.clientWidth, box_scroll_width: box.scrollWidth,
                             table_width: table.getBoundingClientRect().width,
                             overflow_x: getComputedStyle(box).overflowX};
}
const probe = document.createElement("pre");
probe.id = "layout-probe";
probe.textContent = JSON.stringify(layout);
document.body.appendChild(probe);
</script>"""


def layout(html_file: Path, width: int, user_data: Path) -> dict:
    """The page's and each table's widths in Chromium with a `width` px wide window."""
    import json
    import re

    probed = html_file.with_name(html_file.stem + "_probed.html")
    probed.write_text(html_file.read_text().replace("</body>", LAYOUT_PROBE + "</body>"))
    dom = chromium(f"--window-size={width},900", "--dump-dom", probed.resolve().as_uri(), user_data=user_data).stdout
    found = re.search(r'<pre id="layout-probe">(.*?)</pre>', dom, re.S)
    assert found, "the layout probe did not run"
    return json.loads(html_lib.unescape(found[1]))
