"""Crash safety of the three trainers: a run killed (SIGKILL) at any instant, then resumed, ends bit for bit where an
uninterrupted run ends, and leaves no stray temporary files.

Each trainer runs through its command (`maisi_train_vae`, `maisi_train_diffusion`, `maisi_train_controlnet`) as a
subprocess on the tiny preset. The fault points come from `maisi_nb.training.fault_point`: in the middle of an epoch
(`step@1:1`), inside the checkpoint write (`state_tmp@1`: the new state written under its temporary name, not yet
renamed), between the state and the released weight files (`state_saved@1`), and between the weight files and the log
(`exported@1`).
"""
import json, os, signal, subprocess, sys
from pathlib import Path
import pytest
import torch
from conftest import tiny_training_data

FAULTS = ["step@1:1", "state_tmp@1", "state_saved@1", "exported@1"]
# every point on the VAE; on the other two trainers, which share the same Trainer code, one point inside the
# checkpoint write and one elsewhere (the suite's time budget)
CASES = [("vae", f) for f in FAULTS] + [("diffusion", "state_tmp@1"), ("diffusion", "exported@1"),
                                          ("controlnet", "state_saved@1"), ("controlnet", "step@1:1")]
N_EPOCHS = 3

def command(entry:str, args, cwd, fault=None):
    "Run `entry` (module:function) with `args` in a fresh process, one thread, optionally with a fault injected."
    module, fn = entry.split(":")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    env.pop("MAISI_NB_FAULT", None)
    if fault: env["MAISI_NB_FAULT"] = fault
    code = f"import sys; from {module} import {fn}; sys.exit({fn}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)

def weights(folder:Path, names) -> dict:
    "Every tensor of the released files `names` in `folder`, keyed by file and parameter."
    out = {}
    for n in names:
        ck = torch.load(folder / n, weights_only=True)
        sd = next((v for k, v in ck.items() if k.endswith("state_dict")), ck) if isinstance(ck, dict) else ck
        out.update({f"{n}:{k}": v for k, v in sd.items()})
    return out

def stray_files(folder:Path) -> list:
    from maisi_nb.training import is_temp_file
    return [p.name for p in folder.rglob(".*") if p.is_file() and is_temp_file(p)]

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Phantoms (+ datalist), tiny checkpoints, their latents and a ControlNet datalist (conftest.tiny_training_data)."
    return tiny_training_data(tmp_path_factory.mktemp("crash"))

def vae_run(data, out:Path):
    return "maisi_nb.vae:train_vae_cli", [
        "--network", "tiny", "--datalist", data["datalist"], "--model_dir", out, "--device", "cpu", "--set",
        "patch_size=[16,16,16]", "val_sliding_window_patch_size=[32,32,32]", "spacing_type=original", "lr=0.002",
        "lr_warmup=[[0,1.0]]", "disc_channels=8", "disc_num_layers=2", "perceptual_network=none", "perceptual_weight=0",
        "adv_weight=0.01", "steps_per_epoch=2", "val_interval=1", "cache=1.0", f"n_epochs={N_EPOCHS}"], \
        ["autoencoder.pt", "discriminator.pt"], "autoencoder"

def diffusion_run(data, out:Path):
    out.mkdir(parents=True, exist_ok=True)
    d = data["dir"]
    env = {"data_base_dir": str(d / "data"), "embedding_base_dir": str(d / "emb"), "json_data_list": str(data["datalist"]),
           "model_dir": str(out), "model_filename": "diff_unet_ckpt.pt", "output_dir": str(out / "pred"),
           "trained_autoencoder_path": str(d / "autoencoder.pt")}
    (out / "env.json").write_text(json.dumps(env))
    (out / "model.json").write_text(json.dumps({"diffusion_unet_train": {"batch_size": 1, "n_epochs": N_EPOCHS, "lr": 1e-3}}))
    return "maisi_nb.diffusion:train_diffusion_cli", [
        "--env_config", out / "env.json", "--model_config", out / "model.json", "--model_def", "tiny", "--device", "cpu",
        "--seed", 3], ["diff_unet_ckpt.pt"], "diff_unet_ckpt"

def controlnet_run(data, out:Path):
    out.mkdir(parents=True, exist_ok=True)
    d = data["dir"]
    env = {"model_dir": str(out), "exp_name": "cn", "trained_diffusion_path": str(d / "unet.pt"),
           "data_base_dir": [str(data["controlnet_datalist"].parent)], "json_data_list": [str(data["controlnet_datalist"])]}
    (out / "env.json").write_text(json.dumps(env))
    (out / "train.json").write_text(json.dumps({"controlnet_train": {"batch_size": 1, "n_epochs": N_EPOCHS, "lr": 1e-3, "fold": 0}}))
    return "maisi_nb.controlnet:train_controlnet_cli", [
        "-e", out / "env.json", "-c", "tiny", "-t", out / "train.json", "--device", "cpu", "--seed", 3], ["cn_current.pt"], "cn"

TRAINERS = {"vae": vae_run, "diffusion": diffusion_run, "controlnet": controlnet_run}

@pytest.fixture(scope="module")
def reference(data):
    "The released weights of one uninterrupted run per trainer (run when a test first asks for it)."
    refs = {}
    def get(name):
        if name not in refs:
            out = data["dir"] / f"ref_{name}"
            entry, args, files, run = TRAINERS[name](data, out)
            r = command(entry, args, data["dir"])
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
            refs[name] = weights(out, files)
        return refs[name]
    return get

@pytest.mark.parametrize("trainer, fault", CASES)
def test_killed_then_resumed_equals_uninterrupted(data, reference, trainer, fault):
    out = data["dir"] / f"{trainer}_{fault.replace('@', '_').replace(':', '_')}"
    entry, args, files, run = TRAINERS[trainer](data, out)
    r = command(entry, args, data["dir"], fault=fault)
    assert r.returncode == -signal.SIGKILL, f"the fault did not fire: rc {r.returncode}\n{r.stderr[-3000:]}"
    r = command(entry, [*args, "--resume"], data["dir"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    got, ref = weights(out, files), reference(trainer)
    assert list(got) == list(ref)
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not differ, f"{len(differ)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert stray_files(out) == []
    epochs = [json.loads(l)["epoch"] for l in (out / f"{run}_metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, N_EPOCHS + 1))
    state = torch.load(out / f"{run}_train_state.pt", weights_only=True)
    assert state["epoch"] == N_EPOCHS
