"""Shared helpers for the pytest suite."""
import os, signal, subprocess, sys, tempfile, time

def run_torchrun(script, *args, nproc=2, timeout=300, cwd=None, env=None):
    """Run `script` under `torch.distributed.run` on CPU ranks; return a CompletedProcess.

    Output goes through temporary files, not pipes, and on a timeout torchrun gets SIGTERM first (it then stops
    its workers, which run in their own sessions), then SIGKILL: a hung rank can never hang the test run.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, start_new_session=True)
        timed_out = False
        try: p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.send_signal(signal.SIGTERM)
            try: p.wait(timeout=30)
            except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait()
            subprocess.run(["pkill", "-KILL", "-f", str(script)], check=False)
        out.seek(0); err.seek(0)
        r = subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())
    if timed_out: r.stderr += f"\n[run_torchrun] stopped after {timeout} s"
    return r

def run_ranks(tmp_path, worker_src, cwd=None, timeout=300):
    "Run a 2-rank worker script in `tmp_path`; check it succeeded; return each rank's saved weights and JSON record."
    import json, torch
    (tmp_path / "worker.py").write_text(worker_src)
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    r = run_torchrun(tmp_path / "worker.py", tmp_path, cwd=cwd, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    weights = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    records = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert records[0]["world"] == records[1]["world"] == 2
    for k in weights[0]: assert torch.equal(weights[0][k], weights[1][k]), f"ranks differ in {k}"
    return weights, records

def tiny_training_data(d):
    """In folder `d`: 4 phantoms (32³ at 4 mm, fold 0 held out) with their datalist, released-layout checkpoints of
    the tiny autoencoder, diffusion UNet and ControlNet, the latents and a ControlNet datalist. Returns their paths."""
    import torch
    from maisi_nb.phantoms import make_phantom_dataset
    from maisi_nb.networks import build_networks, save_checkpoint
    from maisi_nb.diffusion import make_latents
    from maisi_nb.controlnet import make_controlnet_datalist
    torch.set_num_threads(1)
    dl = make_phantom_dataset(d / "data", n=4, output_size=(32, 32, 32), spacing=(4.0, 4.0, 4.0), folds=4)
    nets = build_networks("tiny", "cpu", which=("autoencoder", "diffusion_unet", "controlnet"), seed=0)
    out = {"dir": d, "datalist": dl,
           "autoencoder": save_checkpoint(nets.autoencoder, d / "autoencoder.pt", "autoencoder"),
           "unet": save_checkpoint(nets.diffusion_unet, d / "unet.pt", "diffusion_unet", scale_factor=torch.tensor(1.0),
                                   epoch=0, loss=0.0, num_train_timesteps=1000),
           "controlnet": save_checkpoint(nets.controlnet, d / "controlnet.pt", "controlnet", epoch=0, loss=0.0)}
    make_latents(nets.autoencoder, dl, d / "data", d / "emb", size_multiple=32, device="cpu")
    out["controlnet_datalist"] = make_controlnet_datalist(dl, d / "data", d / "emb", d / "controlnet_datalist.json")
    return out

import pytest

@pytest.fixture(scope="module")
def one_thread():
    "A shared 2-core machine: one OpenMP thread per test process is much faster than two competing ones."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
