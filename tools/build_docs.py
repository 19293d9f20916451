"""Offline docs build (Quarto cannot be installed here): the notebooks are processed as `nbdev_proc_nbs` does, then
smalldocs renders the same `_quarto.yml` project that `nbdev_docs` would give to Quarto. Output: _proc/_docs/.

    python tools/build_docs.py            # site only
    python tools/build_docs.py --readme   # also rewrite README.md (+ README_files/) from nbs/index.ipynb

What this adds to nbdev + smalldocs, so the site works offline and its links stay inside it:
- API blocks rendered by `docs_renderer.DocsRenderer` (docments as a markdown table, no docstrings Python made up);
- the sidebar lists the notebooks only, in file-name order (unless settings.ini sets `custom_sidebar = True`,
  then nbs/sidebar.yml is used as written); nothing in nbs/ is rewritten;
- links nbdev writes to the published site (`https://<user>.github.io/<repo>/inference.html#x`) point to the built
  page (`04_inference.html#x`), found from each notebook's name, not from a list of pages;
- KaTeX comes from tools/vendor/katex instead of a CDN, and a theme's web fonts fall back to system fonts: no page
  loads anything from the network;
- a cell that nbdev runs only because it imports something runs only its imports (see docs_renderer.py);
- the home page's table of notebooks (the `<!-- notebooks -->` marker in index.ipynb) is made from each notebook's
  title and summary, so a new notebook appears in it, in the sidebar and in README.md without editing a list.
"""
import argparse, os, re, shutil, sys, time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
KATEX_VENDOR = TOOLS/"vendor"/"katex"
sys.path.insert(0, str(TOOLS))

def config():
    os.chdir(ROOT)
    from nbdev.config import get_config
    return get_config()

def site_url(cfg):
    "The published site's address with a trailing slash, e.g. https://maisi-nb.github.io/maisi_nb/."
    base = cfg.doc_baseurl.strip("/")
    return cfg.doc_host.rstrip("/") + "/" + (base + "/" if base else "")

def nbdev_page(rel):
    "The page name nbdev gives a notebook (its `output-file`, and what its doc links point to): 04_inference.ipynb -> inference.html."
    from nbdev.doclinks import _nbpath2html
    return _nbpath2html(PurePosixPath(rel)).as_posix()

def source_files(nbs):
    "Every file nbdev_proc_nbs takes from nbs/: folders and files starting with `_` or `.` skipped, except _quarto.yml."
    for p in sorted(nbs.rglob("*")):
        rel = p.relative_to(nbs)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts): continue
        if any(part.startswith("_") for part in rel.parts[:-1]): continue
        if rel.name.startswith("_") and rel.name != "_quarto.yml": continue
        yield p, rel

def process_notebooks(cfg, proc, workers):
    "nbs/ -> _proc/: notebooks through nbdev's processors (with DocsRenderer), other files copied."
    import concurrent.futures as cf, multiprocessing as mp
    from nbdev.doclinks import _build_modidx
    _build_modidx()  # what nbdev_proc_nbs does first: doc links need every exported symbol
    jobs = []
    for p, rel in source_files(cfg.nbs_path):
        d = proc/rel; d.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix == ".ipynb": jobs.append((p, d))
        else: shutil.copy2(p, d)
    import docs_renderer
    failed = {}
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(docs_renderer.proc_notebook, j): j[0].relative_to(cfg.nbs_path).as_posix() for j in jobs}
        for f in cf.as_completed(futs):
            try: f.result()
            except Exception as e: failed[futs[f]] = f"{e}\n  caused by: {e.__cause__!r}"
    return [rel for _, rel in source_files(cfg.nbs_path) if rel.suffix == ".ipynb"], failed

def write_sidebar(cfg, proc):
    "The sidebar from the notebooks only, index first, then file-name order (nbdev's own order)."
    if cfg.custom_sidebar: return  # nbs/sidebar.yml, already copied, is used as written
    from nbdev.quarto import nbdev_sidebar
    (proc/"sidebar.yml").unlink(missing_ok=True)
    nbdev_sidebar.__wrapped__(path=str(proc), force=True, file_glob="*.ipynb")

def render(proc):
    from smalldocs.site import build
    site = build(proc, quiet=True)
    for w in site.warnings:
        if "output-file is not read" not in w: print(f"warning: {w}", file=sys.stderr)
    return site.out

def page_map(notebooks):
    "nbdev's page name -> the page smalldocs builds (inference.html -> 04_inference.html), for every notebook."
    return {nbdev_page(rel): PurePosixPath(rel).with_suffix(".html").as_posix() for rel in notebooks}

def relative(target, page):
    "`target` (a path from the site root) as a link from `page` (also from the root)."
    return os.path.relpath(target, PurePosixPath(page).parent.as_posix() or ".").replace(os.sep, "/")

def fix_pages(out, cfg, pages):
    """Links to the published site made relative and pointed at the built pages; KaTeX from site_libs/katex.

    A doc link to a symbol the target page has no block for (a private helper named in prose) becomes plain code:
    a link that lands nowhere is worse than none."""
    base = site_url(cfg)
    host = urlsplit(base)
    url = r'(?:https?:)?//' + re.escape(host.netloc + host.path.rstrip("/")) + r'/?([^"#]*)(#[^"]*)?'
    own_a = re.compile(r'<a href="' + url + r'"([^>]*)>(.*?)</a>', re.S)
    own = re.compile(r'(href|src)="' + url + '"')
    cdn = re.compile(r'https://cdn\.jsdelivr\.net/npm/katex@[^/"]+/dist/')
    if KATEX_VENDOR.exists(): shutil.copytree(KATEX_VENDOR, out/"site_libs"/"katex", dirs_exist_ok=True)
    for f in out.rglob("*.css"):  # a theme's web fonts (cosmo: Source Sans Pro from Google) fall back to system fonts
        css = f.read_text(errors="ignore")
        kept = re.sub(r"""@import\s+(?:url\(\s*["']?(?:https?:)?//[^)]*\)|["'](?:https?:)?//[^"']*["'])[^;]*;""", "", css)
        if kept != css: f.write_text(kept)
    files = {f.relative_to(out).as_posix(): f for f in out.rglob("*.html")}
    ids = {p: set(re.findall(r'\bid="([^"]+)"', f.read_text())) for p, f in files.items()}
    for page, f in files.items():
        html = f.read_text()
        def target(path, anchor):
            path = pages.get(path or "index.html", path or "index.html")
            return path, relative(path, page) + (anchor or "")
        def link(m):
            path, rel = target(m.group(1), m.group(2))
            if m.group(2) and path in ids and m.group(2)[1:] not in ids[path]: return m.group(4)
            return f'<a href="{rel}"{m.group(3)}>{m.group(4)}</a>'
        new = own_a.sub(link, html)
        new = own.sub(lambda m: f'{m.group(1)}="{target(m.group(2), m.group(3))[1]}"', new)
        new = cdn.sub(relative("site_libs/katex", page) + "/", new)
        if new != html: f.write_text(new)

def build_site(workers=None):
    cfg = config()
    proc = ROOT/"_proc"
    shutil.rmtree(proc, ignore_errors=True); proc.mkdir()
    notebooks, failed = process_notebooks(cfg, proc, workers or min(2, os.cpu_count() or 1))
    for name, err in failed.items():  # the page is still built (without its API blocks); the build fails at the end
        print(f"error: {name}: its API docs could not be made:\n{err}", file=sys.stderr)
        shutil.copy2(cfg.nbs_path/name, proc/name)
    write_sidebar(cfg, proc)
    table = notebook_table(cfg.nbs_path)
    for rel in notebooks: expand_notebook_table(proc/rel, table)
    out = render(proc)
    if not (out/"index.html").exists(): sys.exit("smalldocs wrote no index.html")
    for y in ("nbdev.yml", "sidebar.yml"): (out/y).unlink(missing_ok=True)  # settings, not pages
    fix_pages(out, cfg, page_map(notebooks))
    if failed: sys.exit(f"docs built with errors in: {', '.join(sorted(failed))}")
    return out

NOTEBOOK_TABLE = "<!-- notebooks -->"  # in a markdown cell of index.ipynb: replaced by the table of notebooks

def front_matter(path):
    "A notebook's front matter as nbdev reads it (title and description from its `# Title` and `> summary`)."
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    return NBProcessor(path, procs=FrontmatterProc, process=True).nb.frontmatter_

def notebook_table(nbs):
    "Markdown table of every notebook but the home page, in reading (file-name) order: linked title and summary."
    cell = lambda s: re.sub(r"\s+", " ", str(s)).replace("|", r"\|").strip()
    rows = ["| notebook | what it covers |", "|:--|:--|"]
    for p, rel in source_files(nbs):
        if p.suffix != ".ipynb" or rel.name == "index.ipynb": continue
        fm = front_matter(p)
        rows.append(f"| [{cell(fm.get('title', rel.stem))}]({rel.as_posix()}) | {cell(fm.get('description', ''))} |")
    return "\n".join(rows)

def expand_notebook_table(nb_path, table):
    "Put the table of notebooks where a markdown cell of `nb_path` has the marker (the processed copy is edited)."
    import json
    nb = json.loads(nb_path.read_text())
    hit = False
    for c in nb["cells"]:
        src = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "markdown" and NOTEBOOK_TABLE in src:
            c["source"] = src.replace(NOTEBOOK_TABLE, table); hit = True
    if hit: nb_path.write_text(json.dumps(nb, indent=1, ensure_ascii=False))

def readme_links(md):
    """Links written for the site and the notebooks (`04_inference.ipynb`, `04_inference.html#x`, `images/a.png`,
    relative to nbs/) rewritten for the repository page, where README.md sits at the root: `nbs/04_inference.ipynb`."""
    nbs = ROOT/"nbs"
    def fix(target):
        u = urlsplit(target)
        if u.scheme or u.netloc or target.startswith(("#", "/")) or not u.path: return target
        path = u.path
        if path.endswith(".html") and (nbs/path).with_suffix(".ipynb").exists(): path = path[:-5] + ".ipynb"
        if (nbs/path).exists() and not (ROOT/path).exists():
            return "nbs/" + path + (f"#{u.fragment}" if u.fragment else "")
        return target
    md = re.sub(r"(\]\()([^)\s]+)", lambda m: m.group(1) + fix(m.group(2)), md)
    return re.sub(r'((?:href|src)=")([^"]+)', lambda m: m.group(1) + fix(m.group(2)), md)

def _cell_md(cell, i, dest):
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
            (dest/name).write_bytes(base64.b64decode(data["image/png"]))
            parts.append(f"![]({name})")
        elif "text/markdown" in data: parts.append("".join(data["text/markdown"]))
        elif "text/plain" in data: parts.append("```\n" + "".join(data["text/plain"]) + "\n```")
        elif o.get("output_type") == "stream": parts.append("```\n" + "".join(o.get("text", "")).rstrip() + "\n```")
    return parts

def build_readme(dest=ROOT):
    "README.md from nbs/index.ipynb (title, summary, prose, code and figures), figures in README_files/, written in `dest`."
    import nbformat
    config()
    nb = nbformat.read(ROOT/"nbs"/"index.ipynb", as_version=4)
    fm = front_matter(ROOT/"nbs"/"index.ipynb")
    dest = Path(dest)
    shutil.rmtree(dest/"README_files", ignore_errors=True); (dest/"README_files").mkdir(parents=True)
    out = ["<!-- Generated from nbs/index.ipynb by tools/build_docs.py --readme; edit the notebook. -->",
           f"# {fm.get('title', 'maisi_nb')}", f"> {fm.get('description', '')}"]
    cells = nb.cells
    if cells and cells[0].cell_type == "markdown" and cells[0].source.lstrip().startswith("# "): cells = cells[1:]
    table = notebook_table(ROOT/"nbs")
    for i, c in enumerate(cells):
        if c.cell_type == "markdown": c.source = c.source.replace(NOTEBOOK_TABLE, table)
        out += _cell_md(c, i, dest)
    text = "\n\n".join(p.strip() for p in out if p.strip()) + "\n"
    (dest/"README.md").write_text(readme_links(text))

if __name__ == "__main__":
    ap = argparse.ArgumentParser(); ap.add_argument("--readme", action="store_true")
    ap.add_argument("--workers", type=int, default=None, help="notebooks processed at once (default: up to 2)")
    a = ap.parse_args()
    t0 = time.time()
    site = build_site(a.workers)
    if a.readme: build_readme()
    print(f"site: {site/'index.html'} ({time.time() - t0:.0f} s)")
