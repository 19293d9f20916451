"""Offline docs build (Quarto cannot be installed here): nbdev_proc_nbs, then smalldocs renders the same
`_quarto.yml` project that `nbdev_docs` would give to Quarto. Output: _proc/_docs/index.html.

    python tools/build_docs.py            # site only
    python tools/build_docs.py --readme   # also rewrite README.md (+ README_files/) from nbs/index.ipynb
"""
import argparse, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def run(*args):
    r = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode: sys.exit(f"{' '.join(map(str, args))} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout

def build_site():
    shutil.rmtree(ROOT/"_proc", ignore_errors=True)
    run(BIN/"nbdev_sidebar")
    run(BIN/"nbdev_proc_nbs")
    out = run(BIN/"smalldocs", "render", "_proc")
    site = ROOT/"_proc"/"_docs"
    if not (site/"index.html").exists(): sys.exit(f"smalldocs wrote no index.html:\n{out}")
    return site

def _cell_md(cell, i):
    "Markdown for one processed cell: prose as is; code with its outputs, `#| echo: false` code shows outputs only."
    import base64
    if cell.cell_type == "markdown": return [cell.source]
    if cell.cell_type != "code": return []
    src = cell.source
    lines = [l for l in src.splitlines() if not l.startswith("#|")]
    parts = [] if "#| echo: false" in src or not "".join(lines).strip() else ["```python\n" + "\n".join(lines) + "\n```"]
    for j, o in enumerate(cell.get("outputs", [])):
        data = o.get("data", {})
        if "image/png" in data:
            name = f"README_files/figure-{i}-{j}.png"
            (ROOT/name).write_bytes(base64.b64decode(data["image/png"]))
            parts.append(f"![]({name})")
        elif "text/markdown" in data: parts.append(data["text/markdown"])
        elif "text/plain" in data: parts.append("```\n" + "".join(data["text/plain"]) + "\n```")
        elif o.get("output_type") == "stream": parts.append("```\n" + "".join(o.get("text", "")).rstrip() + "\n```")
    return parts

def build_readme():
    "README.md from nbs/index.ipynb (title, summary, prose, code and figures), figures in README_files/."
    import nbformat
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    nb = nbformat.read(ROOT/"nbs"/"index.ipynb", as_version=4)
    fm = NBProcessor(ROOT/"nbs"/"index.ipynb", procs=FrontmatterProc, process=True).nb.frontmatter_
    shutil.rmtree(ROOT/"README_files", ignore_errors=True); (ROOT/"README_files").mkdir()
    out = ["<!-- Generated from nbs/index.ipynb by tools/build_docs.py --readme; edit the notebook. -->",
           f"# {fm.get('title', 'maisi_nb')}", f"> {fm.get('description', '')}"]
    cells = nb.cells
    if cells and cells[0].cell_type == "markdown" and cells[0].source.lstrip().startswith("# "): cells = cells[1:]
    for i, c in enumerate(cells): out += _cell_md(c, i)
    (ROOT/"README.md").write_text("\n\n".join(p.strip() for p in out if p.strip()) + "\n")

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--readme", action="store_true")
    a = ap.parse_args()
    site = build_site()
    if a.readme: build_readme()
    print(f"site: {site/'index.html'}")
