"""The offline docs site: build it, open pages in headless Chromium, and check what a reader would see."""
import shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (apt-get install chromium)")

@pytest.fixture(scope="module")
def site():
    r = subprocess.run([sys.executable, "tools/build_docs.py"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    return ROOT/"_proc"/"_docs"

def chromium(page, tmp_path, *args):
    prof = tmp_path/f"profile-{page.stem}"
    r = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={prof}", *args, page.as_uri()],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return r

def rendered(page, tmp_path):
    "The DOM after scripts ran, and a screenshot as an RGB array."
    dom = chromium(page, tmp_path, "--dump-dom").stdout
    shot = tmp_path/f"{page.stem}.png"
    chromium(page, tmp_path, "--window-size=1280,2000", f"--screenshot={shot}")
    import matplotlib.image as mpimg
    return dom, mpimg.imread(shot)

@pytest.mark.parametrize("page,symbols", [
    ("index.html", []),
    ("00_networks.html", ["build_networks", "load_checkpoint", "decode_latents"]),
    ("00a_labels.html", ["label_id", "labels_to_bits", "region_indices_from_mask"]),
])
def test_page_shows_content(site, tmp_path, page, symbols):
    path = site/page
    assert path.exists(), f"{page} was not built; pages: {sorted(p.name for p in site.glob('*.html'))}"
    dom, img = rendered(path, tmp_path)
    assert "maisi_nb" in dom
    assert "<img" in dom, f"{page}: no figure on the page"
    for s in symbols: assert s in dom, f"{page}: API doc for {s} missing"
    if symbols: assert "def " in dom or "(" in dom
    # the screenshot is a real page, not blank: many distinct grey levels and visible contrast
    grey = img[..., :3].mean(-1)
    assert grey.std() > 0.05 and len(np.unique((grey * 255).astype(int))) > 20
