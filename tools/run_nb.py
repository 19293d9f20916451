"""Execute notebooks in place so their saved outputs (figures, tables) feed the docs.

    python tools/run_nb.py nbs/00a_labels.ipynb [more.ipynb] [--flags slow gpu]

Cells marked `#| eval: false`, and cells with a test flag (slow, gpu) that is not passed, are not run and
keep the outputs they already had (e.g. from a GPU run). Runs with IN_TEST unset, like a user would.
"""
import argparse, os, sys
from pathlib import Path
from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell
from nbdev.process import NBProcessor, extract_directives
from nbdev.config import get_config

def run(path, flags=()):
    path = Path(path).resolve()
    skip = set(get_config().tst_flags.split()) - set(flags)
    nb = read_nb(path)
    def _skip(cell):
        if cell.cell_type != "code": return True
        d = extract_directives(cell, remove=False)
        if d.get("eval:", [""])[0].lower() == "false": return True
        if "nbdev_export(" in cell.source: return True
        return bool(skip & set(d))
    kept = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code" and _skip(c)}
    os.environ.pop("IN_TEST", None)
    os.environ.setdefault("TQDM_DISABLE", "1")
    cwd = os.getcwd(); os.chdir(path.parent)
    try:
        sh = CaptureShell(path)
        sh.run_all(nb, exc_stop=True, preproc=_skip)
    finally: os.chdir(cwd)
    for i, outs in kept.items(): nb.cells[i]["outputs"] = outs
    write_nb(nb, path)
    print(f"executed {path.name}")

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("notebooks", nargs="+")
    ap.add_argument("--flags", nargs="*", default=[])
    a = ap.parse_args()
    for p in a.notebooks: run(p, a.flags)
