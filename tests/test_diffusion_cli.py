"""`maisi_make_latents` and `maisi_train_diffusion` (maisi_nb.diffusion) as a user runs them, on tiny phantoms."""
import json, subprocess, sys
from pathlib import Path
import pytest
import torch
from maisi_nb.diffusion import make_latents_cli, train_diffusion_cli
from maisi_nb.networks import build_networks, save_checkpoint
from maisi_nb.phantoms import make_phantom_dataset

ROOT = Path(__file__).resolve().parents[1]
ENV = {"OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}

def run_cli(fn:str, *args):
    "The command in a fresh interpreter, as a user runs it."
    import os
    code = f"import sys; from maisi_nb.diffusion import {fn}; sys.exit({fn}(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=dict(os.environ, **ENV))

@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    "In-process command calls print only what a user would see in a log (no tqdm bars on stderr)."
    monkeypatch.setenv("TQDM_DISABLE", "1")

@pytest.fixture(scope="module")
def project(tmp_path_factory):
    "Three phantom CTs, a tiny VAE checkpoint, and MAISI-format environment/config files."
    root = tmp_path_factory.mktemp("diff")
    make_phantom_dataset(root / "data", 3, output_size=(40, 36, 30), spacing=(10.0, 10.0, 12.0))
    vae = build_networks("tiny", "cpu", which=("autoencoder",), seed=0).autoencoder
    save_checkpoint(vae, root / "models" / "autoencoder.pt", "autoencoder")
    env = {"data_base_dir": str(root / "data"), "embedding_base_dir": str(root / "embeddings"),
           "json_data_list": str(root / "data" / "datalist.json"), "model_dir": str(root / "models"),
           "model_filename": "diff_unet_ckpt.pt", "output_dir": str(root / "predictions"), "output_prefix": "unet_3d",
           "trained_autoencoder_path": str(root / "models" / "autoencoder.pt"), "existing_ckpt_filepath": None}
    (root / "env.json").write_text(json.dumps(env))
    (root / "config.json").write_text(json.dumps({"diffusion_unet_train": {"batch_size": 2, "cache_rate": 0, "lr": 1e-3, "n_epochs": 2}}))
    return root

def test_make_latents_then_train(project):
    r = run_cli("make_latents_cli", "--env_config", project / "env.json", "--model_def", "tiny", "--size_multiple", 32, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    lat = json.loads((project / "embeddings" / "dataset_emb.json").read_text())["training"]
    assert [x["image"] for x in lat] == [f"imagesTr/p000{i}_emb.nii.gz" for i in range(3)]
    assert lat[0]["dim"] == [8, 8, 8] and lat[0]["latent"] == "mean" and lat[0]["top_region_index"] == [0, 1, 0, 0]
    side = json.loads((project / "embeddings" / "imagesTr" / "p0000_emb.nii.gz.json").read_text())  # MAISI's side-car
    assert set(side) >= {"dim", "spacing", "top_region_index", "bottom_region_index"}

    args = ["--env_config", project / "env.json", "--model_config", project / "config.json", "--model_def", "tiny", "--device", "cpu"]
    r = run_cli("train_diffusion_cli", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    ck_path = project / "models" / "diff_unet_ckpt.pt"
    ck = torch.load(ck_path, weights_only=True)
    assert sorted(ck) == ["epoch", "loss", "num_train_timesteps", "scale_factor", "unet_state_dict"]
    assert ck["epoch"] == 2 and ck["num_train_timesteps"] == 1000 and ck["scale_factor"].ndim == 0
    assert isinstance(ck["loss"], float)
    unet = build_networks("tiny", "cpu", which=("diffusion_unet",)).diffusion_unet
    unet.load_state_dict(ck["unet_state_dict"], strict=True)           # the released loader's call
    st = torch.load(project / "models" / "diff_unet_ckpt_train_state.pt", weights_only=True)
    assert set(st["stateful"]) == {"unet", "optimizer", "lr_scheduler", "scaler"} and st["epoch"] == 2
    assert st["meta"]["seed"] == 0 and st["meta"]["n_epochs"] == 2 and st["extra"]["scale_factor"] == ck["scale_factor"].item()
    assert len(st["steps"]["loss"]) == 4 and st["steps"]["lr"][0] == 1e-3
    assert len((project / "models" / "diff_unet_ckpt_metrics.jsonl").read_text().splitlines()) == 2
    assert (project / "models" / "diff_unet_ckpt_loss.png").stat().st_size > 1000

    r = run_cli("train_diffusion_cli", *args)                             # never overwrite silently
    assert r.returncode == 2 and "already holds a training run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("train_diffusion_cli", *args, "--resume")                 # finished run: nothing left to do
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(ck_path, weights_only=True)["epoch"] == 2

def test_finetune_keeps_scale_factor_and_ddpm(project, tmp_path):
    "existing_ckpt_filepath starts from a checkpoint's weights and keeps its scale factor (upstream recomputes it)."
    ddpm = build_networks("tiny-ddpm", "cpu", which=("diffusion_unet",), seed=0).diffusion_unet
    save_checkpoint(ddpm, tmp_path / "pre.pt", "diffusion_unet", scale_factor=0.37)
    env = json.loads((project / "env.json").read_text()) | {"existing_ckpt_filepath": str(tmp_path / "pre.pt"),
                                                            "model_dir": str(tmp_path), "model_filename": "ft.pt"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "cfg.json").write_text(json.dumps({"diffusion_unet_train": {"batch_size": 3, "n_epochs": 1}}))
    if not (project / "embeddings" / "dataset_emb.json").exists():
        assert make_latents_cli(["--env_config", str(project / "env.json"), "--model_def", "tiny", "--size_multiple", "32", "--device", "cpu"]) == 0
    assert train_diffusion_cli(["--env_config", str(tmp_path / "env.json"), "--model_config", str(tmp_path / "cfg.json"),
                                "--model_def", "tiny-ddpm", "--device", "cpu"]) == 0
    ck = torch.load(tmp_path / "ft.pt", weights_only=True)
    assert abs(ck["scale_factor"].item() - 0.37) < 1e-6 and ck["epoch"] == 1

@pytest.mark.parametrize("change, message", [
    ({"config": {"diffusion_unet_train": {"n_epoch": 2}}}, "unknown key 'n_epoch' (did you mean 'n_epochs'?)"),
    ({"config": {"diffusion_unet_train": {"lr": -1}}}, "lr: got -1; allowed: a number > 0"),
    ({"set": ["batch_size=0"]}, "batch_size: got 0; allowed: an integer >= 1"),
    ({"set": ["n_epoch=2"]}, "--set: unknown key 'n_epoch' (did you mean 'n_epochs'?)"),
    ({"env": {"tfevent_path": "x"}}, "env_config: unknown key 'tfevent_path'"),
    ({"env": {"json_data_list": "/nonexistent.json"}}, "json_data_list: /nonexistent.json does not exist"),
    ({"env": {"existing_ckpt_filepath": "/nonexistent.pt"}}, "existing_ckpt_filepath: /nonexistent.pt does not exist"),
    ({"model_def": "huge"}, "neither a preset"),
])
def test_bad_input_fails_early(project, tmp_path, capsys, change, message):
    env = json.loads((project / "env.json").read_text()) | change.get("env", {}) | {"model_dir": str(tmp_path)}
    (tmp_path / "env.json").write_text(json.dumps(env))
    (tmp_path / "cfg.json").write_text(json.dumps(change.get("config", {"diffusion_unet_train": {"n_epochs": 1}})))
    (project / "embeddings").mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as e:
        train_diffusion_cli(["--env_config", str(tmp_path / "env.json"), "--model_config", str(tmp_path / "cfg.json"),
                             "--model_def", change.get("model_def", "tiny"), "--device", "cpu", *(["--set", *change["set"]] if "set" in change else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("maisi_train_diffusion: error: ") and len(err.strip().splitlines()) == 1, err

def test_make_latents_missing_autoencoder(project, tmp_path, capsys):
    env = json.loads((project / "env.json").read_text()) | {"trained_autoencoder_path": str(tmp_path / "no_ae.pt")}
    (tmp_path / "env.json").write_text(json.dumps(env))
    with pytest.raises(SystemExit):
        make_latents_cli(["--env_config", str(tmp_path / "env.json"), "--model_def", "tiny", "--device", "cpu"])
    assert "trained_autoencoder_path" in capsys.readouterr().err

def test_make_latents_checks_images_first(project, tmp_path, capsys):
    "A truncated image stops maisi_make_latents with one line naming it, before the autoencoder is loaded."
    data = tmp_path / "data"; (data / "imagesTr").mkdir(parents=True)
    good = project / "data" / "imagesTr" / "p0000.nii.gz"
    (data / "imagesTr" / "a.nii.gz").write_bytes(good.read_bytes())
    (data / "imagesTr" / "b.nii.gz").write_bytes(good.read_bytes()[:200])
    (data / "datalist.json").write_text(json.dumps({"training": [{"image": "imagesTr/a.nii.gz"}, {"image": "imagesTr/b.nii.gz"}]}))
    env = json.loads((project / "env.json").read_text()) | {"data_base_dir": str(data), "json_data_list": str(data / "datalist.json"),
                                                            "embedding_base_dir": str(tmp_path / "emb"),
                                                            "trained_autoencoder_path": str(tmp_path / "no_ae.pt")}
    (tmp_path / "env.json").write_text(json.dumps(env))
    with pytest.raises(SystemExit) as e:
        make_latents_cli(["--env_config", str(tmp_path / "env.json"), "--model_def", "tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 of 2 dataset items failed validation" in err and "b.nii.gz" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "emb").exists()

def test_resume_errors_are_one_line(project, tmp_path, capsys):
    "--resume with nothing to resume, a truncated state, or the state of another network: exit 2, one line, no traceback."
    if not (project / "embeddings" / "dataset_emb.json").exists():
        assert make_latents_cli(["--env_config", str(project / "env.json"), "--model_def", "tiny", "--size_multiple", "32", "--device", "cpu"]) == 0
    env = json.loads((project / "env.json").read_text()) | {"model_dir": str(tmp_path / "run")}
    (tmp_path / "env.json").write_text(json.dumps(env))
    args = ["--env_config", str(tmp_path / "env.json"), "--device", "cpu", "--set", "n_epochs=2", "batch_size=3"]
    def fails(message, model_def="tiny", seed=3):
        with pytest.raises(SystemExit) as e: train_diffusion_cli(args + ["--model_def", model_def, "-s", str(seed), "--resume"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    fails("nothing to resume")
    assert train_diffusion_cli(args + ["--model_def", "tiny", "-s", "3"]) == 0
    fails("holds a unet that does not fit", model_def="tiny-ddpm")          # another network
    fails("seed: resuming a run started with seed 3, got 0", seed=0)        # another seed
    state = tmp_path / "run" / "diff_unet_ckpt_train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])                            # truncated (e.g. a full disk)
    fails("is not a readable checkpoint")
