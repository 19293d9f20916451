"""What a latent at 1/k of the resolution can hold: average-pool a volume by k and upsample it back (trilinear).

An autoencoder with MAISI's 4x downsampling must carry each 4x4x4 block of voxels in its latent channels; with one
channel the best it can do is close to this pooling baseline, and with 4 channels it can add a little detail on top.
So the baseline at k = 4 is a floor a small autoencoder should beat by a few dB, and k = 2 (a latent with 8x as many
positions) shows what a finer latent buys. Measured on held-out phantoms of the demo recipe (their paired images) and
on the real chest CT (LIDC-IDRI, CC BY 3.0) at each spacing, with the measures of benchmarks/demo_realism.py
(PSNR over -1000..1000 HU, bone median / the reference's, mean soft-organ median error).

    python benchmarks/latent_ceiling.py [--spacings 1.5 3 4 6] [--n-masks 6] [--factors 2 4]
"""
import argparse, copy, sys, time
from pathlib import Path
import numpy as np
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_realism as R
from maisi_nb.demo import DEMO_RECIPE, holdout_masks
from maisi_nb.data import load_example_ct

FOV = (384.0, 384.0, 256.0)  # the demo recipe's field of view (mm)

def pooled(img:np.ndarray, k:int) -> np.ndarray:
    "HU volume average-pooled by k in [0,1] units and upsampled back to its grid (trilinear)."
    F, x = torch.nn.functional, R.unit_image(img)
    y = F.interpolate(F.avg_pool3d(x, k), size=x.shape[2:], mode="trilinear", align_corners=False)
    return y[0, 0].numpy() * 2000 - 1000

def grid(spacing:float) -> list:
    "The demo field of view at `spacing`, rounded up to a multiple of 32 voxels per axis."
    return [max(32, int(np.ceil(f / spacing / 32 - 1e-6)) * 32) for f in FOV]

def mean(rows, k): 
    v = [r[k] for r in rows if r[k] is not None]
    return float(np.mean(v)) if v else float("nan")

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spacings", type=float, nargs="+", default=[1.5, 3.0, 4.0, 6.0], help="isotropic spacings (mm)")
    p.add_argument("--factors", type=int, nargs="+", default=[2, 4], help="pooling factors")
    p.add_argument("--n-masks", type=int, default=6, help="held-out phantoms per spacing (default 6)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if any(s <= 0 for s in a.spacings): p.error("--spacings: positive numbers (mm)")
    if any(k < 1 for k in a.factors): p.error("--factors: integers >= 1")
    torch.set_num_threads(a.threads); t0 = time.time()
    print(f"# Latent ceiling: average-pool by k, upsample back; {a.n_masks} held-out phantoms and the real chest CT per spacing\n")
    print("| spacing | grid | k | PSNR phantoms (dB) | bone / phantom | soft-organ err (HU) | PSNR real CT (dB) | bone / real |")
    print("|---|---|---|---|---|---|---|---|")
    for sp in a.spacings:
        r = copy.deepcopy(DEMO_RECIPE); r.update(spacing=[sp] * 3, output_size=grid(sp))
        masks = holdout_masks(r, a.n_masks)
        ct = load_example_ct(spacing=[sp] * 3)
        img, lab, _ = R.fit_grid(ct.image, ct.label, ct.affine, r["output_size"])
        for k in a.factors:
            rows = [R.compare(pooled(ref, k), ref, lab_) for lab_, _, _, ref in masks]
            real = R.compare(pooled(img, k), img, lab)
            print(f"| {sp:g} mm | {'×'.join(map(str, r['output_size']))} | {k} | {mean(rows, 'psnr'):.1f} | {mean(rows, 'bone_ratio'):.2f} | "
                  f"{mean(rows, 'soft_err'):.0f} | {real['psnr']:.1f} | {R.f(real['bone_ratio'])} |", flush=True)
    print(f"\nWall time {time.time() - t0:.0f} s on {a.threads} thread(s).")

if __name__ == "__main__":
    main()
