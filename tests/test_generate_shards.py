"""Generation at scale: `maisi_generate` split over torchrun ranks or over job-array shards writes exactly the files of
a single-process run (a sample's seed, mask choice and retries depend only on its index), one manifest line per sample,
and `--resume` skips complete samples. Tiny untrained networks on a 32³ grid, two denoising steps."""
from conftest import run_torchrun
import hashlib, json, os, subprocess, sys
from pathlib import Path
import pytest
from maisi_nb.phantoms import make_phantom
from maisi_nb.utils import save_nifti
from maisi_nb.masks import build_mask_db

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from maisi_nb.inference import generate_cli; sys.exit(generate_cli(sys.argv[1:]))"
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
N = 4

def digest(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()

@pytest.fixture(scope="module")
def db(tmp_path_factory):
    "A two-mask database, so that mask choice and retries (spare masks) are part of what must not depend on sharding."
    d = tmp_path_factory.mktemp("db")
    for k, tumors in enumerate([[("hepatic tumor", 30)], []]):
        ph = make_phantom((32, 32, 32), (12., 12., 12.), ("chest", "abdomen"), seed=k, tumors=tumors)
        save_nifti(ph.label, ph.affine, d / "masks" / f"m{k}.nii.gz")
    build_mask_db(d / "masks", d / "db.json")
    return d

def args(db, out, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--mask-database", db / "db.json", "--mask-dir", db / "masks",
            "--body-region", "abdomen", "--output-size", "32", "32", "32", "--spacing", "12", "12", "12",
            "--num-inference-steps", "2", "--max-attempts", "2", "--num-output-samples", str(N), "-s", "5",
            "-o", out, *extra]

def start(*a): return subprocess.Popen([sys.executable, "-c", MAIN, *map(str, a)], cwd=ROOT, env=ENV, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)

def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    return out

def outputs(d:Path) -> dict:
    "{name: sha256} of the sample files (sidecars and manifests hold timings, so they are compared separately)."
    return {p.name: digest(p) for p in sorted(d.iterdir()) if p.name.startswith("sample_") and not p.name.endswith(".json")}

def test_sharded_runs_write_the_files_of_one_process(db, tmp_path):
    one, shards, ranks = tmp_path / "one", tmp_path / "shards", tmp_path / "ranks"
    for d in (one, shards, ranks): d.mkdir()
    p1 = start(*args(db, one))
    ps = [start(*args(db, shards, "--num-shards", 2, "--shard-index", i)) for i in range(2)]   # both at once, one folder
    finish(p1)
    for p in ps: finish(p)
    (tmp_path / "gen.py").write_text(MAIN)
    r = run_torchrun(tmp_path / "gen.py", *args(db, ranks), env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ref = outputs(one)
    assert len(ref) == 3 * N   # image, label, preview per sample
    assert outputs(shards) == ref and outputs(ranks) == ref
    assert "[shard 0 of 2] sample 0:" in r.stdout and "[shard 1 of 2] sample 1:" in r.stdout
    for d, k in ((one, 1), (shards, 2), (ranks, 2)):
        assert sorted(p.name for p in d.glob("manifest*.jsonl")) == ["manifest.jsonl"] + [f"manifest_shard{i}.jsonl" for i in range(k)]
        lines = [json.loads(l) for l in (d / "manifest.jsonl").read_text().splitlines()]
        assert [l["index"] for l in lines] == list(range(N))
        assert [l["shard"] for l in lines] == [i % k for i in range(N)]
        for l in lines:
            assert l["mask_source"] == "database" and l["attempts"] in (1, 2) and set(l["timings_s"]) >= {"sampling", "decode"}
            assert all((d / f).is_file() for f in l["files"].values())
            side = json.loads((d / l["files"]["sidecar"]).read_text())
            assert (side["sample_index"], side["sample_seed"], side["mask"], [a["noise_seed"] for a in side["attempts"]]) == \
                   (l["index"], l["sample_seed"], json.loads((one / l["files"]["sidecar"]).read_text())["mask"],
                    [a["noise_seed"] for a in json.loads((one / l["files"]["sidecar"]).read_text())["attempts"]])

def test_resume_merge_and_errors(db, tmp_path):
    out = tmp_path / "o"; out.mkdir()
    finish(start(*args(db, out, "--num-shards", 2, "--shard-index", 1)))
    assert not (out / "manifest.jsonl").exists()   # shard 0 has not run yet
    r = subprocess.run([sys.executable, "-c", MAIN, *map(str, args(db, out, "--merge-manifests"))], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "2 of 4 samples are not complete yet" in r.stderr, r.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")}
    o = finish(start(*args(db, out, "--resume")))   # one process completes the run: shard 1's samples are kept
    assert o.count("(complete from the interrupted run)") == 2
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())
    assert [json.loads(l)["resumed"] for l in (out / "manifest.jsonl").read_text().splitlines()] == [False, True, False, True]
    r = subprocess.run([sys.executable, "-c", MAIN, *map(str, args(db, out, "--num-shards", 2, "--shard-index", 2))],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "--shard-index: expected an integer in 0..1" in r.stderr, r.stderr
