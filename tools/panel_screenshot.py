"""A picture of the live generation panel: the demo model's panel after one generation, exported with
`ipywidgets.embed` and drawn by headless Chromium with the vendored widget manager (nothing from the network).

    python tools/panel_screenshot.py [nbs/images/panel.png]
"""
import os, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "tools" / "vendor" / "jupyter-widgets-html-manager"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                  "--hide-scrollbars", "--virtual-time-budget=15000", "--force-device-scale-factor=1"]

def panel_html(path:Path, generate:bool=True) -> Path:
    "Write a standalone HTML page of a demo-model panel (after one generation when `generate`), its script beside it."
    from ipywidgets.embed import embed_minimal_html
    from maisi_nb.panel import GenerationPanel
    panel = GenerationPanel(output_dir="output", background=False)   # nothing is saved
    panel.steps.value = 30
    if generate: panel.generate_button.click()
    shutil.copy(VENDOR / "embed.js", path.parent / "embed.js")
    embed_minimal_html(path, views=[panel.widget], title="maisi_nb generation panel", requirejs=False, embed_url="embed.js", cors=False)
    return path

def screenshot(html:Path, png:Path, size=(1180, 1400), chromium:str="/usr/bin/chromium") -> Path:
    "Draw `html` with headless Chromium into `png` (written atomically)."
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(png.name + ".tmp.png")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                        f"--screenshot={tmp}", html.as_uri()], check=True, capture_output=True, timeout=180)
    os.replace(tmp, png)
    return png

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "nbs" / "images" / "panel.png").resolve()
    with tempfile.TemporaryDirectory() as d:
        print(screenshot(panel_html(Path(d) / "panel.html"), out))
