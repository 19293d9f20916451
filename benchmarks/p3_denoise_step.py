"""P3: one UNet + ControlNet denoising step of MaisiPipeline vs a plain eager fp32 MONAI call, at the same sizes.

The baseline is what MAISI's sampler does per step, without its autocast: `torch.no_grad()`, the networks as built,
ControlNet(x, t, mask bits) then UNet(x, t, spacing, residuals). "Ours" is the step as `MaisiPipeline` runs it: the
`fast_inference` context with the pipeline's default options (`inference.FAST_DEFAULTS`) under `torch.inference_mode()`
(on CUDA also fp16 autocast, as the pipeline samples). On CPU the opt-in bf16 autocast is timed as well. Every variant is measured side by side in one run (interleaved
rounds, median of the rounds), so the ratios are fair even on a busy machine.

    python benchmarks/p3_denoise_step.py                          # tiny preset, 64³ image, CPU
    python benchmarks/p3_denoise_step.py --preset maisi-rflow --device cuda --output-size 256 256 256
"""
import argparse, contextlib, json, statistics, sys, time, warnings
import torch
from maisi_nb.networks import build_networks
from maisi_nb.diffusion import model_conditioning, unet_forward
from maisi_nb.labels import labels_to_bits
from maisi_nb.phantoms import make_phantom
from maisi_nb.inference import fast_inference, FAST_DEFAULTS

def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--output-size", type=int, nargs=3, default=[64, 64, 64], help="image voxels (latent = /4)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds; each times every variant once")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per variant per round (time is per step)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (compile time reported apart)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)

def setup(a):
    dev = torch.device(a.device)
    nets = build_networks(a.preset, dev, which=("diffusion_unet", "controlnet"), seed=0)
    unet, cn = nets.diffusion_unet, nets.controlnet
    size = a.output_size
    sp = [384.0 / s for s in size]
    lab = torch.from_numpy(make_phantom(size, sp, ("chest", "abdomen"), seed=0).label)[None, None].to(dev)
    cond = labels_to_bits(lab)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.in_channels, *[s // 4 for s in size], generator=g).to(dev)
    kw = dict(spacing=sp, top_region_index=[0, 1, 0, 0], bottom_region_index=[0, 0, 1, 0], modality=1, device=dev)
    return dev, unet, cn, x, cond, model_conditioning(unet, 1, **kw), model_conditioning(cn, 1, **kw)

def variants(a, dev, unet, cn):
    "name -> (context factory, grad mode, autocast dtype)."
    opts = {k: v for k, v in FAST_DEFAULTS.items() if k != "sampling_dtype"}
    amp = torch.float16 if dev.type == "cuda" else getattr(torch, FAST_DEFAULTS["sampling_dtype"] or "float32")
    amp = None if amp == torch.float32 else amp
    v = {"baseline (no_grad, fp32 eager)": (contextlib.nullcontext, torch.no_grad, None),
         "inference_mode": (contextlib.nullcontext, torch.inference_mode, None),
         "+ cached mask embedding": (lambda: fast_inference(unet, cn, cache_condition=True), torch.inference_mode, None),
         "+ cache + SDPA attention": (lambda: fast_inference(unet, cn, sdpa=True), torch.inference_mode, None),
         "+ cache + channels_last_3d": (lambda: fast_inference(unet, cn, channels_last=True), torch.inference_mode, None),
         "pipeline default": (lambda: fast_inference(unet, cn, **opts), torch.inference_mode, amp)}
    if dev.type == "cpu":  # opt-in: MaisiPipeline(..., fast={"sampling_dtype": "bfloat16"})
        v["opt-in: + bf16 autocast"] = (lambda: fast_inference(unet, cn, **opts), torch.inference_mode, torch.bfloat16)
    return v

def time_variant(ctx, grad, amp, unet, cn, x, cond, ukw, ckw, steps, dev):
    t = torch.full((1,), 500.0, device=dev)
    ac = torch.autocast(dev.type, amp) if amp else contextlib.nullcontext()
    with ctx(), grad(), ac:
        c = cond.float()            # one mask tensor for all steps, as in sampling
        unet_forward(unet, x, t, ukw, cn, c, ckw)   # first call of this context: not timed
        if dev.type == "cuda": torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps): unet_forward(unet, x, t, ukw, cn, c, ckw)
        if dev.type == "cuda": torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps

def main(argv=None):
    a = parse(argv)
    if a.threads: torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    dev, unet, cn, x, cond, ukw, ckw = setup(a)
    vs = variants(a, dev, unet, cn)
    times = {k: [] for k in vs}
    for r in range(a.rounds):
        for k, (ctx, grad, amp) in vs.items():
            times[k].append(time_variant(ctx, grad, amp, unet, cn, x, cond, ukw, ckw, a.steps, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["baseline (no_grad, fp32 eager)"]
    res = {"preset": a.preset, "device": str(dev), "output_size": a.output_size, "latent": [s // 4 for s in a.output_size],
           "threads": torch.get_num_threads(), "fast_defaults": FAST_DEFAULTS, "seconds_per_step": med,
           "speedup_vs_baseline": {k: base / v for k, v in med.items()}}
    if a.compile:
        t0 = time.perf_counter()
        cu, cc = torch.compile(unet), torch.compile(cn)
        opts = {k: v for k, v in FAST_DEFAULTS.items() if k != "sampling_dtype"}
        with fast_inference(unet, cn, **opts), torch.inference_mode():
            unet_forward(cu, x, torch.full((1,), 500.0, device=dev), ukw, cc, cond.float(), ckw)
        res["compile_seconds"] = time.perf_counter() - t0
        ts = [time_variant(lambda: fast_inference(unet, cn, **opts), torch.inference_mode, None, cu, cc, x, cond,
                           ukw, ckw, a.steps, dev) for _ in range(a.rounds)]
        res["seconds_per_step"]["+ torch.compile"] = statistics.median(ts)
        res["speedup_vs_baseline"]["+ torch.compile"] = base / statistics.median(ts)
    print(f"P3 one UNet+ControlNet step, preset {a.preset}, image {a.output_size} (latent {res['latent']}), {dev}, "
          f"{res['threads']} thread(s), median of {a.rounds} interleaved rounds x {a.steps} steps")
    for k, v in res["seconds_per_step"].items():
        print(f"  {k:34s} {v * 1000:9.1f} ms/step   {res['speedup_vs_baseline'][k]:5.2f}x")
    if "compile_seconds" in res: print(f"  (torch.compile took {res['compile_seconds']:.1f} s before the first step)")
    print(f"P3 ratio (pipeline default vs baseline): {res['speedup_vs_baseline']['pipeline default']:.2f}x (target >= 1.3x on CPU)")
    if a.json: open(a.json, "w").write(json.dumps(res, indent=2))
    return res

if __name__ == "__main__": main()
