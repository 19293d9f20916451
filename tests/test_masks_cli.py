"""`maisi_build_mask_db` (maisi_nb.masks.build_mask_db_cli) as a user runs it: a subprocess on a folder of NIfTI masks."""
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from maisi_nb.utils import save_nifti, affine_from_spacing, load_nifti
from maisi_nb.masks import build_mask_db_cli, find_masks

ROOT = Path(__file__).resolve().parents[1]

class Result:
    def __init__(self, returncode, out, err): self.returncode, self.stdout, self.stderr = returncode, out, err

def call_cli(capsys, *args):
    "The entry function in this process (quicker than a subprocess for the error paths)."
    try: rc = build_mask_db_cli([str(a) for a in args])
    except SystemExit as e: rc = e.code
    cap = capsys.readouterr()
    return Result(rc, cap.out, cap.err)

def run_cli(*args):
    "The command in a fresh interpreter, as a user runs it."
    code = "import sys; from maisi_nb.masks import build_mask_db_cli; sys.exit(build_mask_db_cli(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300)

def trunk(shape=(24, 24, 24), liver=True, lungs=True):
    "A tiny MAISI mask: body with liver and/or a lung lobe and a vertebra."
    g = np.ogrid[tuple(slice(0, s) for s in shape)]
    ell = lambda c, r: sum(((x - cc) / rr) ** 2 for x, cc, rr in zip(g, c, r)) <= 1
    m = np.zeros(shape, np.uint8)
    m[ell((12, 12, 12), (10, 9, 40))] = 200
    if liver: m[ell((8, 12, 9), (4, 4, 3))] = 1
    if lungs: m[ell((12, 12, 18), (5, 4, 3))] = 30
    m[ell((12, 19, 12), (2, 2, 40))] = 40
    return m

@pytest.fixture()
def mask_dir(tmp_path):
    d = tmp_path / "masks"
    save_nifti(trunk(), affine_from_spacing((1.5, 1.5, 1.5)), d / "chest_abd.nii.gz")
    save_nifti(trunk(lungs=False), np.diag([-2.0, 2.0, 2.0, 1.0]), d / "sub" / "abd.nii.gz")   # flipped x axis
    save_nifti(trunk(liver=False, lungs=False), np.eye(4), d / "spine_only.nii.gz")             # no region indicator
    return d

def test_cli_indexes_and_reports(mask_dir, tmp_path):
    out = tmp_path / "db.json"
    r = run_cli(mask_dir, out)
    assert r.returncode == 0, r.stderr
    assert "indexed 2 masks" in r.stdout and "spine_only.nii.gz" in r.stdout and "indicator" in r.stdout
    recs = json.loads(out.read_text())
    by_name = {x["pseudo_label_filename"]: x for x in recs}
    assert set(by_name) == {"chest_abd.nii.gz", "sub/abd.nii.gz"}
    assert by_name["sub/abd.nii.gz"]["spacing"] == [2.0, 2.0, 2.0]          # column norms, not the signed diagonal
    assert by_name["chest_abd.nii.gz"]["top_region_index"] == [0, 1, 0, 0]
    assert by_name["chest_abd.nii.gz"]["bottom_region_index"] == [0, 0, 1, 0]
    assert by_name["chest_abd.nii.gz"]["label_list"] == [1, 30, 40, 200]
    # the written database works for retrieval
    hits = find_masks(["abdomen"], ["liver"], 1.5, (24, 24, 24), out, mask_dir)
    assert [Path(h["pseudo_label"]).name for h in hits] == ["chest_abd.nii.gz"]

def test_cli_refuses_to_overwrite(mask_dir, tmp_path, capsys):
    out = tmp_path / "db.json"
    out.write_text("[]")
    r = call_cli(capsys, mask_dir, out)
    assert r.returncode == 2 and "overwrite" in r.stderr
    assert out.read_text() == "[]"                                          # untouched
    assert call_cli(capsys, mask_dir, out, "--overwrite").returncode == 0
    assert len(json.loads(out.read_text())) == 2

def test_cli_errors_are_clear(tmp_path, capsys):
    r = call_cli(capsys, tmp_path / "nowhere", tmp_path / "db.json")
    assert r.returncode == 2 and "is not a folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = call_cli(capsys, tmp_path / "empty", tmp_path / "db.json")
    assert r.returncode == 2 and "no .nii" in r.stderr
    with pytest.raises(SystemExit): build_mask_db_cli(["--help"])
    (tmp_path / "m").mkdir(); (tmp_path / "m" / "a.nii.gz").write_text("not a nifti")
    r = call_cli(capsys, tmp_path / "m", tmp_path / "m")                      # the database path is a folder
    assert r.returncode == 2 and "out_json" in r.stderr and "is a folder" in r.stderr
    (tmp_path / "names.json").write_text("{not json")
    r = call_cli(capsys, tmp_path / "m", tmp_path / "db.json", "--names", tmp_path / "names.json", "--out-mask-dir", tmp_path / "o")
    assert r.returncode == 2 and "names.json is not valid JSON" in r.stderr and len(r.stderr.splitlines()) == 1

def test_cli_totalsegmentator_names(tmp_path, capsys):
    src = tmp_path / "ts"
    m = np.zeros((20, 20, 20), np.int16)
    m[3:9, 3:9, 3:9] = 5; m[11:17, 11:17, 11:17] = 2; m[3:9, 11:17, 5:12] = 9
    save_nifti(m, np.eye(4), src / "case.nii.gz")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"5": "liver", "2": "kidney_right", "9": "spleen"}))
    r = call_cli(capsys, src, tmp_path / "db.json", "--names", names)
    assert r.returncode == 2 and "out_mask_dir" in r.stderr
    r = run_cli(src, tmp_path / "db.json", "--names", names, "--out-mask-dir", tmp_path / "maisi", "--add-body")
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "db.json").read_text())[0]
    assert rec["label_list"] == [1, 3, 5, 200]
    arr, _ = load_nifti(tmp_path / "maisi" / "case.nii.gz")
    assert sorted(np.unique(arr).tolist()) == [0, 1, 3, 5, 200]

def test_cli_no_usable_mask_exits_1(tmp_path, capsys):
    d = tmp_path / "m"
    save_nifti(trunk(liver=False, lungs=False), np.eye(4), d / "spine.nii.gz")
    r = call_cli(capsys, d, tmp_path / "db.json")
    assert r.returncode == 1 and "indexed 0 masks" in r.stdout
