"""Every command's answer to the three checkpoint mistakes: a truncated file, a checkpoint of another network, and
`--resume` with nothing to resume. Each must end with exit status 2 and one line `maisi_xxx: error: ...`, no traceback.

The cases run in one helper process (starting Python and torch once instead of once per case); the commands are
also started once through their installed console scripts, so the entry points themselves are covered.
"""
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest
from conftest import tiny_training_data

BIN = Path(sys.executable).parent
# the two clear messages of `maisi_nb.networks.load_checkpoint`: another layout, or the same layout with other shapes
WRONG = "does not fit|checkpoint is a bare state dict, but|checkpoint is a dict with"

RUNNER = textwrap.dedent("""
    import contextlib, importlib, io, json, sys, traceback
    cases, out = json.loads(open(sys.argv[1]).read()), {}
    for name, (entry, argv) in cases.items():
        module, fn = entry.split(":")
        cli, err = getattr(importlib.import_module(module), fn), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try: rc = cli(argv)
            except SystemExit as e: rc = e.code
            except BaseException: rc = "exception"; err.write(traceback.format_exc())
        out[name] = [rc, err.getvalue()]
    open(sys.argv[2], "w").write(json.dumps(out))
""")

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    "Phantoms with latents, good checkpoints of each tiny network (conftest.tiny_training_data), and truncated copies."
    f = tiny_training_data(tmp_path_factory.mktemp("cli_errors"))
    f["cn_datalist"] = f["controlnet_datalist"]
    for k in ("autoencoder", "unet", "controlnet"):
        t = f["dir"] / f"{k}_truncated.pt"; t.write_bytes(f[k].read_bytes()[: f[k].stat().st_size // 3]); f[f"{k}_truncated"] = t
    return f

def _json(path, obj):
    Path(path).write_text(json.dumps(obj)); return str(path)

def cases(f) -> dict:
    "name -> (entry point, argv, expected message fragment)."
    d, out = f["dir"], {}
    vae = ["--network", "tiny", "--datalist", f["datalist"], "--device", "cpu", "--set", "patch_size=[16,16,16]",
           "val_sliding_window_patch_size=[32,32,32]", "perceptual_network=none", "perceptual_weight=0", "n_epochs=1",
           "disc_channels=8", "disc_num_layers=2"]
    for what, ck, msg in [("truncated", "autoencoder_truncated", "is not a readable checkpoint (truncated or not a torch file)"),
                          ("wrong_network", "unet", WRONG)]:
        out[f"train_vae/{what}"] = ("maisi_nb.vae:train_vae_cli", [*vae[:4], "--model_dir", d / f"vae_{what}", "--finetune", f[ck], *vae[4:]], msg)
    out["train_vae/resume_nothing"] = ("maisi_nb.vae:train_vae_cli", [*vae[:4], "--model_dir", d / "vae_empty", "--resume", *vae[4:]], "nothing to resume")

    def diff_env(name, **kw):
        return _json(d / f"env_{name}.json", {"data_base_dir": str(d / "data"), "embedding_base_dir": str(d / "emb"),
                     "json_data_list": str(f["datalist"]), "model_dir": str(d / f"diff_{name}"),
                     "model_filename": "diff_unet_ckpt.pt", "output_dir": str(d / "pred"),
                     "trained_autoencoder_path": str(f["autoencoder"]), **kw})
    mc = _json(d / "diff_model.json", {"diffusion_unet_train": {"batch_size": 1, "n_epochs": 1, "lr": 1e-3}})
    for what, ck, msg in [("truncated", "autoencoder_truncated", "is not a readable checkpoint"), ("wrong_network", "unet", WRONG)]:
        out[f"make_latents/{what}"] = ("maisi_nb.diffusion:make_latents_cli", ["--env_config", diff_env(f"lat_{what}", embedding_base_dir=str(d / f"emb_{what}"),
                                       trained_autoencoder_path=str(f[ck])), "--model_def", "tiny", "--device", "cpu"], msg)
    for what, ck, msg in [("truncated", "unet_truncated", "is not a readable checkpoint"), ("wrong_network", "autoencoder", WRONG)]:
        out[f"train_diffusion/{what}"] = ("maisi_nb.diffusion:train_diffusion_cli", ["--env_config", diff_env(what, existing_ckpt_filepath=str(f[ck])),
                                          "--model_config", mc, "--model_def", "tiny", "--device", "cpu"], msg)
    out["train_diffusion/resume_nothing"] = ("maisi_nb.diffusion:train_diffusion_cli", ["--env_config", diff_env("empty"), "--model_config", mc,
                                             "--model_def", "tiny", "--device", "cpu", "--resume"], "nothing to resume")

    tc = _json(d / "cn_train.json", {"controlnet_train": {"batch_size": 1, "n_epochs": 1, "lr": 1e-3, "fold": 0}})
    def cn_env(name, **kw):
        return _json(d / f"cn_env_{name}.json", {"model_dir": str(d / f"cn_{name}"), "exp_name": "cn", "output_dir": str(d / f"cn_out_{name}"),
                     "trained_diffusion_path": str(f["unet"]), "trained_autoencoder_path": str(f["autoencoder"]),
                     "data_base_dir": [str(f["cn_datalist"].parent)], "json_data_list": [str(f["cn_datalist"])], **kw})
    for what, ck, msg in [("truncated", "unet_truncated", "is not a readable checkpoint"), ("wrong_network", "controlnet", WRONG)]:
        out[f"train_controlnet/{what}"] = ("maisi_nb.controlnet:train_controlnet_cli", ["-e", cn_env(what, trained_diffusion_path=str(f[ck])),
                                           "-c", "tiny", "-t", tc, "--device", "cpu"], msg)
    out["train_controlnet/resume_nothing"] = ("maisi_nb.controlnet:train_controlnet_cli", ["-e", cn_env("empty"), "-c", "tiny", "-t", tc,
                                              "--device", "cpu", "--resume"], "nothing to resume")
    for what, ck, msg in [("truncated", "controlnet_truncated", "is not a readable checkpoint"), ("wrong_network", "unet", WRONG)]:
        out[f"infer_controlnet/{what}"] = ("maisi_nb.controlnet:infer_controlnet_cli", ["-e", cn_env(f"inf_{what}", trained_controlnet_path=str(f[ck])),
                                           "-c", "tiny", "-t", tc, "--device", "cpu"], msg)

    for what, ck, msg in [("truncated", "autoencoder_truncated", "is not a readable checkpoint"), ("wrong_network", "unet", WRONG)]:
        env = _json(d / f"gen_env_{what}.json", {"trained_autoencoder_path": str(f[ck]), "trained_diffusion_path": str(f["unet"]),
                                                 "trained_controlnet_path": str(f["controlnet"]), "output_dir": str(d / f"gen_{what}")})
        out[f"generate/{what}"] = ("maisi_nb.inference:generate_cli", ["-e", env, "-c", "tiny", "--device", "cpu"], msg)
    for what, ck, msg in [("truncated", "autoencoder_truncated", "is not a readable checkpoint"), ("wrong_network", "unet", "")]:
        out[f"fid/{what}"] = ("maisi_nb.qc:fid_cli", ["--real", d / "data" / "imagesTr", "--synth", d / "data" / "imagesTr", "--network", "radimagenet_resnet50",
                              "--weights", f[ck], "--device", "cpu"], msg)
    return out

def test_checkpoint_mistakes_are_one_line_errors(files):
    cs = cases(files)
    d = files["dir"]
    (d / "runner.py").write_text(RUNNER)
    spec = _json(d / "cases.json", {k: [e, [str(a) for a in argv]] for k, (e, argv, _) in cs.items()})
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    env.pop("MAISI_NB_DEBUG", None)
    r = subprocess.run([sys.executable, d / "runner.py", spec, d / "results.json"], cwd=d, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    res, bad = json.loads((d / "results.json").read_text()), {}
    for name, (entry, argv, msg) in cs.items():
        rc, err = res[name]
        prog = "maisi_" + name.split("/")[0]
        ok = (rc == 2 and "Traceback" not in err and err.count("\n") == 1 and err.startswith(f"{prog}: error: ")
              and any(m in err for m in msg.split("|")))
        if not ok: bad[name] = (rc, err[-600:])
    assert not bad, json.dumps(bad, indent=1)

@pytest.mark.parametrize("script, args, msg", [
    ("maisi_train_vae", ["--resume", "--model_dir", "{d}/nothing_here", "--network", "tiny", "--datalist", "{datalist}"], "nothing to resume"),
    ("maisi_train_diffusion", ["--env_config", "{d}/missing.json", "--model_def", "tiny"], "missing.json"),
    ("maisi_train_controlnet", ["-e", "{d}/missing.json"], "missing.json"),
])
def test_console_scripts(files, script, args, msg):
    exe = BIN / script
    if not exe.exists(): pytest.skip(f"{script} is not installed in this environment")
    argv = [a.format(d=files["dir"], datalist=files["datalist"]) for a in args]
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"{script}: error: ") and msg in r.stderr, r.stderr
