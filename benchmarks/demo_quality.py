"""Quality of the bundled demo model, measured on held-out phantom masks (issue: the demo model).

For 20 phantom masks drawn from a seed no training volume used (`maisi_nb.demo.holdout_masks`), each used as a user
mask, one generation each (30 rectified-flow steps, no QC retry):
  - QC pass rate: share of volumes in which every organ group's median HU lies in MAISI's accepted range
  - organ-in-range share: over all (volume, organ group present) pairs
  - VAE PSNR on held-out phantoms and on the real chest CT (LIDC-IDRI, CC BY 3.0) at the model's spacing
Side by side: the same trained model with an untrained ControlNet (zero residuals: the UNet ignores the mask), and
all networks untrained.

    python benchmarks/demo_quality.py [--model DIR] [--n 20] [--no-baseline]
"""
import argparse, json, sys, time
from pathlib import Path
import torch
from maisi_nb.demo import DEMO_NETWORK, DEMO_ROLES, evaluate_demo, without_controlnet
from maisi_nb.inference import MaisiPipeline, SMALL_LIMITS, demo_model_dir
from maisi_nb.networks import build_networks


def row(name, m):
    return (f"| {name} | {m['qc_pass_rate']:.0%} | {m['organ_in_range_share']:.0%} ({m['n_organ_checks']}) | "
            f"{m['vae_psnr_phantoms']:.1f} | {m['vae_psnr_real_ct']:.1f} | {m['seconds_per_volume']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="demo model folder (default: the bundled one)")
    p.add_argument("--n", type=int, default=20, help="held-out masks")
    p.add_argument("--no-baseline", action="store_true", help="skip the untrained reference")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    a = p.parse_args(argv)
    d = a.model or demo_model_dir()
    if d is None: sys.exit("no demo model bundled (maisi_nb/demo_model/pipeline.json missing); pass --model")
    pipe = MaisiPipeline.from_pretrained(d, device="cpu")
    recipe = json.loads((Path(d) / "training.json").read_text())["recipe"]
    t0 = time.time(); demo = evaluate_demo(pipe, recipe, n=a.n, progress_bar=False)
    print(f"demo model {d} ({time.time() - t0:.0f} s, {torch.get_num_threads()} threads)")
    lines = ["| model | QC pass rate | organs in range (checks) | VAE PSNR phantoms (dB) | VAE PSNR real CT (dB) | s / volume |",
             "|---|---|---|---|---|---|", row("demo model (trained)", demo)]
    out = {"demo": demo}
    if not a.no_baseline:
        m = evaluate_demo(without_controlnet(pipe), recipe, n=a.n, progress_bar=False)   # the UNet ignores the mask
        lines.append(row("trained, ControlNet untrained (no mask)", m)); out["no_controlnet"] = m
        nets = build_networks(DEMO_NETWORK, "cpu", which=DEMO_ROLES, seed=0)
        nets.scale_factor = pipe.scale_factor
        base = evaluate_demo(MaisiPipeline(nets, limits=SMALL_LIMITS, output_size=pipe.output_size, spacing=pipe.spacing),
                             recipe, n=a.n, progress_bar=False)
        lines.append(row("same networks, untrained", base)); out["untrained"] = base
    print("\n".join(lines))
    failed = [r for r in demo["per_mask"] if not r["passed"]]
    print(f"target QC pass rate >= 90%: {'met' if demo['qc_pass_rate'] >= 0.9 else 'NOT met'}; "
          f"failed volumes: {[(r['mask'], r['regions'], r['failed']) for r in failed]}")
    if a.json: Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
