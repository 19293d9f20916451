"""DICOM output of `maisi_generate` / `GenerationResult.save`: each sample as a CT series and a DICOM Segmentation that
read back equal to the NIfTI files (HU within the rescale rounding, same labels, same geometry)."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from maisi_nb.inference import MaisiPipeline
from maisi_nb.dicom import load_dicom_series, load_dicom_seg
from maisi_nb.utils import load_nifti

ROOT = Path(__file__).resolve().parents[1]
MAIN = "import sys; from maisi_nb.inference import generate_cli; sys.exit(generate_cli(sys.argv[1:]))"
ENV = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
GRID = ["--output-size", "32", "32", "32", "--spacing", "12", "12", "12", "--num-inference-steps", "2", "--max-attempts", "1"]

def check_same(nii_image, nii_label, dicom_dir):
    img, aff = load_nifti(nii_image, np.float32)
    lab, laff = load_nifti(nii_label)
    hu, haff = load_dicom_series(Path(dicom_dir) / "ct")
    seg, saff = load_dicom_seg(Path(dicom_dir) / "seg.dcm", Path(dicom_dir) / "ct")
    assert hu.shape == img.shape and seg.shape == lab.shape
    np.testing.assert_allclose(haff, aff, atol=1e-4); np.testing.assert_allclose(saff, laff, atol=1e-4)
    assert np.abs(hu - np.round(img)).max() <= 0.5 + 1e-3   # whole HU (rescale slope 1)
    assert np.array_equal(seg, lab) and len(np.unique(lab)) > 2

def test_cli_both_formats(tmp_path):
    r = subprocess.run([sys.executable, "-c", MAIN, "--preset", "tiny", "--device", "cpu", "--body-region", "chest", "abdomen",
                        *GRID, "-s", "2", "-o", str(tmp_path), "--output-format", "both"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "sample_seed2_000_dicom" in r.stdout
    check_same(tmp_path / "sample_seed2_000_image.nii.gz", tmp_path / "sample_seed2_000_label.nii.gz", tmp_path / "sample_seed2_000_dicom")
    side = json.loads((tmp_path / "sample_seed2_000.json").read_text())
    assert side["files"]["dicom"] == "sample_seed2_000_dicom"
    r = subprocess.run([sys.executable, "-c", MAIN, "--output-format", "dcm", "-o", str(tmp_path)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--output-format" in r.stderr and "dicom" in r.stderr

def test_api_dicom_only_and_resume(tmp_path):
    torch.set_num_threads(1)
    pipe = MaisiPipeline.from_preset("tiny", "cpu", seed=0)
    kw = dict(output_size=[32] * 3, spacing=[12.] * 3, num_inference_steps=2, max_attempts=1, seed=4, progress_bar=False,
              body_region=["chest", "abdomen"])
    res = pipe(**kw)
    files = res.save(tmp_path / "a", output_format="both")
    check_same(files[0]["image"], files[0]["label"], files[0]["dicom"])
    with pytest.raises(ValueError, match="output_format: expected one of nifti, dicom, both"): res.save(tmp_path / "b", output_format="dcm")
    d = tmp_path / "c"
    r1 = pipe(output_dir=d, output_format="dicom", num_output_samples=2, **kw)
    assert sorted(p.name for p in d.iterdir()) == [f"sample_seed4_00{i}{s}" for i in range(2) for s in (".json", "_dicom", "_preview.png")]
    hu, _ = load_dicom_series(d / "sample_seed4_000_dicom" / "ct")
    assert np.abs(hu - np.round(r1.images[0])).max() <= 0.5 + 1e-3
    (d / "sample_seed4_001.json").unlink()   # as if killed before sample 1 was complete
    r2 = pipe(output_dir=d, output_format="dicom", num_output_samples=2, resume=True, **kw)
    assert [s.resumed for s in r2.samples] == [True, False]
    assert np.array_equal(r2.samples[0].label, r1.samples[0].mask_label)   # read back from the segmentation
