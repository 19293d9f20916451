"""VAE training under torchrun: 2 CPU ranks (gloo) train a few steps and must end with identical weights."""
from conftest import run_torchrun
import json, os, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

RANK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from maisi_nb.vae import load_vae_train_config, train_vae
    out, overrides = sys.argv[1], json.loads(sys.argv[2])
    trainer = train_vae(load_vae_train_config(overrides=overrides), device="cpu")
    rank = dist.get_rank()
    torch.save({"ae": trainer.autoencoder.state_dict(), "d": trainer.discriminator.state_dict(),
                "world_size": dist.get_world_size(), "n_train": len(trainer.records)}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
""")

def _phantoms(folder):
    from maisi_nb.phantoms import make_phantom_dataset
    return make_phantom_dataset(folder, n=6, output_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), folds=3)

def test_two_rank_gloo_training_keeps_ranks_in_sync(tmp_path):
    datalist = _phantoms(tmp_path / "data")
    overrides = [f"json_data_list={json.dumps(str(datalist))}", f"model_dir={json.dumps(str(tmp_path / 'models'))}",
                 "tfevent_path=null", "network=tiny", "patch_size=[16,16,16]", "val_sliding_window_patch_size=[32,32,32]",
                 "spacing_type=original", "lr=0.002", "lr_warmup=[[0,1.0]]", "disc_channels=8", "disc_num_layers=2",
                 "perceptual_network=none", "perceptual_weight=0", "adv_weight=0.01", "n_epochs=2", "steps_per_epoch=2",
                 "val_interval=1", "cache=1.0"]
    script = tmp_path / "rank.py"; script.write_text(RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    r = run_torchrun(script, tmp_path, json.dumps(overrides), cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    assert r0["world_size"] == 2 and r0["n_train"] == 2
    for part in ("ae", "d"):
        assert list(r0[part]) == list(r1[part])
        for k in r0[part]: assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    saved = torch.load(tmp_path / "models/autoencoder.pt", weights_only=True)  # written by rank 0 only
    assert all(torch.equal(saved[k], r0["ae"][k]) for k in saved)
    from maisi_nb.vae import build_vae_networks
    init = build_vae_networks("tiny", seed=0)[0].state_dict()
    assert any(not torch.equal(init[k], r0["ae"][k]) for k in init), "weights did not change: no training happened"
    state = torch.load(tmp_path / "models/autoencoder_train_state.pt", weights_only=True)
    assert state["epoch"] == 2 and "val_psnr" in state["records"][-1]
