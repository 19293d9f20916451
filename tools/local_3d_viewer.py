"""A 3D view of a generated sample that needs no internet: itk-vtk-viewer (the web viewer behind itkwidgets) served
from this machine, opened on a sample's NIfTI image and label files.

The viewer is a prebuilt web application from the npm registry (BSD-3-Clause, about 110 MB with its image readers):

    npm pack itk-vtk-viewer@14.51.0 && tar xzf itk-vtk-viewer-14.51.0.tgz     # -> package/dist

Then, for a sample written by `maisi_generate` or `result.save(...)`:

    python tools/local_3d_viewer.py --viewer package/dist IMAGE.nii.gz LABEL.nii.gz          # prints a URL to open
    python tools/local_3d_viewer.py --viewer package/dist IMAGE LABEL --screenshot view.png  # headless picture

The viewer reads the NIfTI geometry itself (spacing, origin, direction) and draws the CT as a volume rendering with
the labels coloured on top; its menu (top left) has slice views, colour maps and the label opacity.
"""
import argparse, base64, functools, http.server, os, shutil, tempfile, threading, time
from pathlib import Path
from chromium import Chromium   # tools/chromium.py

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking", "--hide-scrollbars",
                  "--use-angle=swiftshader", "--enable-unsafe-swiftshader",   # WebGL without a GPU
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # nothing but this machine

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

def serve(viewer_dir, files, port:int=0):
    "Serve the viewer and `files` from 127.0.0.1; returns (server, root folder, base URL). Stop with server.shutdown()."
    viewer_dir = Path(viewer_dir).resolve()
    if not (viewer_dir / "index.html").exists() or not (viewer_dir / "itkVtkViewer.js").exists():
        raise FileNotFoundError(f"--viewer: {viewer_dir} is not itk-vtk-viewer's dist folder (index.html, itkVtkViewer.js); "
                                "get it with `npm pack itk-vtk-viewer@14.51.0` and `tar xzf` (package/dist)")
    root = Path(tempfile.mkdtemp(prefix="maisi-3d-"))
    (root / "viewer").symlink_to(viewer_dir)
    (root / "data").mkdir()
    for f in files:
        f = Path(f).resolve()
        if not f.exists(): raise FileNotFoundError(f"file not found: {f}")
        (root / "data" / f.name).symlink_to(f)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, root, f"http://127.0.0.1:{server.server_address[1]}"

def viewer_url(base:str, image, label=None) -> str:
    "The viewer's address opened on an image (and label image) served under data/."
    url = f"{base}/viewer/index.html?image={base}/data/{Path(image).name}"
    return url + (f"&labelImage={base}/data/{Path(label).name}" if label else "")

def screenshot(url:str, png, size=(1200, 800), wait:float=15.) -> Path:
    "Open `url` in headless Chromium, let the viewer load and render for `wait` seconds, write a PNG (atomically)."
    png = Path(png); png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        b = Chromium(profile, CHROMIUM_FLAGS, size=size)
        try:
            b.send("Page.navigate", session=True, url=url)
            time.sleep(wait)
            data = base64.b64decode(b.send("Page.captureScreenshot", session=True, format="png")["data"])
        finally: b.close()
    tmp = png.with_name(png.name + ".tmp"); tmp.write_bytes(data); os.replace(tmp, png)
    return png

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image"); p.add_argument("label", nargs="?")
    p.add_argument("--viewer", required=True, help="itk-vtk-viewer's dist folder (npm pack itk-vtk-viewer)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free one)")
    p.add_argument("--screenshot", help="write a PNG from headless Chromium instead of serving until Ctrl-C")
    p.add_argument("--wait", type=float, default=15., help="seconds the viewer gets to load before the screenshot")
    a = p.parse_args(argv)
    server, root, base = serve(a.viewer, [f for f in (a.image, a.label) if f], a.port)
    url = viewer_url(base, a.image, a.label)
    try:
        if a.screenshot: print(screenshot(url, a.screenshot, wait=a.wait)); return 0
        print(f"open {url}\n(Ctrl-C stops the server)")
        while True: time.sleep(3600)
    except KeyboardInterrupt: return 0
    finally: server.shutdown(); shutil.rmtree(root, ignore_errors=True)

if __name__ == "__main__": raise SystemExit(main())
