"""The offline docs site: build it once, then check every page as a reader would get it.

- links: every link inside the site reaches a built page and, with `#x`, an element with that id; nothing links to
  the published site (those links must be relative to work offline and in previews);
- offline: no page, stylesheet or script loads anything from the network;
- wording: no page (and not README.md) shows notes meant for the developers, machine paths, log timestamps or
  notebook tracebacks;
- in headless Chromium (one browser for all pages, driven over its DevTools pipe): every page loads with no console
  error, no failed request and no request off this machine, its maths is typeset, its images load, and each tutorial
  page shows a figure.

Pages are found by listing the built site, never from a list in this file. The site is built once for the module
(about a minute on two cores); DOCS_SITE=_proc/_docs checks a site built before, DOCS_SCREENSHOTS=<folder> keeps the
screenshots of the home page and 04_inference.
"""
import base64, html, json, os, re, select, shutil, subprocess, sys, time
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
         "--host-resolver-rules=MAP * ~NOTFOUND"]  # a page that tries the network gets an error, never a reply
OWN_HOST = "maisi-nb.github.io"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make sysdeps`)")

# What must never reach a reader: notes for developers, machine paths, log timestamps, notebook tracebacks.
LEAKS = {
    "developer notes (FACTS)": r"\bFACTS\b",
    "fact sheet": r"(?i)\bfact[- ]sheets?\b",
    "section sign": r"§",
    "'the issue'": r"(?i)\bthe issue\b",
    "session": r"(?i)\bsessions?\b",
    "issue's budget": r"(?i)\bissue'?s budget\b",
    "machine path": r"(?<![\w.~/-])/(?:work|tmp|root)/",
    "timestamped log line": r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}|\b\d{2}:\d{2}:\d{2}[.,]\d{3}\b|\[\d{4}/\d{6}\.\d+",
    "notebook traceback": r"<ipython-input-|/ipykernel_\d+/",
    "internal bug number": r"\b[Bb]ugs? \d+\b",
}

def leaks(text):
    "Each leak pattern found in `text`, with the words around it."
    out = []
    for what, pat in LEAKS.items():
        for m in re.finditer(pat, text):
            out.append(f"{what}: ...{text[max(0, m.start() - 60):m.end() + 60]!r}...")
    return out

class Page(HTMLParser):
    "The ids, the links and resources (tag, attribute, value) and the text a reader sees (no scripts or styles) of one page."
    def __init__(self, src):
        super().__init__(convert_charrefs=True)
        self.ids, self.refs, self.text, self._skip = set(), [], [], 0
        self.feed(src)
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("id", "name"):
            if a.get(k) and (k == "id" or tag == "a"): self.ids.add(a[k])
        for k in ("href", "src", "poster", "data"):
            if a.get(k) is not None: self.refs.append((tag, k, a[k], a.get("rel", "")))
        for k in ("alt", "title"):
            if a.get(k): self.text.append(a[k])
        if tag in ("script", "style"): self._skip += 1
    def handle_endtag(self, tag):
        if tag in ("script", "style") and self._skip: self._skip -= 1
    def handle_data(self, d):
        if not self._skip: self.text.append(d)

@pytest.fixture(scope="module")
def site():
    "Build the site once for this module (or, with DOCS_SITE=<folder>, check a site built before)."
    if os.environ.get("DOCS_SITE"): return Path(os.environ["DOCS_SITE"]).resolve()
    t0 = time.time()
    r = subprocess.run([sys.executable, "tools/build_docs.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, (r.stderr + r.stdout)[-6000:]
    out = ROOT/"_proc"/"_docs"
    print(f"docs built in {time.time() - t0:.0f} s")
    return out

@pytest.fixture(scope="module")
def pages(site):
    "Every built page, parsed: {path from the site root: Page}."
    return {p.relative_to(site).as_posix(): Page(p.read_text()) for p in sorted(site.rglob("*.html"))}

def notebooks():
    "The notebooks the site is made of (each becomes a page of the same name)."
    return sorted(p.relative_to(ROOT/"nbs") for p in (ROOT/"nbs").rglob("*.ipynb")
                  if not any(s.startswith((".", "_")) for s in p.relative_to(ROOT/"nbs").parts))

def is_tutorial(page):
    "The home page and the numbered walk-through notebooks (01_..., 02_...) are tutorials; 00* notebooks are the library."
    name = PurePosixPath(page).name
    return name == "index.html" or re.match(r"0[1-9]", name) is not None

def test_every_notebook_is_a_page(site, pages):
    missing = [str(n) for n in notebooks() if n.with_suffix(".html").as_posix() not in pages]
    assert not missing, f"notebooks without a page: {missing}"

def test_sidebar_lists_notebooks_in_file_order(site, pages):
    "The sidebar is the notebooks, home first, then by file name; no settings or style files."
    import configparser
    ini = configparser.ConfigParser(); ini.read(ROOT/"settings.ini")
    if ini["DEFAULT"].getboolean("custom_sidebar", False): pytest.skip("settings.ini: custom_sidebar = True (nbs/sidebar.yml is used as written)")
    src = (site/"index.html").read_text()
    nav = re.search(r'id="quarto-sidebar".*?</nav>', src, re.S)
    assert nav, "index.html has no sidebar"
    hrefs = [h for h in re.findall(r'href="([^"#]+)"', nav.group(0)) if h.endswith(".html")]
    nbs = [n.with_suffix(".html").as_posix() for n in notebooks()]
    want = ["index.html"] + sorted(n for n in nbs if n != "index.html")
    assert [h for h in hrefs if h in nbs] == want
    extra = [h for h in re.findall(r'href="([^"#]+)"', nav.group(0)) if re.search(r"\.(ya?ml|css|py|json)$", h)]
    assert not extra, f"sidebar links to files that are not pages: {extra}"

def test_links_stay_inside_the_site_and_resolve(site, pages):
    broken, own = [], []
    for page, p in pages.items():
        for tag, attr, ref, rel in p.refs:
            u = urlsplit(ref)
            if OWN_HOST in (u.netloc or "") or ref.startswith("//" + OWN_HOST):
                if "canonical" not in rel: own.append(f"{page}: {ref}")
                continue
            if u.scheme or ref.startswith("//"): continue  # other sites (GitHub sources, papers): not checked offline
            target = (PurePosixPath(page).parent / unquote(u.path)).as_posix() if u.path else page
            target = os.path.normpath(target)
            if target.startswith(".."): broken.append(f"{page}: {ref} leaves the site"); continue
            f = site/target
            if f.is_dir(): f = f/"index.html"; target = f"{target}/index.html"
            if not f.exists(): broken.append(f"{page}: {ref} (no file {target})"); continue
            if u.fragment and f.suffix == ".html":
                ids = pages[f.relative_to(site).as_posix()].ids
                if unquote(u.fragment) not in ids: broken.append(f"{page}: {ref} (no #{u.fragment} in {target})")
    assert not own, f"{len(own)} links to the published site instead of the local page, e.g. {own[:5]}"
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:40])

def test_nothing_loads_from_the_network(site, pages):
    "Pages, stylesheets and scripts use only files of the site (KaTeX included)."
    remote = []
    for page, p in pages.items():
        for tag, attr, ref, rel in p.refs:
            loads = attr != "href" or (tag == "link" and not set(str(rel).split()) & {"canonical", "alternate", "license"})
            if loads and re.match(r"(?i)(https?:)?//", ref): remote.append(f"{page}: <{tag} {attr}={ref}>")
    for f in site.rglob("*.css"):
        for m in re.finditer(r"""(?i)(@import\s+|url\(\s*)["']?((?:https?:)?//[^"')\s]+)""", f.read_text(errors="ignore")):
            remote.append(f"{f.relative_to(site)}: {m.group(2)}")
    assert not remote, "loaded from the network:\n" + "\n".join(remote[:20])
    assert (site/"site_libs"/"katex"/"katex.min.js").exists()

def test_no_leaks_in_pages_or_readme(site, pages):
    found = []
    for page, p in pages.items():
        text = html.unescape(" ".join(p.text + [r[2] for r in p.refs]))
        found += [f"{page}: {l}" for l in leaks(text)]
    search = site/"search.json"
    if search.exists(): found += [f"search.json: {l}" for l in leaks(search.read_text())]
    found += [f"README.md: {l}" for l in leaks((ROOT/"README.md").read_text())]
    assert not found, f"{len(found)} leaks:\n" + "\n".join(found[:40])

def test_leak_patterns_catch_what_they_should():
    for bad in ["see FACTS", "the fact sheet", "MAISI §3.4", "as the issue says", "this session", "the issue's budget",
                "saved to /work/main/x", "in /tmp/abc", "2026-12-05 07:43:20 INFO", "<ipython-input-3-abc>",
                "(bug 17)"]:
        assert leaks(bad), bad
    for ok in ["https://github.com/Project-MONAI/tutorials/tree/main/generation/maisi", "facts about CT", "issues a warning",
               "a 2026-12-05 release", "out_dir/tmp/"]:
        assert not leaks(ok), ok

def test_readme_links_resolve():
    "README.md is read on the repository page: its relative links must name files of the repository."
    readme = (ROOT/"README.md").read_text()
    bad = []
    for ref in re.findall(r"\]\(([^)\s]+)", readme) + re.findall(r'(?:src|href)="([^"]+)"', readme):
        u = urlsplit(ref)
        if u.scheme or ref.startswith(("#", "//")): continue
        if not (ROOT/unquote(u.path)).exists(): bad.append(ref)
    assert not bad, f"README.md links to files that do not exist: {bad}"

def test_readme_is_generated_from_index(tmp_path):
    "README.md and README_files/ are what `tools/build_docs.py --readme` makes of nbs/index.ipynb: edit the notebook."
    sys.path.insert(0, str(ROOT/"tools"))
    try:
        import build_docs
        build_docs.build_readme(tmp_path)
    finally: sys.path.remove(str(ROOT/"tools"))
    assert (tmp_path/"README.md").read_text() == (ROOT/"README.md").read_text(), \
        "README.md is out of date: run `make docs` (tools/build_docs.py --readme) and commit README.md and README_files/"
    made = {p.name: p.read_bytes() for p in (tmp_path/"README_files").iterdir()}
    have = {p.name: p.read_bytes() for p in (ROOT/"README_files").iterdir()} if (ROOT/"README_files").exists() else {}
    assert made == have, "README_files/ is out of date: run `make docs` and commit README.md and README_files/"

sys.path.insert(0, str(ROOT / "tools"))
from chromium import Chromium   # the DevTools-pipe client shared with tools/local_3d_viewer.py
sys.path.pop(0)

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    b = Chromium(tmp_path_factory.mktemp("chromium-profile"), FLAGS, CHROMIUM)
    yield b
    b.close()

PAGE_STATE = """(() => {
  const imgs = [...document.images];
  return {
    title: document.title,
    text: document.body.innerText,
    figures: imgs.filter(i => !i.closest('nav, header, footer, #quarto-sidebar') && i.naturalWidth > 0).length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
    maths: document.querySelectorAll('span.math').length,
    untypeset: [...document.querySelectorAll('span.math')].filter(s => !s.querySelector('.katex') || s.querySelector('.katex-error')).map(s => s.textContent).slice(0, 3),
    sidebar: !!document.querySelector('#quarto-sidebar a'),
  };
})()"""

@needs_chromium
def test_pages_in_chromium(site, pages, browser, tmp_path):
    "Every page loads cleanly, typesets its maths and shows its images; tutorial pages show at least one figure."
    bad = []
    shots = Path(os.environ.get("DOCS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    for page in pages:
        problems = browser.open((site/page).as_uri())
        s = browser.js(PAGE_STATE)
        if problems: bad.append(f"{page}: " + "; ".join(problems[:5]))
        if s["broken_images"]: bad.append(f"{page}: images that do not load: {s['broken_images'][:5]}")
        if s["untypeset"]: bad.append(f"{page}: maths left as TeX or KaTeX errors: {s['untypeset']}")
        if not s["sidebar"]: bad.append(f"{page}: no sidebar")
        if "maisi_nb" not in s["title"] + s["text"]: bad.append(f"{page}: no site title")
        if is_tutorial(page) and s["figures"] < 1: bad.append(f"{page}: a tutorial page with no figure")
        if page in ("index.html", "04_inference.html"):
            browser.screenshot(shots/f"{PurePosixPath(page).stem}.png")
            import matplotlib.image as mpimg
            grey = mpimg.imread(shots/f"{PurePosixPath(page).stem}.png")[..., :3].mean(-1)
            # a real page, not blank: many distinct grey levels and visible contrast
            if not (grey.std() > 0.05 and len(np.unique((grey * 255).astype(int))) > 20): bad.append(f"{page}: blank screenshot")
    assert not bad, "\n".join(bad)

@pytest.mark.parametrize("page,symbols", [
    ("00_networks.html", ["build_networks", "load_checkpoint", "decode_latents"]),
    ("00a_labels.html", ["label_id", "labels_to_bits", "region_indices_from_mask"]),
])
def test_api_blocks(site, pages, page, symbols):
    "API blocks: one per symbol, docments rendered as markdown (no backticks left), no docstrings Python made up."
    src = (site/page).read_text()
    for s in symbols: assert f'id="{s}"' in src, f"{page}: API doc for {s} missing"

def test_api_text_is_rendered(site, pages):
    "No API block shows a docstring Python made up, a dunder name as bold, or a docment's markdown literally."
    bad = []
    for page in pages:
        src = (site/page).read_text()
        for pat, what in [(r"<em>Call self as a function\.</em>", "'Call self as a function.'"),
                          (r"<em>Return repr\(self\)\.</em>", "'Return repr(self).'"),
                          (r"<em>Initialize self\.", "'Initialize self.'"),
                          (r'<h3 [^>]*>[^<]*<strong>', "a bold dunder in a heading"),
                          (r'<span class="co"># [^<]*`[^<]*`', "a docment's markdown shown literally")]:
            n = len(re.findall(pat, src))
            if n: bad.append(f"{page}: {n}x {what}")
    assert not bad, "\n".join(bad)
