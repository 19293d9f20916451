"""The phantom command line: `make_phantoms_cli` in-process and `python -m maisi_nb.phantoms` as a subprocess."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from maisi_nb.labels import LABELS
from maisi_nb.phantoms import make_phantoms_cli
from maisi_nb.utils import load_nifti, spacing_from_affine

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n", "2", "--size", "16", "16", "16", "--spacing", "10", "10", "10"]

def _check_dataset(out: Path, n: int, spacing=(10., 10., 10.)):
    recs = json.loads((out / "datalist.json").read_text())["training"]
    assert len(recs) == n
    for i, r in enumerate(recs):
        assert r["image"] == f"imagesTr/p{i:04d}.nii.gz" and r["label"] == f"labelsTr/p{i:04d}.nii.gz"
        assert r["fold"] == i % 5 and r["dim"] == [16, 16, 16] and r["spacing"] == list(spacing)
        assert sorted(r["top_region_index"]) == [0, 0, 0, 1] and sorted(r["bottom_region_index"]) == [0, 0, 0, 1]
        img, aff = load_nifti(out / r["image"])
        lab, laff = load_nifti(out / r["label"])
        assert img.dtype == np.int16 and lab.dtype == np.uint8 and img.shape == lab.shape == (16, 16, 16)
        np.testing.assert_allclose(aff, laff)
        np.testing.assert_allclose(spacing_from_affine(aff), spacing, atol=1e-5)
        assert set(np.unique(lab).tolist()) <= set(LABELS) | {0} and 200 in np.unique(lab)
        assert img.min() >= -1024 and (img[lab == 0] == -1000).all()
    return recs

def test_cli_in_process(tmp_path, capsys):
    out = tmp_path / "ds"
    make_phantoms_cli(["--out", str(out), *TINY, "--regions", "chest", "abdomen,lower", "--tumor-prob", "1", "--seed", "3"])
    assert "wrote 2 phantoms" in capsys.readouterr().out
    _check_dataset(out, 2)

def test_cli_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b): make_phantoms_cli(["--out", str(out), *TINY, "--seed", "11", "--tumor-prob", "0.5"])
    assert (a / "datalist.json").read_text() == (b / "datalist.json").read_text()
    for i in range(2):
        np.testing.assert_array_equal(load_nifti(a / f"imagesTr/p{i:04d}.nii.gz")[0], load_nifti(b / f"imagesTr/p{i:04d}.nii.gz")[0])

def test_cli_refuses_existing_outputs(tmp_path, capsys):
    out = tmp_path / "ds"
    make_phantoms_cli(["--out", str(out), *TINY])
    before = (out / "imagesTr/p0000.nii.gz").read_bytes()
    with pytest.raises(SystemExit) as e: make_phantoms_cli(["--out", str(out), *TINY, "--seed", "1"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "imagesTr/p0000.nii.gz").read_bytes() == before  # untouched
    make_phantoms_cli(["--out", str(out), *TINY, "--seed", "1", "--overwrite"])
    assert (out / "imagesTr/p0000.nii.gz").read_bytes() != before

@pytest.mark.parametrize("args,msg", [
    (["--size", "16", "16", "0"], "--size: expected 3 positive integers"),
    (["--spacing", "4", "-4", "4"], "--spacing: expected 3 positive numbers"),
    (["--regions", "head,abdomen"], "--regions: regions must be contiguous"),
    (["--regions", "arm"], "--regions: unknown body region 'arm'"),
    (["--n", "0"], "--n: expected a positive integer"),
    (["--tumor-prob", "1.5"], "--tumor-prob: expected a number in [0, 1]"),
    (["--seed", "-2"], "--seed: expected a non-negative integer"),
    (["--workers", "0"], "--workers: expected a positive integer"),
    (["--size", "16", "16"], "--size: expected 3 argument"),
    (["--out", "datalist.json"], "--out: .*is a file, not a folder"),
])
def test_cli_bad_values_fail_before_work(tmp_path, capsys, args, msg):
    import re
    out = tmp_path / "ds"
    (tmp_path / "datalist.json").write_text("{}")
    args = [str(tmp_path / a) if a == "datalist.json" else a for a in args]
    with pytest.raises(SystemExit) as e: make_phantoms_cli(["--out", str(out), *TINY, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(msg) if "*" not in msg else msg, err) and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing written

def test_python_dash_m(tmp_path):
    out = tmp_path / "sub"
    r = subprocess.run([sys.executable, "-m", "maisi_nb.phantoms", "--out", str(out), *TINY, "--regions", "head",
                        "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = _check_dataset(out, 2)
    assert all(r["top_region_index"] == [1, 0, 0, 0] for r in recs)
    bad = subprocess.run([sys.executable, "-m", "maisi_nb.phantoms", "--out", str(tmp_path / "x"), "--spacing", "1", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--spacing" in bad.stderr and not (tmp_path / "x").exists()

def test_cli_float32_images(tmp_path):
    out = tmp_path / "ds"
    make_phantoms_cli(["--out", str(out), *TINY, "--image-dtype", "float32"])
    img, _ = load_nifti(out / "imagesTr/p0001.nii.gz")
    assert img.dtype == np.float32 and not np.allclose(img, np.round(img))  # not rounded
