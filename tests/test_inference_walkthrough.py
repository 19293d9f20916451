"""The pieces 04_inference's walk-through relies on: the per-step callback's clean-latent estimate (`denoised`),
the overlay opacity of previews, and rewriting files that a run legitimately replaces (overwrite, resume, manifests,
a saved model written again). Tiny untrained networks on a 32³ grid: seconds on a CPU."""
import json, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from maisi_nb.inference import (MaisiPipeline, render_slices, recording_denoised, write_manifest, read_manifest,
                                OVERLAY_ALPHA)
from maisi_nb.masks import build_mask_db
from maisi_nb.phantoms import make_phantom
from maisi_nb.sampling import make_scheduler
from maisi_nb.utils import save_nifti

KW = dict(output_size=[32] * 3, spacing=[12.] * 3, body_region=["chest", "abdomen"], num_inference_steps=3, seed=0,
          max_attempts=1, progress_bar=False)

@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return MaisiPipeline.from_preset("tiny", "cpu", seed=0)

def record(pipe, **kw):
    steps = []
    def keep(e):
        if e["stage"] == "image": steps.append({**e, "latents": e["latents"].clone()})
    plan = pipe.prepare({k: v for k, v in (KW | kw).items() if k not in ("seed", "max_attempts", "progress_bar", "scheduler")},
                        seed=0, max_attempts=1, scheduler=kw.get("scheduler"))
    res = pipe.run(plan, callback=keep, progress_bar=False)
    return steps, plan, res

def test_callback_gets_the_rflow_estimate_of_the_clean_latent(tiny):
    steps, plan, res = record(tiny)
    assert [e["step"] for e in steps] == [0, 1, 2] and all(e["num_steps"] == 3 for e in steps)
    assert all(e["denoised"] is not None and e["denoised"].shape == e["latents"].shape for e in steps)
    # the last step goes to t = 0, where the step's result is its own estimate
    torch.testing.assert_close(steps[-1]["denoised"], steps[-1]["latents"])
    # x̂0 = x_t + v t / T with v = (x_t' - x_t) T / (t - t'): recompute step 2's estimate from steps 1 and 2
    t, t_next = steps[1]["timestep"], steps[2]["timestep"]
    x_t, x_next = steps[0]["latents"], steps[1]["latents"]
    torch.testing.assert_close(steps[1]["denoised"], x_t + (x_next - x_t) * t / (t - t_next), rtol=1e-4, atol=1e-4)
    assert "step" not in vars(plan.scheduler)   # the scheduler's own step again
    # observing does not change the result
    torch.testing.assert_close(torch.from_numpy(res.images[0]), torch.from_numpy(tiny(**KW).images[0]))

def test_ddpm_steps_give_no_estimate(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # DDPM with few steps, on rectified-flow weights
        steps, plan, _ = record(tiny, scheduler="ddpm")
    assert steps and all(e["denoised"] is None for e in steps)

def test_recording_denoised_restores_an_instance_step():
    s = make_scheduler("rflow")
    own = lambda *a, **k: (a[2], a[2])
    vars(s)["step"] = own
    rec = {}
    with recording_denoised(s, rec):
        x = torch.ones(1)
        s.step(torch.zeros(1), 1000, x)
    assert rec["denoised"] is x and vars(s)["step"] is own

def test_render_slices_overlay_opacity():
    ph = make_phantom((32, 32, 32), (12.,) * 3, seed=0)
    img = np.where(ph.label > 0, 40., -1000.).astype(np.float32)
    plain = render_slices(img, ph.label, (12.,) * 3, overlay=False)
    assert render_slices(img, ph.label, (12.,) * 3, alpha=0.0) == plain
    assert len({plain, render_slices(img, ph.label, (12.,) * 3), render_slices(img, ph.label, (12.,) * 3, alpha=1.0)}) == 3
    assert 0 < OVERLAY_ALPHA < 0.4   # lower than show_ct's default: the CT stays visible

def test_show_passes_alpha_and_title(tiny):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res = tiny(**KW)
    axs = res.show(0, window="bone", alpha=0.5)
    assert "bone window" in axs[0].figure._suptitle.get_text()
    assert axs[0].get_images()[1].get_alpha() == 0.5
    axs = res.show(0, title="mine"); assert axs[0].figure._suptitle.get_text() == "mine"
    plt.close("all")

def test_rewrites_that_are_allowed(tiny, tmp_path):
    out = tmp_path / "out"
    r1 = tiny(output_dir=out, **KW)
    with pytest.raises(FileExistsError): tiny(output_dir=out, **KW)
    r2 = tiny(output_dir=out, overwrite=True, **KW)   # every file replaced, the preview included
    assert r2.samples[0].files["preview"].read_bytes() == r1.samples[0].files["preview"].read_bytes()
    r1.save(out, overwrite=True)
    # an interrupted sample (files but no sidecar) is made again on resume, its old files replaced
    (out / "sample_seed0_000.json").unlink()
    r3 = tiny(output_dir=out, resume=True, **KW)
    assert not r3.samples[0].resumed and (out / "sample_seed0_000.json").is_file()
    # manifests are rewritten after every sample
    write_manifest(tmp_path / "m.jsonl", [{"index": 0}]); write_manifest(tmp_path / "m.jsonl", [{"index": 1}])
    assert read_manifest(tmp_path / "m.jsonl") == [{"index": 1}]

def test_save_pretrained_again_with_a_mask_database(tiny, tmp_path):
    masks = tmp_path / "masks"
    ph = make_phantom((32, 32, 32), (12.,) * 3, seed=0)
    save_nifti(ph.label, ph.affine, masks / "m0.nii.gz")
    build_mask_db(masks, tmp_path / "db.json")
    pipe = MaisiPipeline(tiny.networks, mask_database=tmp_path / "db.json", mask_dir=masks)
    d = pipe.save_pretrained(tmp_path / "model").parent
    with pytest.raises(FileExistsError): pipe.save_pretrained(d)
    pipe.save_pretrained(d, overwrite=True)
    assert json.loads((d / "pipeline.json").read_text())["mask_database"] == "mask_database.json"
    assert (d / "masks" / "m0.nii.gz").is_file()
