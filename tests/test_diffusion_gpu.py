"""Diffusion training and sampling on CUDA (float16 autocast, gradient scaler); skipped without a GPU."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from maisi_nb.diffusion import latent_records, make_latents, sample_latents, train_diffusion
from maisi_nb.networks import build_networks
from maisi_nb.phantoms import make_phantom_dataset
from maisi_nb.utils import make_generator, randn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def write_latents(root:Path, n:int=4, regions:bool=True):
    import nibabel as nib
    rng = np.random.default_rng(0)
    (root / "embeddings").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        emb = root / "embeddings" / f"ct{i}_emb.nii.gz"
        z = rng.normal(size=(16, 16, 8, 4)).cumsum(0).cumsum(1) / 8   # smooth, not white: something to learn
        nib.save(nib.Nifti1Image(z.astype(np.float32), np.eye(4)), str(emb))
        side = {"dim": [16, 16, 8], "spacing": [1.5, 1.5, 2.0]}
        if regions: side |= {"top_region_index": [0, 1, 0, 0], "bottom_region_index": [0, 0, 1, 0]}
        Path(f"{emb}.json").write_text(json.dumps(side))
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": f"ct{i}.nii.gz"} for i in range(n)]}))
    return latent_records(root / "dataset.json", root / "embeddings")

@pytest.mark.parametrize("preset", ["tiny", "tiny-ddpm"])
def test_amp_training_lowers_loss(tmp_path, preset):
    recs = write_latents(tmp_path)
    nets = build_networks(preset, "cuda", which=("diffusion_unet", "noise_scheduler"), seed=0)
    h = train_diffusion(nets.diffusion_unet, nets.noise_scheduler, recs, n_epochs=20, lr=2e-3, batch_size=2,
                        ckpt_path=tmp_path / "ck.pt", device="cuda", progress_bar=False)
    assert np.isfinite(h["loss"]).all()
    assert np.mean(h["epoch_loss"][-5:]) < np.mean(h["epoch_loss"][:3]), h["epoch_loss"]
    st = torch.load(tmp_path / "ck_train_state.pt", weights_only=True)
    assert st["stateful"]["scaler"]["scale"] > 0             # the gradient scaler was active
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["epoch"] == 20 and all(v.device.type == "cpu" for v in ck["unet_state_dict"].values())

@pytest.mark.filterwarnings("ignore:DDPM sampling")
@pytest.mark.parametrize("preset", ["tiny", "tiny-ddpm"])
def test_cuda_sampling_contracts(preset):
    nets = build_networks(preset, "cuda", which=("diffusion_unet", "noise_scheduler"), seed=0)
    unet, sch = nets.diffusion_unet, nets.noise_scheduler
    kw = dict(spacing=[1.5, 1.5, 2.0], top_region_index=[0, 1, 0, 0], bottom_region_index=[0, 0, 1, 0],
              num_inference_steps=100 if preset == "tiny-ddpm" else 30, device="cuda", progress_bar=False)
    z2 = sample_latents(unet, sch, (2, 4, 16, 16, 8), seed=5, **kw)
    z5 = sample_latents(unet, sch, (1, 4, 16, 16, 8), seed=5, **kw)
    z6 = sample_latents(unet, sch, (1, 4, 16, 16, 8), seed=6, **kw)
    assert z2.device.type == "cuda" and z2.dtype == torch.float32 and torch.isfinite(z2).all()
    assert torch.equal(z5, sample_latents(unet, sch, (1, 4, 16, 16, 8), seed=5, **kw))       # same seed, same latent
    assert (z2 - torch.cat([z5, z6])).abs().max() < 2e-2 * z5.abs().max()                      # batch of 2 = 2 singles (fp16)
    # the same seed gives the same start on any device, and fp16 CUDA ends close to fp32 CPU
    start = randn((1, 4, 16, 16, 8), make_generator(5))
    cpu = sample_latents(unet.cpu(), sch, (1, 4, 16, 16, 8), seed=5, **(kw | {"device": "cpu", "num_inference_steps": 10}))
    gpu = sample_latents(unet.cuda(), sch, (1, 4, 16, 16, 8), seed=5, **(kw | {"num_inference_steps": 10}))
    assert (gpu.cpu() - cpu).abs().max() < 5e-2 * cpu.abs().max(), (gpu.cpu() - cpu).abs().max()
    g = make_generator(5); assert torch.equal(randn((1, 4, 16, 16, 8), g), start)

def test_make_latents_amp_matches_fp32(tmp_path):
    dl = make_phantom_dataset(tmp_path / "data", 2, output_size=(64, 64, 64), spacing=(6.0, 6.0, 6.0))
    cpu = build_networks("tiny", "cpu", which=("autoencoder",), seed=0).autoencoder
    gpu = build_networks("tiny", "cuda", which=("autoencoder",)).autoencoder   # float16 norms, as MAISI on CUDA
    gpu.load_state_dict(cpu.state_dict())
    a = make_latents(gpu, dl, tmp_path / "data", tmp_path / "gpu", size_multiple=32, device="cuda")
    b = make_latents(cpu, dl, tmp_path / "data", tmp_path / "cpu", size_multiple=32, device="cpu")
    c = make_latents(gpu, dl, tmp_path / "data", tmp_path / "noamp", size_multiple=32, device="cuda", amp=False)
    assert c[0]["dim"] == [16, 16, 16]
    import nibabel as nib
    for ra, rb in zip(a, b):
        za, zb = (np.asarray(nib.load(str(d / ra["image"])).dataobj) for d in (tmp_path / "gpu", tmp_path / "cpu"))
        assert ra["dim"] == rb["dim"] == [16, 16, 16]
        assert np.abs(za - zb).max() < 2e-2 * np.abs(zb).max() + 1e-3
