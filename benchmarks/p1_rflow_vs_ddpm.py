"""P1: end-to-end generation with rectified flow (30 steps) vs DDPM (1000 steps): same weights, same mask, same seeds.

Each sample is generated twice by the same `MaisiPipeline` — once with `scheduler="rflow"`, once with
`scheduler="ddpm"` — from the same mask (a phantom of the requested grid, or `--mask`) and seed, with the quality
check on and one attempt, so the QC pass rate is the raw one. The two runs alternate, so both see the same machine.
Untrained presets only measure speed (their images are noise-like and both fail QC alike); a trained model
(`--weights-dir`) measures quality too.

    python benchmarks/p1_rflow_vs_ddpm.py                         # tiny preset, 32³ at 12 mm, CPU
    python benchmarks/p1_rflow_vs_ddpm.py --preset maisi-rflow --device cuda --output-size 256 256 256 --spacing 1.5 1.5 2
"""
import argparse, json, statistics, time, warnings
import numpy as np
import torch
from maisi_nb.inference import MaisiPipeline, default_pipeline
from maisi_nb.phantoms import make_phantom

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="untrained preset (ignored with --weights-dir / --demo)")
    p.add_argument("--weights-dir", help="released or saved model folder")
    p.add_argument("--demo", action="store_true", help="use the bundled demo model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-size", type=int, nargs=3, default=[32, 32, 32])
    p.add_argument("--spacing", type=float, nargs=3, default=[12.0, 12.0, 12.0])
    p.add_argument("--mask", help="NIfTI mask to use instead of a phantom")
    p.add_argument("--samples", type=int, default=2, help="samples per scheduler (seeds seed..seed+samples-1)")
    p.add_argument("--rflow-steps", type=int, default=30)
    p.add_argument("--ddpm-steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)

def load(a) -> MaisiPipeline:
    if a.weights_dir: return MaisiPipeline.from_pretrained(a.weights_dir, device=a.device)
    if a.demo: return default_pipeline(a.device)
    return MaisiPipeline.from_preset(a.preset, a.device, seed=0)

def run(pipe, mask, kind, steps, seed, a) -> tuple:
    if pipe.device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = pipe(mask=mask, output_size=a.output_size, spacing=a.spacing, scheduler=kind, num_inference_steps=steps,
             seed=seed, max_attempts=1, progress_bar=False)
    if pipe.device.type == "cuda": torch.cuda.synchronize()
    s = r.samples[0]
    return time.perf_counter() - t0, s.qc.passed, s.timings

def main(argv=None):
    a = parse(argv)
    if a.threads: torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")   # scheduler/weights mismatch and short-DDPM warnings are expected here
    pipe = load(a)
    mask = a.mask or tuple(make_phantom(a.output_size, a.spacing, ("chest", "abdomen"), seed=a.seed)[1:])
    run(pipe, mask, "rflow", 2, a.seed, a); run(pipe, mask, "ddpm", 2, a.seed, a)   # warm-up (kernels, caches)
    out = {"rflow": [], "ddpm": []}
    for i in range(a.samples):
        for kind, steps in (("rflow", a.rflow_steps), ("ddpm", a.ddpm_steps)):
            out[kind].append(run(pipe, mask, kind, steps, a.seed + i, a))
    res = {"model": pipe.source, "version": pipe.version, "device": str(pipe.device), "output_size": a.output_size,
           "spacing": a.spacing, "threads": torch.get_num_threads(), "samples": a.samples,
           "steps": {"rflow": a.rflow_steps, "ddpm": a.ddpm_steps}}
    for k, v in out.items():
        res[k] = {"seconds": [round(t, 3) for t, _, _ in v], "median_seconds": statistics.median(t for t, _, _ in v),
                  "qc_pass_rate": float(np.mean([p for _, p, _ in v])),
                  "stage_seconds": {s: statistics.median(tm[s] for _, _, tm in v) for s in v[0][2]}}
    res["speedup"] = res["ddpm"]["median_seconds"] / res["rflow"]["median_seconds"]
    print(f"P1 end-to-end, {res['model']} ({res['version']} weights), {a.output_size} at {a.spacing} mm, {res['device']}, "
          f"{res['threads']} thread(s), {a.samples} sample(s) each, same mask and seeds")
    for k in ("rflow", "ddpm"):
        r = res[k]
        st = ", ".join(f"{s} {t:.2f}" for s, t in r["stage_seconds"].items())
        print(f"  {k:5s} {res['steps'][k]:4d} steps: {r['median_seconds']:8.2f} s median ({st}); QC pass rate {r['qc_pass_rate']:.0%}")
    ok = res["rflow"]["qc_pass_rate"] >= res["ddpm"]["qc_pass_rate"]
    print(f"P1 ratio DDPM/RFlow: {res['speedup']:.1f}x faster (target >= 25x); QC pass rate not lower: {ok}")
    if a.json: open(a.json, "w").write(json.dumps(res, indent=2))
    return res

if __name__ == "__main__": main()
