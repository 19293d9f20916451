"""Controllable organ/tumour size and mask retrieval with the bundled demo model, through `maisi_generate` as a user
types it: size requests go through the phantom generator (which honours them) unless a mask generator is asked for,
the demo model's own candidate-mask database answers `--mask-source database`, and `--mask-source generated` attaches
the bundled demo mask generator. Small grids and 2 sampling steps: seconds on a CPU."""
import json
from pathlib import Path
import numpy as np
import pytest
from maisi_nb.inference import generate_cli, demo_model_dir, default_pipeline
from maisi_nb.utils import load_nifti

GRID = ["--output-size", "32", "32", "32", "--spacing", "12", "12", "12", "--num-inference-steps", "2", "--no-preview", "-s", "3"]

pytestmark = pytest.mark.skipif(demo_model_dir() is None, reason="the demo model is not installed")

def run(out: Path, *args) -> tuple:
    assert generate_cli([*GRID, "-o", str(out), *args]) in (0, None)
    side = json.loads(next(out.glob("sample_seed3_000.json")).read_text())
    return side, load_nifti(out / "sample_seed3_000_label.nii.gz")[0]

def test_sizes_go_through_the_phantom_generator(tmp_path, one_thread):
    small, lab_s = run(tmp_path / "small", "--controllable-anatomy-size", "liver=0.1", "hepatic_tumor=0.1")
    large, lab_l = run(tmp_path / "large", "--controllable-anatomy-size", "liver=0.9", "hepatic_tumor=0.9")
    for side in (small, large): assert side["mask"]["source"] == "phantom" and side["config"]["num_inference_steps"] == 2
    assert large["mask"]["organ_scale"]["liver"] > small["mask"]["organ_scale"]["liver"]
    assert large["mask"]["tumors"][0][1] > small["mask"]["tumors"][0][1]   # the hepatic tumour's radius (mm)
    for k in (1, 26): assert (lab_l == k).sum() > (lab_s == k).sum() > 0, k   # liver and hepatic tumour voxels

def test_database_of_the_demo_model(tmp_path, one_thread):
    side, lab = run(tmp_path / "db", "--mask-source", "database", "--body-region", "abdomen", "--anatomy-list", "liver")
    assert side["mask"]["source"] == "database" and (lab == 1).any()
    assert default_pipeline().choose_mask_source() == "phantom"   # retrieval only when asked: phantoms vary more

def test_generated_attaches_the_demo_mask_generator(tmp_path, one_thread):
    side, lab = run(tmp_path / "gen", "--mask-source", "generated", "--controllable-anatomy-size", "liver=0.5",
                    "--mask-generation-num-inference-steps", "4", "--max-attempts", "1")
    assert side["mask"]["source"] == "generated" and lab.shape == (32, 32, 32)

@pytest.mark.parametrize("absent,missing,expect", [
    (True, 26, "none of 3 generated masks holds a hepatic tumor .*rarely draws tumours; use mask_source='phantom'"),
    (True, 10, r"holds a gallbladder \(10\) \(after MAISI's clean-up, before resampling\); use mask_source='phantom'"),
    (False, 26, "missing from 3 generated masks .*larger field of view")])
def test_a_lost_anatomy_is_explained_by_why_it_was_lost(monkeypatch, absent, missing, expect):
    import maisi_nb.inference as inf
    from maisi_nb.masks import AnatomyLostError
    tries = []
    def lose(*a, **k):
        tries.append(1); raise AnatomyLostError("lost", [missing], absent=absent)
    monkeypatch.setattr(inf, "generated_mask_to_sample", lose)
    pipe = default_pipeline(mask_generator=True)
    with pytest.raises(ValueError, match=expect):
        pipe.generate_mask([["liver", 0.8], ["hepatic tumor", 0.5]], [32] * 3, [12.0] * 3, num_inference_steps=2, progress_bar=False)
    assert len(tries) == 3   # redrawn max_tries times before giving up
