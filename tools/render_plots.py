"""Render `dvc plots show` and report/report.md to HTML and screenshot both in headless Chromium.

DVC's HTML loads vega from a CDN; on machines without a network this script points it at local copies fetched from
the npm registry (`npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2`, cached in build/vega), so the page
renders offline. Needs Debian's `chromium` (apt-get install chromium) and npm.

    python tools/render_plots.py            # -> build/plots/index.html, build/plots.png, build/report.png
"""
from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

VEGA = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}


def _vega_scripts(cache: Path) -> dict[str, Path]:
    """Local copies of the three vega bundles DVC's page asks for, fetched once with `npm pack`."""
    cache.mkdir(parents=True, exist_ok=True)
    found = {}
    for name, version in VEGA.items():
        target = cache / f"{name}.min.js"
        if not target.is_file():
            subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=cache, check=True,
                           capture_output=True)
            with tarfile.open(cache / f"{name}-{version}.tgz") as tar:
                member = tar.extractfile(f"package/build/{name}.min.js")
                target.write_bytes(member.read())
        found[name] = target
    return found


def _screenshot(page: Path, png: Path, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install chromium")
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--virtual-time-budget=10000", f"--window-size=1280,{height}", f"--screenshot={png}",
                    page.resolve().as_uri()], check=True, capture_output=True)


def _markdown_page(report: Path, out: Path) -> Path:
    """A minimal Markdown-to-HTML rendering (headings, tables, images, code, paragraphs): enough to look at it."""
    lines, body, in_code, table = report.read_text().splitlines(), [], False, []

    def flush_table():
        if table:
            rows = [r.strip("|").split("|") for r in table if not re.match(r"^\|(-+\|)+$", r)]
            body.append("<table border=1 cellpadding=4>" + "".join(
                "<tr>" + "".join(f"<t{'h' if i == 0 else 'd'}>{_inline(c.strip())}</t{'h' if i == 0 else 'd'}>"
                                 for c in row) + "</tr>" for i, row in enumerate(rows)) + "</table>")
            table.clear()

    for line in lines:
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    flush_table()
    page = out / "report.html"
    page.write_text("<html><body style='font-family:sans-serif;max-width:1200px'>" + "\n".join(body) + "</body></html>")
    return page


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r"<img alt='\1' src='\2' style='max-width:600px'>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build"))
    parser.add_argument("--dvc", default=str(Path(sys.executable).parent / "dvc"))
    args = parser.parse_args()
    plots_dir = args.out / "plots"
    subprocess.run([args.dvc, "plots", "show", "-o", str(plots_dir)], check=True)
    index = plots_dir / "index.html"
    page = index.read_text()
    for name, path in _vega_scripts(args.out / "vega").items():
        local = shutil.copy(path, plots_dir / path.name)
        page = re.sub(rf'src="https://cdn\.jsdelivr\.net/npm/{name}@[^"]+"', f'src="{Path(local).name}"', page)
    index.write_text(page)
    _screenshot(index, args.out / "plots.png", 3200)
    report = Path("report/report.md")
    shutil.copytree("report", args.out / "report", dirs_exist_ok=True)
    page = _markdown_page(report, args.out / "report")
    (args.out / "report" / "report.html").write_text(page.read_text().replace("../plots/", "../../plots/"))
    _screenshot(args.out / "report" / "report.html", args.out / "report.png", 4000)
    print(f"wrote {index}, {args.out / 'plots.png'}, {args.out / 'report.png'}")


if __name__ == "__main__":
    main()
