"""`maisi_train_vae` as a subprocess: early, clear failures; a run, a refused re-run, and --resume."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch

ENTRY = "import sys; from maisi_nb.vae import train_vae_cli; sys.exit(train_vae_cli())"
TINY = ["network=\"tiny\"", "patch_size=[16,16,16]", "val_sliding_window_patch_size=[32,32,32]", "spacing_type=original",
        "lr=0.002", "lr_warmup=[[0,1.0]]", "disc_channels=8", "disc_num_layers=2", "perceptual_network=none",
        "perceptual_weight=0", "adv_weight=0.01", "steps_per_epoch=2", "val_interval=1", "cache=1.0"]

def cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-c", ENTRY, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from maisi_nb.phantoms import make_phantom_dataset
    d = tmp_path_factory.mktemp("vae_cli")
    return d, make_phantom_dataset(d / "data", n=4, output_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), folds=4)

@pytest.mark.parametrize("args, message", [
    (["--set", "kl_weigth=1e-7"], "unknown key 'kl_weigth' (did you mean 'kl_weight'?)"),
    (["--set", "recon_loss=l3"], "recon_loss: got 'l3'; allowed: 'l1', 'l2'"),
    (["--set", "patch_size=[30,32,32]"], "patch_size: got [30, 32, 32]; allowed: 3 integers, multiples of 4"),
    (["-c", "missing.json"], "config: no such file"),
    ([], "json_data_list: no datalist given"),
])
def test_bad_input_fails_early(data, args, message):
    r = cli(*args, cwd=data[0])
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr, r.stderr

def test_missing_perceptual_weights_is_an_error_not_a_download(data):
    d, dl = data
    r = cli("--datalist", dl, "--model_dir", d / "m_perc", "--tfevent_path", d / "t_perc", "--set", *TINY,
            "perceptual_network=squeeze", "perceptual_weight=0.3", "n_epochs=1", cwd=d)
    assert r.returncode == 2 and "squeeze" in r.stderr, r.stderr
    assert not (d / "m_perc/autoencoder.pt").exists()

def test_train_refuse_resume(data):
    d, dl = data
    base = ["--datalist", dl, "--model_dir", d / "models", "--tfevent_path", d / "logs", "--device", "cpu", "--set", *TINY]
    r = cli(*base, "n_epochs=2", "--until_epoch", "1", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "perceptual network: none" in r.stderr  # the log says which perceptual network is used
    for f in ("autoencoder.pt", "discriminator.pt", "autoencoder_epoch0.pt", "autoencoder_train_state.pt"):
        assert (d / "models" / f).is_file(), f
    for f in ("autoencoder_metrics.jsonl", "autoencoder_loss.png", "autoencoder_reconstruction.png"): assert (d / "models" / f).is_file(), f
    first = torch.load(d / "models/autoencoder.pt", weights_only=True)

    r = cli(*base, "n_epochs=2", cwd=d)  # same model_dir without --resume: refused, nothing touched
    assert r.returncode == 2 and "already holds a training run" in r.stderr, r.stderr
    assert all(torch.equal(first[k], v) for k, v in torch.load(d / "models/autoencoder.pt", weights_only=True).items())

    r = cli(*base, "n_epochs=2", "--resume", cwd=d)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = [json.loads(l) for l in (d / "models/autoencoder_metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2]
    state = torch.load(d / "models/autoencoder_train_state.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["records"]) == 2
