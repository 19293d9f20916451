"""The README's test command, after install: export/clean leave git clean, notebooks run, pytest runs.

Prints one closing line `N passed, N failed` that counts notebooks and pytest tests together.
"""
import os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# one thread per process: nbdev_test runs two notebooks at once on a 2-core machine, and oversubscribed
# OpenMP threads were measured 10-50x slower there
ENV = dict(os.environ, MPLBACKEND="Agg", TQDM_DISABLE="1", PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

def sh(*args, capture=False):
    print("$", " ".join(map(str, args)), flush=True)
    return subprocess.run(list(map(str, args)), cwd=ROOT, env=ENV, text=True,
                          capture_output=capture)

def tree_state():
    "What git sees in the exported package and the notebooks (tracked diff + untracked files)."
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--", "nbs", "maisi_nb"],
                         cwd=ROOT, text=True, capture_output=True).stdout
    diff = subprocess.run(["git", "diff", "--", "nbs", "maisi_nb"], cwd=ROOT, text=True, capture_output=True).stdout
    return out + diff

def check_unchanged(tool):
    before = tree_state()
    r = sh(BIN / tool)
    if r.returncode != 0: sys.exit(f"{tool} failed (exit {r.returncode})")
    after = tree_state()
    if after != before:
        subprocess.run(["git", "status", "--short", "--", "nbs", "maisi_nb"], cwd=ROOT)
        sys.exit(f"{tool} changed files: notebooks and maisi_nb/ are out of step. "
                 f"Run `make export` and commit the result.")
    print(f"{tool}: tree unchanged")

def run_notebooks():
    t0 = time.time()
    r = sh(BIN / "nbdev_test", "--do_print", "--timing", "--n_workers", "2", capture=True)
    sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)
    completed = len(re.findall(r"^- Completed ", r.stdout, flags=re.M))
    failed = 0
    if "Failed On The Following Notebooks" in r.stderr:
        failed = len([l for l in r.stderr.split("=" * 50)[-1].splitlines() if l.strip()])
    if r.returncode != 0 and failed == 0: failed = 1  # crashed before reporting
    print(f"notebooks: {completed - failed} passed, {failed} failed ({time.time() - t0:.0f}s)", flush=True)
    return completed - failed, failed

def run_pytest():
    # two workers (pytest-xdist), one test file each at a time: a file's module fixtures are built once
    try: import xdist; par = ["-n", "2", "--dist", "loadfile"]
    except ImportError: par = []
    r = sh(BIN / "python", "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "-rs", "--durations=12", *par, capture=True)
    sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    count = lambda w: sum(int(n) for n in re.findall(rf"(\d+) {w}", tail))
    passed, failed = count("passed"), count("failed") + count("error")
    if r.returncode not in (0, 5) and failed == 0: failed = 1
    return passed, failed

if __name__ == "__main__":
    check_unchanged("nbdev_export")
    check_unchanged("nbdev_clean")
    nb_pass, nb_fail = run_notebooks()
    py_pass, py_fail = run_pytest()
    passed, failed = nb_pass + py_pass, nb_fail + py_fail
    print(f"notebooks {nb_pass}/{nb_pass + nb_fail}, pytest {py_pass}/{py_pass + py_fail}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or passed == 0 else 0)
