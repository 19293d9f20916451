"""Autoencoder capacity for the demo model: the same training with 4, 8 or 16 latent channels, side by side.

Each variant is the demo network's autoencoder (MAISI's AutoencoderKlMaisi, 4x downsampling) with `latent_channels`
changed, trained by our `maisi_train_vae` command on the demo recipe's data (phantoms of every body region plus
real-CT crops, the recipe's grid and spacing) with an L1 reconstruction term and a small KL term only. Then the
round trip (encode the mean, decode) on held-out phantoms and the real chest CT (LIDC-IDRI, CC BY 3.0), with the
measures of benchmarks/demo_realism.py, next to the pooling ceiling of benchmarks/latent_ceiling.py (k = 4, the
latent's resolution; k = 2).
Runs resume: a killed run continues where it stopped, a finished one is only measured.

    python benchmarks/demo_autoencoder.py --work-dir WORK [--latent-channels 4 8 16] [--epochs 30] [--threads 2]
"""
import argparse, copy, json, sys, time
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_realism as R
from latent_ceiling import pooled
from maisi_nb.demo import DEMO_RECIPE, holdout_masks, make_demo_data, recipe_network, _vae_run
from maisi_nb.networks import build_networks, load_checkpoint
from maisi_nb.data import load_example_ct
from maisi_nb.utils import save_json

def settings(epochs:int, steps:int) -> dict:
    "The autoencoder stage: L1 + KL 1e-8, no perceptual or adversarial term, lr 5e-4 halved at 60/80/90 % of the run."
    n = epochs
    return {"batch_size": 4, "patch_size": [32, 32, 32], "lr": 5e-4, "n_epochs": n, "steps_per_epoch": steps,
            "kl_weight": 1e-8, "perceptual_network": "none", "perceptual_weight": 0.0, "adv_weight": 0.0,
            "val_interval": 10, "lr_warmup": [[0, 0.2], [1, 1.0], [int(.6 * n), 0.5], [int(.8 * n), 0.25], [int(.9 * n), 0.1]],
            "cache": 1.0, "amp": False}

def network(c:int) -> dict:
    "The recipe's network with `c` latent channels (the diffusion networks would follow; only the autoencoder is built here)."
    return recipe_network({**DEMO_RECIPE, "network": {**(DEMO_RECIPE.get("network") or {}), "latent_channels": c}})

def train(work:Path, c:int, train_cfg:dict) -> Path:
    "Train (or resume, or skip when finished) the variant with `c` latent channels; returns its checkpoint."
    w = work / f"latent{c}"; (w / "configs").mkdir(parents=True, exist_ok=True)
    for f in ("phantoms", "real_ct", "datalist.json", "vae_datalist.json"):
        if not (w / f).exists(): (w / f).symlink_to((work / "data" / f).resolve())
    done = w / "models" / "autoencoder_metrics.jsonl"
    n = len(done.read_text().splitlines()) if done.is_file() else 0
    if n < train_cfg["n_epochs"]:   # a finished run is only measured: its files stay as they are
        save_json(network(c), w / "configs" / "network.json", overwrite=True)
        _vae_run(w, DEMO_RECIPE, "cpu", w / "models", train_cfg, "vae")
    return w / "models" / "autoencoder.pt"

@torch.no_grad()
def round_trip(ae, img:np.ndarray) -> np.ndarray:
    mu, _ = ae.encode(R.unit_image(img))
    return ae.decode(mu).clamp(0, 1)[0, 0].numpy() * 2000 - 1000

def measure(fn, masks, real) -> dict:
    rows = [R.compare(fn(ref), ref, lab) for lab, _, _, ref in masks]
    rr = R.compare(fn(real[0]), real[0], real[1])
    m = lambda k: float(np.mean([r[k] for r in rows if r[k] is not None]))
    return {"psnr": m("psnr"), "bone_ratio": m("bone_ratio"), "soft_err": m("soft_err"),
            "holes": sum(r["holes"] for r in rows) / max(1, sum(r["solid"] for r in rows)),
            "real_psnr": rr["psnr"], "real_bone_ratio": rr["bone_ratio"]}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", required=True, help="data and training runs (kept: runs resume)")
    p.add_argument("--latent-channels", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--epochs", type=int, default=30, help="epochs per variant (default 30)")
    p.add_argument("--steps-per-epoch", type=int, default=40, help="steps of batch 4 per epoch (default 40)")
    p.add_argument("--n-masks", type=int, default=8, help="held-out phantoms (default 8)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    if any(c < 1 for c in a.latent_channels): p.error("--latent-channels: integers >= 1")
    if a.epochs < 1 or a.steps_per_epoch < 1: p.error("--epochs and --steps-per-epoch: integers >= 1")
    torch.set_num_threads(a.threads); t0, work = time.time(), Path(a.work_dir)
    if not (work / "data" / "datalist.json").is_file(): make_demo_data(work / "data", DEMO_RECIPE)
    cfg = settings(a.epochs, a.steps_per_epoch)
    masks = holdout_masks(DEMO_RECIPE, a.n_masks)
    ct = load_example_ct(spacing=DEMO_RECIPE["spacing"])
    real = R.fit_grid(ct.image, ct.label, ct.affine, DEMO_RECIPE["output_size"])
    rows = {f"pooling ceiling, k = {k}": measure(lambda v: pooled(v, k), masks, real) for k in (4, 2)}
    for c in a.latent_channels:
        t = time.time(); ckpt = train(work, c, cfg)
        ae = build_networks(network(c), "cpu", which=("autoencoder",), seed=0).autoencoder
        load_checkpoint(ae, ckpt, "autoencoder"); ae.eval()
        log = [json.loads(l) for l in (ckpt.parent / "autoencoder_metrics.jsonl").read_text().splitlines() if l.strip()]
        rows[f"{c} latent channels"] = measure(lambda v: round_trip(ae, v), masks, real) | {
            "train_s": sum(r.get("time_s", 0) for r in log), "params": sum(q.numel() for q in ae.parameters())}
        print(f"[{time.time() - t0:.0f} s] {c} latent channels done", file=sys.stderr, flush=True)
    g, sp = DEMO_RECIPE["output_size"], DEMO_RECIPE["spacing"]
    print(f"# Demo autoencoder capacity: {'×'.join(map(str, g))} at {sp[0]:g} mm, {a.epochs} × {a.steps_per_epoch} steps "
          f"of 4 patches 32³ each, L1 + KL 1e-8; round trip on {a.n_masks} held-out phantoms and the real chest CT\n")
    print("| autoencoder | parameters | training (2 cores) | PSNR phantoms (dB) | bone / phantom | soft-organ err (HU) | air holes | PSNR real CT (dB) | bone / real |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        tr = f"{r['train_s'] / 60:.0f} min" if "train_s" in r else "-"
        pr = f"{r['params'] / 1e6:.2f} M" if "params" in r else "-"
        print(f"| {name} | {pr} | {tr} | {r['psnr']:.1f} | {r['bone_ratio']:.2f} | {r['soft_err']:.0f} | {r['holes']:.2%} | "
              f"{r['real_psnr']:.1f} | {R.f(r['real_bone_ratio'])} |")
    print(f"\nTargets for the demo model: PSNR >= {R.TARGETS['psnr_phantoms']:g} dB on held-out phantoms, >= "
          f"{R.TARGETS['psnr_real']:g} dB on the real CT; bone >= {R.TARGETS['bone_ratio']:g} of the phantom's after sampling.")
    print(f"Wall time {time.time() - t0:.0f} s.")

if __name__ == "__main__":
    main()
