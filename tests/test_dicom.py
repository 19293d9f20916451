"""maisi_nb.dicom beyond the notebook: a rerun in a fresh process gives the same bytes, an oblique flipped
affine round-trips through the package, torch input, failures leave nothing behind, DICOM's validator and an
independent reader (where installed) accept the files."""
import hashlib, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pydicom
import pytest
import torch
import nibabel as nib
from maisi_nb import dicom
from maisi_nb.dicom import save_dicom, load_dicom_series, load_dicom_seg, nifti_to_dicom, LPS_FROM_RAS
from maisi_nb.labels import label_name
from maisi_nb.utils import save_nifti


def _volume(shape=(20, 16, 10), seed=0):
    "Whole-number HU with a few MAISI classes (body, liver, a vertebra, a hepatic tumour)."
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1500, size=shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[2:-2, 2:-2, :] = 200
    label[4:10, 4:9, 1:6] = 1
    label[12:15, 10:13, 3:9] = 33
    label[5:7, 5:7, 2:4] = 26
    return image, label


def _oblique_affine():
    "Rotated 30 degrees about y, X flipped (left-handed), anisotropic, non-zero origin."
    t = np.deg2rad(30)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    a = np.eye(4); a[:3, :3] = rot @ np.diag([-0.8, 1.25, 2.5]); a[:3, 3] = [-33.3, 12.5, -140.0]
    return a


def _canonical(arr, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
    return np.asanyarray(img.dataobj), img.affine


def _digests(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*.dcm"))}


def test_oblique_flipped_round_trip(tmp_path):
    image, label = _volume()
    a = _oblique_affine()
    out = save_dicom(torch.from_numpy(image)[None, None], torch.from_numpy(label)[None], a, tmp_path / "case", seed=5)
    hu, hu_aff = load_dicom_series(out)
    want_hu, want_aff = _canonical(image, a)
    np.testing.assert_array_equal(hu, want_hu)  # whole HU with slope 1: exact
    np.testing.assert_allclose(hu_aff, want_aff, atol=1e-9)
    lab, lab_aff = load_dicom_seg(out / "seg.dcm", reference=out)
    np.testing.assert_array_equal(lab, _canonical(label, a)[0])
    np.testing.assert_allclose(lab_aff, want_aff, atol=1e-9)
    # the raw tags follow the affine: first and last slice positions, orientation, spacings
    first, last = pydicom.dcmread(out / "ct" / "0001.dcm"), pydicom.dcmread(out / "ct" / "0010.dcm")
    np.testing.assert_allclose(np.array(first.ImagePositionPatient, float), LPS_FROM_RAS @ a[:3, 3], atol=1e-9)
    np.testing.assert_allclose(np.array(last.ImagePositionPatient, float), LPS_FROM_RAS @ (a[:3, 3] + 9 * a[:3, 2]), atol=1e-9)
    np.testing.assert_allclose(np.array(first.ImageOrientationPatient, float),
                               np.r_[LPS_FROM_RAS @ a[:3, 0] / 0.8, LPS_FROM_RAS @ a[:3, 1] / 1.25], atol=1e-12)
    assert [float(v) for v in first.PixelSpacing] == [1.25, 0.8]
    assert float(first.SliceThickness) == float(first.SpacingBetweenSlices) == 2.5
    seg = pydicom.dcmread(out / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [label_name(i) for i in (1, 26, 33, 200)]
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert (first.PatientName, first.PatientID, first.PatientPosition) == ("SYNTHETIC^MAISI", "MAISI-SYNTH-5", "HFS")


def test_fractional_hu_rounding(tmp_path):
    image, label = _volume()
    image = image + np.float32(0.37)
    hu1, _ = load_dicom_series(save_dicom(image, None, np.eye(4), tmp_path / "slope1"))
    assert np.abs(hu1 - image).max() <= 0.5
    hu01, _ = load_dicom_series(save_dicom(image, None, np.eye(4), tmp_path / "slope01", rescale_slope=0.1))
    assert np.abs(hu01 - image).max() <= 0.05 + 1e-3


def test_rerun_in_fresh_process_is_bitwise_identical(tmp_path):
    image, label = _volume()
    np.save(tmp_path / "image.npy", image); np.save(tmp_path / "label.npy", label); np.save(tmp_path / "affine.npy", _oblique_affine())
    script = textwrap.dedent("""
        import sys, numpy as np
        from maisi_nb.dicom import save_dicom
        d = sys.argv[1]
        save_dicom(np.load(d + '/image.npy'), np.load(d + '/label.npy'), np.load(d + '/affine.npy'), d + '/' + sys.argv[2], seed=11)
    """)
    for name, hashseed in (("a", "1"), ("b", "2")):
        r = subprocess.run([sys.executable, "-c", script, str(tmp_path), name], capture_output=True, text=True,
                           env=dict(os.environ, PYTHONHASHSEED=hashseed, OMP_NUM_THREADS="1"), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert len(_digests(tmp_path / "a")) == 11  # 10 slices + the segmentation


def test_failure_leaves_nothing_and_overwrite(tmp_path, monkeypatch):
    image, label = _volume()
    def boom(*a, **k): raise RuntimeError("disk full")
    monkeypatch.setattr(dicom, "_segmentation", boom)
    with pytest.raises(RuntimeError, match="disk full"): save_dicom(image, label, np.eye(4), tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = save_dicom(image, label, np.eye(4), tmp_path / "x")
    with pytest.raises(FileExistsError, match=r"out_dir: .*x exists and is not empty; pass overwrite=True"):
        save_dicom(image, label, np.eye(4), out)
    save_dicom(image, None, np.eye(4), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ct"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary folders left beside it


@pytest.mark.parametrize("kwargs, match", [
    (dict(label=np.full((20, 16, 10), 140)), r"label: ids \[140\]"),
    (dict(label=np.zeros((20, 16, 9))), "label: shape"),
    (dict(affine=np.array([[1, 0.3, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])), "sheared"),
    (dict(window="lungs"), "window: unknown preset"),
    (dict(uid_prefix="1.2.3"), "uid_prefix"),
    (dict(image_hu=np.full((20, 16, 10), 40000.)), "does not fit 16-bit"),
])
def test_bad_inputs_fail_before_writing(tmp_path, kwargs, match):
    image, label = _volume()
    args = dict(image_hu=image, label=label, affine=np.eye(4)) | kwargs
    with pytest.raises(ValueError, match=match):
        save_dicom(args.pop("image_hu"), args.pop("label"), args.pop("affine"), tmp_path / "x", **args)
    assert list(tmp_path.iterdir()) == []


def test_nifti_to_dicom(tmp_path):
    image, label = _volume()
    a = _oblique_affine()
    save_nifti(image, a, tmp_path / "s_image.nii.gz", dtype=np.float32)
    save_nifti(label, a, tmp_path / "s_label.nii.gz", dtype=np.uint8)
    out = nifti_to_dicom(tmp_path / "s_image.nii.gz", tmp_path / "s_label.nii.gz", tmp_path / "s_dicom", seed=1, window="bone")
    hu, aff = load_dicom_series(out)
    want_hu, want_aff = _canonical(image, a)
    np.testing.assert_array_equal(hu, want_hu)
    np.testing.assert_allclose(aff, want_aff, atol=1e-4)  # NIfTI stores the affine in float32
    np.testing.assert_array_equal(load_dicom_seg(out / "seg.dcm", reference=out)[0], _canonical(label, a)[0])
    assert pydicom.dcmread(out / "ct" / "0001.dcm").WindowCenterWidthExplanation == "BONE"


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed (apt-get install dicom3tools)")
def test_dciodvfy_reports_no_errors(tmp_path):
    image, label = _volume()
    out = save_dicom(image, label, _oblique_affine(), tmp_path / "case", seed=1)
    for f in (out / "ct" / "0001.dcm", out / "ct" / "0010.dcm", out / "seg.dcm"):
        r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
        lines = (r.stdout + r.stderr).splitlines()
        # dicom3tools' 2022 dictionary predates the standard's Synthetic Data attribute (0008,001C)
        errors = [l for l in lines if l.startswith("Error") and "0x001c" not in l]
        assert errors == [], "\n".join(lines)


def test_simpleitk_reads_the_same_geometry(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    image, label = _volume()
    a = _oblique_affine()
    out = save_dicom(image, label, a, tmp_path / "case")
    r = sitk.ImageSeriesReader(); r.SetFileNames(r.GetGDCMSeriesFileNames(str(out / "ct")))
    im = r.Execute()
    got = np.eye(4)
    got[:3, :3] = LPS_FROM_RAS @ np.array(im.GetDirection()).reshape(3, 3) @ np.diag(im.GetSpacing())
    got[:3, 3] = LPS_FROM_RAS @ np.array(im.GetOrigin())
    got_img, got_aff = _canonical(sitk.GetArrayFromImage(im).transpose(2, 1, 0).astype(np.float32), got)
    want_img, want_aff = _canonical(image, a)
    np.testing.assert_array_equal(got_img, want_img)
    np.testing.assert_allclose(got_aff, want_aff, atol=1e-6)
