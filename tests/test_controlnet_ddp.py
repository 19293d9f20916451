"""ControlNet training under `torchrun` with two CPU processes (gloo): both ranks must end with identical weights."""
from conftest import run_ranks
import json, os, socket, subprocess, sys, textwrap
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from pathlib import Path
    from maisi_nb.controlnet import controlnet_records, freeze, train_controlnet
    from maisi_nb.training import setup_distributed
    from maisi_nb.networks import build_networks
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    rank, world, device = setup_distributed("cpu")
    nets = build_networks("tiny", "cpu", which=("diffusion_unet", "noise_scheduler"), seed=0)   # the same frozen UNet
    cn = build_networks("tiny", "cpu", which=("controlnet",), seed=rank).controlnet            # different starts on purpose
    freeze(nets.diffusion_unet)
    recs = controlnet_records(out / "controlnet.json", out)
    hist = train_controlnet(nets.diffusion_unet, cn, nets.noise_scheduler, recs, n_epochs=2, lr=1e-3, batch_size=1,
                            scale_factor=0.5, weighted_loss_label=[129], weighted_loss=10, model_dir=out / "models",
                            exp_name="ddp", seed=0, device=device, progress_bar=False)
    torch.save(cn.state_dict(), out / f"rank{rank}.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"world": world, "n_iter": len(hist["loss"]),
                                                      "loss": hist["loss"], "epoch_loss": hist["epoch_loss"]}))
    dist.destroy_process_group()
""")

def write_records(root:Path, n:int=4):
    "n random latents (8³, channels last) with 32³ labels holding a few ids (129 included), and a ControlNet datalist."
    import nibabel as nib
    rng = np.random.default_rng(0)
    (root / "embeddings").mkdir(parents=True); (root / "labels").mkdir()
    recs = []
    for i in range(n):
        nib.save(nib.Nifti1Image((rng.normal(size=(8, 8, 8, 4)) * (i + 1)).astype(np.float32), np.eye(4)),
                 str(root / "embeddings" / f"ct{i}_emb.nii.gz"))
        lab = rng.choice(np.array([0, 1, 28, 129, 200], np.uint8), size=(32, 32, 32))
        nib.save(nib.Nifti1Image(lab, np.diag([0.25, 0.25, 0.25, 1])), str(root / "labels" / f"ct{i}.nii.gz"))
        recs.append({"image": f"embeddings/ct{i}_emb.nii.gz", "label": f"labels/ct{i}.nii.gz", "fold": 1,
                     "dim": [8, 8, 8], "spacing": [1.0, 1.0, 1.0 + i]})
    (root / "controlnet.json").write_text(json.dumps({"training": recs}))


def test_two_rank_controlnet_training_gives_identical_weights(tmp_path):
    write_records(tmp_path)
    (w0, w1), (h0, h1) = run_ranks(tmp_path, WORKER, cwd=ROOT)   # also checks both ranks hold identical weights
    assert h0["n_iter"] == h1["n_iter"] == 4            # 4 records / 2 ranks / batch 1, 2 epochs
    assert h0["loss"] != h1["loss"]                     # each rank saw its own share of the data ...
    assert h0["epoch_loss"] == h1["epoch_loss"]         # ... and the epoch loss is averaged over ranks
    ck = torch.load(tmp_path / "models" / "ddp_current.pt", weights_only=True)
    assert sorted(ck) == ["controlnet_state_dict", "epoch", "loss"] and ck["epoch"] == 2
    assert abs(ck["loss"].item() - h0["epoch_loss"][-1]) < 1e-6
    for k in w0: assert torch.equal(ck["controlnet_state_dict"][k], w0[k])
    from maisi_nb.networks import build_networks
    start = build_networks("tiny", "cpu", which=("controlnet",), seed=0).controlnet.state_dict()  # rank 0's start, broadcast by DDP
    assert any(not torch.equal(start[k], w0[k]) for k in w0)   # training changed the weights
