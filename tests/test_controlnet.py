"""The ControlNet command lines: config errors stop before any work, train -> resume -> refuse, infer writes NIfTI."""
import json, re, os, subprocess, sys
os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars would share stderr with the one-line errors checked here
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

def write_run(root:Path, n:int=4) -> dict:
    "Random latents + phantom masks (32³), a ControlNet datalist, tiny UNet/autoencoder checkpoints, and the three configs."
    import nibabel as nib
    from maisi_nb.networks import build_networks, save_checkpoint
    from maisi_nb.phantoms import make_phantom
    rng = np.random.default_rng(0)
    (root / "emb").mkdir(parents=True); (root / "lab").mkdir()
    recs = []
    for i in range(n):
        ph = make_phantom((32, 32, 32), (8., 8., 8.), ("chest", "abdomen"), seed=i)
        nib.save(nib.Nifti1Image(ph.label, ph.affine), str(root / "lab" / f"p{i}.nii.gz"))
        nib.save(nib.Nifti1Image(rng.normal(size=(8, 8, 8, 4)).astype(np.float32), ph.affine), str(root / "emb" / f"p{i}_emb.nii.gz"))
        recs.append({"image": f"emb/p{i}_emb.nii.gz", "label": f"lab/p{i}.nii.gz", "fold": i % 2, "dim": [8, 8, 8],
                     "spacing": [8.0, 8.0, 8.0]})
    (root / "datalist.json").write_text(json.dumps({"training": recs}))
    nets = build_networks("tiny", "cpu", which=("autoencoder", "diffusion_unet"), seed=0)
    save_checkpoint(nets.diffusion_unet, root / "unet.pt", "diffusion_unet", scale_factor=0.7)
    save_checkpoint(nets.autoencoder, root / "ae.pt", "autoencoder")
    env = {"model_dir": str(root / "models"), "output_dir": str(root / "out"), "tfevent_path": str(root / "tfevent"),
           "trained_autoencoder_path": str(root / "ae.pt"), "trained_diffusion_path": str(root / "unet.pt"),
           "trained_controlnet_path": None, "exp_name": "cn_test", "data_base_dir": [str(root)],
           "json_data_list": [str(root / "datalist.json")]}
    train = {"controlnet_train": {"batch_size": 1, "cache_rate": 0.0, "fold": 0, "lr": 1e-4, "n_epochs": 2,
                                  "weighted_loss_label": [129], "weighted_loss": 100},
             "controlnet_infer": {"num_inference_steps": 2, "autoencoder_sliding_window_infer_size": [80, 80, 80],
                                  "autoencoder_sliding_window_infer_overlap": 0.4, "modality": 1}}
    (root / "env.json").write_text(json.dumps(env)); (root / "train.json").write_text(json.dumps(train))
    return {"env": str(root / "env.json"), "train": str(root / "train.json"), "env_dict": env}

@pytest.fixture(scope="module")
def run(tmp_path_factory): return write_run(tmp_path_factory.mktemp("cn"))

def _cli_error(capsys, fn, argv, pattern):
    "The command exits with code 2 and a one-line message matching `pattern` (no traceback)."
    with pytest.raises(SystemExit) as e: fn(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

def test_config_errors_stop_before_any_work(run, tmp_path, capsys):
    from maisi_nb.controlnet import train_controlnet_cli, infer_controlnet_cli
    base = ["-e", run["env"], "-c", "tiny", "-t", run["train"]]
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "n_epoch=3"], "unknown key 'n_epoch'.*did you mean 'n_epochs'")
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "weighted_loss_label=129"], "weighted_loss_label: got 129")
    bad = tmp_path / "train.json"; bad.write_text(json.dumps({"controlnet_train": {"batchsize": 1}}))
    _cli_error(capsys, train_controlnet_cli, ["-e", run["env"], "-c", "tiny", "-t", str(bad)], "unknown key 'batchsize'")
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "trained_diffusion_path=/nope.pt"], "trained_diffusion_path")
    _cli_error(capsys, train_controlnet_cli, base + ["--set", 'json_data_list=["/nope.json"]'], "datalist")
    _cli_error(capsys, infer_controlnet_cli, base, "trained_controlnet_path is required")
    assert not (Path(run["env_dict"]["model_dir"]) / "cn_test_current.pt").exists()

def _epoch_losses(models):
    "Per-epoch training losses from the run's state (what --resume continues from)."
    from maisi_nb.training import load_state
    return [r["train_loss"] for r in load_state(models / "cn_test_train_state.pt")["records"]]

def test_train_resume_refuse_then_infer(run, capsys):
    from maisi_nb.controlnet import train_controlnet_cli, infer_controlnet_cli
    from maisi_nb.networks import build_networks, load_checkpoint
    models = Path(run["env_dict"]["model_dir"])
    base = ["-e", run["env"], "-c", "tiny", "-t", run["train"], "--device", "cpu"]
    assert train_controlnet_cli(base + ["--until_epoch", "1"]) == 0         # upstream flag names
    h1 = _epoch_losses(models)
    assert len(h1) == 1 and torch.load(models / "cn_test_current.pt", weights_only=True)["epoch"] == 1
    assert train_controlnet_cli(["--env_config", run["env"], "--model_def", "tiny", "--model_config", run["train"],
                                 "--device", "cpu", "--resume"]) == 0       # the other tools' flag names
    h2 = _epoch_losses(models)
    assert len(h2) == 2 and h2[0] == h1[0]
    ck = torch.load(models / "cn_test_current.pt", weights_only=True)
    assert sorted(ck) == ["controlnet_state_dict", "epoch", "loss"] and ck["epoch"] == 2
    for f in ("cn_test_best.pt", "cn_test_train_state.pt", "cn_test_loss.png"): assert (models / f).is_file(), f
    assert [json.loads(l)["epoch"] for l in (models / "cn_test_metrics.jsonl").read_text().splitlines()] == [1, 2]
    cn = build_networks("tiny", "cpu", which=("controlnet",)).controlnet
    load_checkpoint(cn, models / "cn_test_best.pt", "controlnet")          # strict load of the released layout
    _cli_error(capsys, train_controlnet_cli, base, "already holds a training run.*--resume")
    capsys.readouterr()
    assert infer_controlnet_cli(base + ["--set", f"trained_controlnet_path={models / 'cn_test_current.pt'}"]) == 0
    out = capsys.readouterr().out
    pairs = [tuple(Path(p) for p in re.match(r"wrote (\S+) and (\S+)", line).groups()) for line in out.splitlines() if line.startswith("wrote")]
    assert len(pairs) == 2                                                    # fold 0: records 0 and 2
    import nibabel as nib
    img, lab = nib.load(str(pairs[0][0])), nib.load(str(pairs[0][1]))
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, nib.load(str(Path(run["env_dict"]["data_base_dir"][0]) / "lab" / "p0.nii.gz")).affine)
    hu = np.asarray(img.dataobj)
    assert hu.min() >= -1000 and hu.max() <= 1000 and (hu[np.asarray(lab.dataobj) == 0] == -1000).all()
    _cli_error(capsys, infer_controlnet_cli, base + ["--set", f"trained_controlnet_path={models / 'cn_test_current.pt'}"], "overwrite")

def test_resume_errors_are_one_line(run, tmp_path, capsys):
    "Same seed, same weights; --resume with nothing to resume, a truncated state, a state or a checkpoint of another network: exit 2, one line."
    from maisi_nb.controlnet import train_controlnet_cli
    from maisi_nb.training import load_state, save_state
    from maisi_nb.networks import build_networks, save_checkpoint
    base = ["-e", run["env"], "-c", "tiny", "-t", run["train"], "--device", "cpu"]
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "exp_name=never", "--resume"], "nothing to resume")
    _cli_error(capsys, train_controlnet_cli, base + ["--resume", "--overwrite"], "exclude each other")
    _cli_error(capsys, train_controlnet_cli, base + ["--until_epoch", "0"], "--until_epoch: got 0")
    models = Path(run["env_dict"]["model_dir"]); models.mkdir(parents=True, exist_ok=True)
    assert train_controlnet_cli(base + ["--set", "exp_name=err", "n_epochs=1"]) == 0
    assert train_controlnet_cli(base + ["--set", "exp_name=err_twin", "n_epochs=1"]) == 0     # same seed, same weights
    a, b = (torch.load(models / f"{n}_current.pt", weights_only=True)["controlnet_state_dict"] for n in ("err", "err_twin"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = models / "err_train_state.pt"; good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "exp_name=err", "n_epochs=1", "--resume"], "not a readable checkpoint")
    state.write_bytes(good); st = load_state(state)
    st["stateful"]["controlnet"] = build_networks("tiny-ddpm", "cpu", which=("controlnet",)).controlnet.state_dict()
    save_state({k: v for k, v in st.items() if k != "format"}, state)
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "exp_name=err", "n_epochs=1", "--resume"],
               "holds a controlnet that does not fit")
    unet = build_networks("tiny", "cpu", which=("diffusion_unet",)).diffusion_unet
    save_checkpoint(unet, tmp_path / "unet.pt", "diffusion_unet")
    _cli_error(capsys, train_controlnet_cli, base + ["--set", "exp_name=err2", f"trained_controlnet_path={tmp_path / 'unet.pt'}"],
               "controlnet_state_dict")
    assert not (models / "err2_current.pt").exists()

def test_entry_points_run_as_processes(run):
    "The installed commands: --help works, a bad value exits 2 with a one-line message before any work."
    import shutil
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    for cmd in ("maisi_train_controlnet", "maisi_infer_controlnet"):
        exe = Path(sys.executable).parent / cmd      # this environment's command (a PATH lookup may find another one)
        exe = str(exe) if exe.is_file() else shutil.which(cmd)
        r = subprocess.run([exe, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--environment-file" in r.stdout and "--set" in r.stdout, r.stderr
        r = subprocess.run([exe, "-e", run["env"], "-c", "tiny", "--set", "fold=-1"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "fold: got -1; allowed: an integer >= 0" in r.stderr and "Traceback" not in r.stderr, r.stderr

def test_expected_hu_reads_nifti_paths(tmp_path):
    "The exported function (not the notebook's namespace) loads NIfTI paths; same result as from arrays."
    from maisi_nb.controlnet import expected_hu
    from maisi_nb.phantoms import make_phantom
    from maisi_nb.utils import save_nifti
    p = make_phantom((32, 32, 32), (12., 12., 12.), ("chest", "abdomen"), seed=0)
    save_nifti(p.image.astype(np.float32), p.affine, tmp_path / "img.nii.gz"); save_nifti(p.label, p.affine, tmp_path / "lab.nii.gz")
    from_files = expected_hu([(tmp_path / "img.nii.gz", str(tmp_path / "lab.nii.gz"))])
    assert from_files and from_files == expected_hu([(p.image.astype(np.float32), p.label)])
