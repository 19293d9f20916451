"""Diffusion training under `torchrun` with two CPU processes (gloo): both ranks must end with identical weights."""
from conftest import run_ranks
import json, os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from pathlib import Path
    from maisi_nb.diffusion import latent_records, train_diffusion
    from maisi_nb.networks import build_networks
    from maisi_nb.training import setup_distributed
    out = Path(sys.argv[1])
    rank, world, device = setup_distributed("cpu")
    nets = build_networks("tiny", "cpu", which=("diffusion_unet", "noise_scheduler"), seed=rank)  # different inits on purpose
    recs = latent_records(out / "dataset.json", out / "embeddings")
    hist = train_diffusion(nets.diffusion_unet, nets.noise_scheduler, recs, n_epochs=2, lr=1e-3, batch_size=1,
                           ckpt_path=out / "models" / "diff_unet_ckpt.pt", seed=0, device=device)
    torch.save(nets.diffusion_unet.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "n_iter": len(hist["loss"]), **{k: hist[k] for k in ("loss", "epoch_loss", "scale_factor")}}))
    dist.destroy_process_group()
""")

def write_latents(root:Path, n:int=4):
    "n random latents (8³, channels last) with side-car JSON, and a datalist naming their images."
    import nibabel as nib
    rng = np.random.default_rng(0)
    (root / "embeddings").mkdir(parents=True)
    for i in range(n):
        emb = root / "embeddings" / f"ct{i}_emb.nii.gz"
        nib.save(nib.Nifti1Image((rng.normal(size=(8, 8, 8, 4)) * (i + 1)).astype(np.float32), np.eye(4)), str(emb))
        Path(f"{emb}.json").write_text(json.dumps({"dim": [8, 8, 8], "spacing": [1.5, 1.5, 2.0 + i]}))
    (root / "dataset.json").write_text(json.dumps({"training": [{"image": f"ct{i}.nii.gz"} for i in range(n)]}))

def test_two_rank_training_gives_identical_weights(tmp_path):
    write_latents(tmp_path)
    (w0, w1), (h0, h1) = run_ranks(tmp_path, WORKER, cwd=ROOT)   # also checks both ranks hold identical weights
    assert h0["n_iter"] == h1["n_iter"] == 4   # 4 latents / 2 ranks / batch 1, 2 epochs
    assert h0["loss"] != h1["loss"]            # each rank saw its own share of the data ...
    assert h0["epoch_loss"] == h1["epoch_loss"] and h0["scale_factor"] == h1["scale_factor"]  # ... averaged over ranks
    ck = torch.load(tmp_path / "models" / "diff_unet_ckpt.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["scale_factor"].ndim == 0
    assert abs(ck["scale_factor"].item() - h0["scale_factor"]) < 1e-6 and abs(ck["loss"] - h0["epoch_loss"][-1]) < 1e-6
    for k in w0: assert torch.equal(ck["unet_state_dict"][k], w0[k])
    init = __import__("maisi_nb.networks", fromlist=["x"]).build_networks("tiny", "cpu", which=("diffusion_unet",), seed=0).diffusion_unet.state_dict()
    assert any(not torch.equal(init[k], w0[k]) for k in w0)   # training changed the weights
