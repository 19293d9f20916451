"""Full-size MAISI (rectified flow) generation on a few CPU cores: time (sampling / decoding) and peak memory.

    python benchmarks/cpu_fullsize.py                                   # 256x256x128 at 1.5x1.5x2 mm, 30 steps, 2 threads
    python benchmarks/cpu_fullsize.py --steps 3 --project-steps 30      # measure 3 steps, project the 30-step total
    python benchmarks/cpu_fullsize.py --size 64 64 32 --spacing 6 6 8 --steps 3 --scaling-threads 1 --quality-steps 30 10
    python benchmarks/cpu_fullsize.py --weights /path/to/maisi/models  # NVIDIA's released checkpoints instead of random ones

What runs is what a user of `MaisiPipeline` gets: the `maisi-rflow` networks (diffusion UNet, ControlNet, VAE; random
weights from a fixed seed unless `--weights`), a procedural chest+abdomen phantom mask guiding the ControlNet, the
pipeline's sampler (`fast_inference` defaults) and the decode the memory planner (`plan_decode`) picks for the budget the
pipeline would use (half the available RAM, computed once here so every variant decodes alike; `--decode-budget-gb`
fixes it). Quality checks are off and one attempt is made (QC on random weights is meaningless).

Each variant runs in a fresh subprocess so its peak RSS (resource.getrusage, the whole process: torch, networks, mask,
latents, decode, the output volume) is its own:
* `fp32`     the pipeline's CPU default (float32 sampling);
* `bf16`     bfloat16 autocast for sampling (`MaisiPipeline(..., fast={"sampling_dtype": "bfloat16"})`);
* `cl`       channels_last_3d weights (`fast={"channels_last": True}`);
* `bf16+cl`  both.
The decoder always runs in float32 on the CPU (`decode_latents` allows autocast only on CUDA); a separate probe times one
decode window in float32 and under bfloat16 autocast to show what a bf16 decode would save.

Random weights make no CT, so quality costs are stated as latent distances on the same seed and mask: each variant's
final latent vs the fp32 one (same steps), and with `--quality-steps 30 10` the N-step latents vs the first (reference)
step count: ||z_N - z_ref|| / ||z_ref - z_noise||, i.e. the error relative to how far sampling moved the latent.
MONAI initialises the UNet's output conv, its ResNets' second convs and the ControlNet's residual blocks to zero; such
a random UNet predicts zero velocity, so those layers get ordinary random weights here (timing does not depend on it).

Timing: `--steps` are measured; the per-step time is the median of the steps after the first (the first includes
oneDNN's start-up and the ControlNet's mask embedding). The projected total for `--project-steps` adds
(project_steps - steps) x per-step to the measured total (mask + sampling + decode). `--scaling-threads 1` re-runs
sampling (no decode) with fewer threads and the decode probe likewise; the 8/16-thread figures are an Amdahl's-law
extrapolation from those two points, an optimistic bound (memory bandwidth and cache limits are not modelled).

Measured (2 cores of a Xeon with AMX-BF16, shared: 1-minute load 9-16 during the runs, so every wall time is several
times what an idle machine gives; `--steps 2 --decode window --variants fp32 bf16 bf16+cl --decode-variants fp32
--scaling-threads 1 --scaling-variants bf16 --probe-roi 32 32 8`): the planner (budget 9 GiB) decodes 5 windows of
64x64x8 latent voxels; peak RSS 5.2 GiB (fp32, with the decode), 1.4 GiB after building the networks. Per step
72 s fp32, 81 s bf16, 61 s bf16+channels_last; one window decoded in 381 s (fp32): projected 30-step total 68 min
(target 15 min not met on that loaded machine; memory target met). bf16 vs fp32 latents after 2 steps: 4e-3 relative.
Decode probe (32x32x8 window) at 1 thread: bf16 autocast 0.37x the fp32 time, mean difference 1.6 %. 10 vs 30 steps
(bf16, 64x64x32 validation size): the 10-step latent is 1.4 % of the 30-step sampling's motion away from it.
"""
import argparse, atexit, json, math, os, shutil, statistics, subprocess, sys, tempfile, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import child_env, rss_bytes, peak_rss_bytes, build, md_table, fmt, ROOT

VARIANTS = {"fp32": dict(dtype=None, channels_last=False), "bf16": dict(dtype="bfloat16", channels_last=False),
            "cl": dict(dtype=None, channels_last=True), "bf16+cl": dict(dtype="bfloat16", channels_last=True)}
GiB = 2 ** 30


def bf16_support() -> tuple:
    "(supported, words) for bfloat16 matmul/conv on this CPU."
    import torch
    cap = torch.backends.cpu.get_cpu_capability()
    ok = bool(torch.backends.mkldnn.is_available() and getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    amx = False
    try: amx = "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError: pass
    return ok, f"capability {cap}, oneDNN bf16 {'yes' if ok else 'no'}{', AMX-BF16' if amx else ''}"


def n_windows(L:int, r:int, overlap:float) -> int:
    "Windows MONAI's sliding window places along an axis of length L (roi r)."
    return 1 if r >= L else math.ceil((L - r) / max(int(r * (1 - overlap)), 1)) + 1


def limits_for_size(size, spacing):
    "MAISI's grid limits when the grid is one MAISI accepts, else the small-model limits (validation sizes)."
    from maisi_nb.inference import check_grid, MAISI_LIMITS, SMALL_LIMITS
    try: check_grid(size, spacing, MAISI_LIMITS); return MAISI_LIMITS, "MAISI grid"
    except ValueError: return SMALL_LIMITS, "validation grid (outside MAISI's trained grids)"


def start_noise(seed:int, lat) -> "torch.Tensor":
    "The starting noise of every run (passed to the pipeline as `latents`, so all variants start alike)."
    import torch
    return torch.randn(1, 4, *lat, generator=torch.Generator().manual_seed(seed))


def run_child(a) -> dict:
    "One generation in this process."
    import torch
    from maisi_nb.inference import MaisiPipeline
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    v = VARIANTS[a.variant]
    nets, desc = build("maisi-rflow", "cpu", a.weights, a.seed)
    rss_built = rss_bytes()
    lim, _ = limits_for_size(a.size, a.spacing)
    pipe = MaisiPipeline(nets, limits=lim, fast={"sampling_dtype": v["dtype"], "channels_last": v["channels_last"]})
    plan, one = json.loads(a.plan), {}
    win = plan["sliding_window"]
    if a.no_decode:  # sampling only: an instance attribute shadows the pipeline's decode
        pipe.decode = lambda z, c=None: torch.zeros(z.shape[0], 1, *[4 * s for s in z.shape[2:]])
    elif a.decode == "window":  # the planner's decode, cut short after its first window
        def first_window(z, c=None):
            from maisi_nb.networks import decode_latents
            roi = win[0] if win else z.shape[2:]
            acc = [torch.zeros(z.shape[0], 1, *[4 * s for s in z.shape[2:]]) for _ in range(3 if win else 1)]  # output, counts, weights
            t0 = time.perf_counter()
            x = decode_latents(pipe.autoencoder, z[..., :roi[0], :roi[1], :roi[2]], pipe.scale_factor,
                               num_splits=plan["num_splits"], dim_split=plan["dim_split"])
            one.update(window_s=time.perf_counter() - t0, windows=math.prod(n_windows(L, r, win[1] if win else 0) for L, r in zip(z.shape[2:], roi)))
            acc[0][..., :x.shape[2], :x.shape[3], :x.shape[4]] = x
            return acc[0]
        pipe.decode = first_window
    ticks, last = [], {}
    def cb(e): ticks.append(time.perf_counter()); last["z"] = e["latents"]
    import maisi_nb.inference
    maisi_nb.inference.memory_budget = lambda device: a.budget   # the planner sees the budget fixed in the parent
    res = pipe(mask_source="phantom", body_region=["chest", "abdomen"], output_size=a.size, spacing=a.spacing,
               num_inference_steps=a.steps, seed=a.seed, qc=False, max_attempts=1, progress_bar=False, callback=cb,
               latents=start_noise(a.seed, [s // 4 for s in a.size]))
    t = res.samples[0].timings
    if one:  # projected full decode: every window costs what the first did
        t["decode"] = one["window_s"] * one["windows"]; res.timings["total"] += t["decode"] - one["window_s"]
    steps = [b - a_ for a_, b in zip(ticks, ticks[1:])]
    torch.save(last["z"].float().clone(), a.out)
    img = res.samples[0].image
    return {"variant": a.variant, "threads": torch.get_num_threads(), "steps": a.steps, "weights": desc,
            "mask_s": t["mask"], "sampling_s": t["sampling"], "decode_s": None if a.no_decode else t["decode"],
            "total_s": res.timings["total"], "per_step_s": statistics.median(steps) if steps else t["sampling"] / a.steps,
            "first_step_s": t["sampling"] - sum(steps), "rss_built": rss_built, "peak_rss": peak_rss_bytes(),
            "decode_windows": one.get("windows"), "window_s": one.get("window_s"), "image_finite": bool(torch.isfinite(torch.as_tensor(img)).all()), "load_avg": os.getloadavg()[0]}


def probe_child(a) -> dict:
    "One decode window in float32 (as `decode_latents` runs it) and under bfloat16 autocast."
    import torch
    from maisi_nb.networks import decode_latents, autoencoder_settings
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    nets, _ = build("maisi-rflow", "cpu", a.weights, a.seed, which=("autoencoder",))
    ae, plan = nets.autoencoder, json.loads(a.plan)
    roi = a.probe_roi or (plan["sliding_window"][0] if plan["sliding_window"] else [s // 4 for s in a.size])
    z = torch.randn(1, 4, *roi, generator=torch.Generator().manual_seed(a.seed))
    decode_latents(ae, torch.randn(1, 4, 8, 8, 8), num_splits=1)   # oneDNN start-up, not timed
    t0 = time.perf_counter(); ref = decode_latents(ae, z, num_splits=plan["num_splits"]); t_fp32 = time.perf_counter() - t0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16), autoencoder_settings(ae, plan["num_splits"], plan["dim_split"], False):
        ae.decode_stage_2_outputs(torch.randn(1, 4, 8, 8, 8))
        t0 = time.perf_counter(); out = ae.decode_stage_2_outputs(z).float(); t_bf16 = time.perf_counter() - t0
    return {"threads": torch.get_num_threads(), "roi": list(roi), "fp32_s": t_fp32, "bf16_s": t_bf16,
            "rel_diff": float((out - ref).abs().mean() / ref.abs().mean()), "load_avg": os.getloadavg()[0]}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, nargs=3, default=[256, 256, 128], help="output voxels (multiples of 32)")
    p.add_argument("--spacing", type=float, nargs=3, default=[1.5, 1.5, 2.0], help="mm")
    p.add_argument("--steps", type=int, default=30, help="denoising steps measured per variant")
    p.add_argument("--project-steps", type=int, default=30, help="step count the totals are projected to")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of the main runs")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="first = reference")
    p.add_argument("--decode-variants", nargs="*", default=["fp32", "bf16"], choices=list(VARIANTS),
                   help="variants that also decode (the decode is float32 in all, so the others sample only and reuse the reference decode time in the projection)")
    p.add_argument("--decode", default="full", choices=["full", "window"],
                   help="full: the pipeline's whole decode; window: decode the planner's first window and project the "
                        "decode time as windows x its time (peak memory is that of the real windowed decode)")
    p.add_argument("--scaling-threads", type=int, nargs="*", default=[], help="also time sampling (no decode) and the decode probe at these thread counts")
    p.add_argument("--scaling-variants", nargs="+", default=["fp32", "bf16"], choices=list(VARIANTS))
    p.add_argument("--quality-steps", type=int, nargs="*", default=[], help="e.g. 30 10: sampling-only runs compared with the first")
    p.add_argument("--quality-variant", default="bf16", choices=list(VARIANTS))
    p.add_argument("--no-probe", action="store_true", help="skip the bf16 decode-window probe")
    p.add_argument("--probe-roi", type=int, nargs=3, default=None, help="latent window of the probe (default: the planner's window)")
    p.add_argument("--decode-budget-gb", type=float, default=None, help="decode memory budget (default: the pipeline's, half the available RAM)")
    p.add_argument("--weights", default=None, help="folder with NVIDIA's released MAISI rflow checkpoints (default: random weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    for k in ("--child", "--probe", "--no-decode"): p.add_argument(k, action="store_true", help=argparse.SUPPRESS)
    for k in ("--variant", "--out", "--plan"): p.add_argument(k, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if any(s % 32 or s < 32 for s in a.size): p.error(f"--size: expected multiples of 32 (4 for the VAE x 8 for the UNet), got {a.size}")
    if a.steps < 1 or a.project_steps < 1: p.error("--steps and --project-steps must be >= 1")
    if a.threads < 1 or any(t < 1 for t in a.scaling_threads): p.error("thread counts must be >= 1")
    if a.quality_steps and len(a.quality_steps) < 2: p.error("--quality-steps: give the reference step count and at least one other, e.g. 30 10")
    if a.weights and not Path(a.weights).is_dir(): p.error(f"--weights: {a.weights} is not a folder")
    return a


def spawn(a, tmp:Path, name:str, threads:int, extra:list) -> dict:
    args = [sys.executable, __file__, "--size", *map(str, a.size), "--spacing", *map(str, a.spacing), "--threads", str(threads),
            "--seed", str(a.seed), "--plan", a.plan, "--decode", a.decode, "--budget", str(a.budget), *(["--weights", a.weights] if a.weights else []), *extra]
    t0 = time.perf_counter()
    r = subprocess.run(args, capture_output=True, text=True, env=child_env(threads), cwd=ROOT)
    if r.returncode: sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return row


def amdahl(t1:float, t2:float, n:int) -> float:
    "Time at n threads from times at 1 and 2 threads (parallel fraction p = 2 (1 - t2/t1), clipped to [0, 1])."
    p = min(max(2 * (1 - t2 / t1), 0.0), 1.0)
    return t1 * ((1 - p) + p / n)


def main(argv=None):
    a = parse(argv)
    if a.child: print(json.dumps(probe_child(a) if a.probe else run_child(a))); return
    import torch
    from maisi_nb.networks import plan_decode
    from maisi_nb.inference import memory_budget
    lat = [s // 4 for s in a.size]
    budget = a.budget = int(a.decode_budget_gb * GiB) if a.decode_budget_gb else memory_budget("cpu")
    try: plan = plan_decode(lat, budget, "cpu", overlap=0.25)   # what MaisiPipeline.decode plans (its default overlap)
    except ValueError as e: sys.exit(f"--decode-budget-gb: {e}")
    a.plan = json.dumps({"num_splits": plan.num_splits, "dim_split": plan.dim_split, "sliding_window": plan.sliding_window})
    ok, bf16_words = bf16_support()
    variants = [v for v in a.variants if ok or "bf16" not in v]
    tmp = Path(tempfile.mkdtemp()); atexit.register(shutil.rmtree, tmp, True)   # the runs' latents
    res = {"args": {k: v for k, v in vars(a).items() if k not in ("plan",)}}
    print(f"planning: decode budget {budget / GiB:.1f} GiB -> {plan}", file=sys.stderr)
    z = {}
    rows = []
    for v in variants:
        dec = v in a.decode_variants
        r = spawn(a, tmp, f"{v}, {a.threads} threads, {a.steps} steps{'' if dec else ', sampling only'}", a.threads,
                  ["--child", "--variant", v, "--steps", str(a.steps), "--out", str(tmp / f"{v}.pt")] + ([] if dec else ["--no-decode"]))
        z[v] = torch.load(tmp / f"{v}.pt"); rows.append(r)
    scaling = [spawn(a, tmp, f"{v}, {t} threads, sampling only", t, ["--child", "--no-decode", "--variant", v, "--steps",
                     str(a.steps), "--out", str(tmp / f"s{v}{t}.pt")]) for t in a.scaling_threads for v in a.scaling_variants
               if ok or "bf16" not in v]
    pr = ["--probe-roi", *map(str, a.probe_roi)] if a.probe_roi else []
    probes = [] if a.no_probe else [spawn(a, tmp, f"decode probe, {t} threads", t, ["--child", "--probe"] + pr)
                                    for t in sorted({a.threads, *a.scaling_threads})]
    quality = []
    for n in a.quality_steps:
        r = spawn(a, tmp, f"{a.quality_variant}, {n} steps, sampling only", a.threads,
                  ["--child", "--no-decode", "--variant", a.quality_variant, "--steps", str(n), "--out", str(tmp / f"q{n}.pt")])
        quality.append((n, r, torch.load(tmp / f"q{n}.pt")))

    # ---- report
    ref = rows[0]
    print(f"\nFull-size maisi-rflow generation on the CPU: output {a.size} at {a.spacing} mm (latent {lat}), ControlNet-guided "
          f"(chest+abdomen phantom mask), {ref['weights']}; torch {torch.__version__}; bf16: {bf16_words}"
          f"{'' if ok else ' -> bf16 variants skipped'}")
    print(f"decode: memory planner, budget {budget / GiB:.1f} GiB -> splits {plan.num_splits}, window "
          f"{plan.sliding_window[0] if plan.sliding_window else 'none (whole latent)'}, overlap {plan.sliding_window[1] if plan.sliding_window else '-'}, "
          f"estimated peak {plan.estimated_bytes / GiB:.1f} GiB (plain decode {plan.plain_bytes / GiB:.1f} GiB), "
          f"{plan.compute_ratio:.2f}x the latent voxels decoded; decoder in float32"
          + ("" if a.decode == "full" else "; decode time projected as windows x the first window's time"))
    head = ["variant", "threads", "steps", "mask s", "sampling s", "s/step", "decode s", "total s",
            f"projected total at {a.project_steps} steps (min)", "peak RSS GiB", "RSS after build GiB", "latent diff vs fp32", "load avg"]
    body, proj = [], {}
    dec_ref = next((r["decode_s"] for r in rows if r["decode_s"] is not None), None)
    for r in rows:
        proj[r["variant"]] = r["total_s"] + (a.project_steps - r["steps"]) * r["per_step_s"] + (
            (dec_ref or 0) if r["decode_s"] is None else 0)
        d = None
        if "fp32" in z and r["variant"] != "fp32":
            z0 = z["fp32"]; d = float((z[r["variant"]] - z0).norm() / z0.norm())
        body.append([r["variant"], r["threads"], r["steps"], fmt(r["mask_s"]), fmt(r["sampling_s"]), fmt(r["per_step_s"], 2),
                     fmt(r["decode_s"]), fmt(r["total_s"]), fmt(proj[r["variant"]] / 60) + ("" if r["decode_s"] is not None else "*"),
                     fmt(r["peak_rss"] / GiB, 2) + ("" if r["decode_s"] is not None else " (no decode)"),
                     fmt(r["rss_built"] / GiB, 2), "-" if d is None else f"{d:.1e}", fmt(r["load_avg"])])
    print(md_table(head, body))
    print("(latent diff: norm(z - z_fp32) / norm(z_fp32) of the final latents, same seed and mask; load avg: 1-minute load "
          "when the run ended; *: sampling only, projected with the decode time measured above)")
    for r in rows:
        if r["decode_s"] is None: continue
        m, gb = proj[r["variant"]] / 60, r["peak_rss"] / GiB
        print(f"target <= 15 min and <= 12 GB on {a.threads} threads, {r['variant']}: {m:.1f} min (projected), {gb:.1f} GiB "
              f"-> {'met' if m <= 15 and gb <= 12 else 'NOT met'}")
    res.update(rows=rows, projected_total_s=proj, plan=json.loads(a.plan), budget_bytes=budget, bf16=bf16_words)

    if scaling:
        base = {r["variant"]: r for r in rows}
        print(f"\nThread scaling of one denoising step (sampling only); 8 and 16 threads are an Amdahl extrapolation from the "
              f"measured points, not measurements")
        hd = ["variant", "threads", "s/step", f"speedup of {a.threads} threads over this", "extrapolated s/step at 8", "at 16", "load avg"]
        bd = []
        for r in scaling:
            b = base.get(r["variant"])
            t1, t2 = r["per_step_s"], b["per_step_s"] if b else None
            ex = (amdahl(t1, t2, 8), amdahl(t1, t2, 16)) if b and r["threads"] == 1 and a.threads == 2 and t2 < t1 else (None, None)
            bd.append([r["variant"], r["threads"], fmt(t1, 2), fmt(t1 / t2 if t2 else None, 2), fmt(ex[0], 2), fmt(ex[1], 2), fmt(r["load_avg"])])
        print(md_table(hd, bd))
        if any(b[4] == "-" for b in bd):
            print(f"(no extrapolation where {a.threads} threads were not faster than 1: the machine's cores were oversubscribed)")
        res["scaling"] = scaling
    if probes:
        print(f"\nDecode probe: one planner window (latent {probes[0]['roi']}), float32 (the pipeline's decode) vs bfloat16 autocast")
        hd = ["threads", "fp32 s", "bf16 s", "bf16 / fp32", "mean abs diff / mean abs fp32", "load avg"]
        print(md_table(hd, [[p["threads"], fmt(p["fp32_s"], 2), fmt(p["bf16_s"], 2), fmt(p["bf16_s"] / p["fp32_s"], 2),
                             f"{p['rel_diff']:.1e}", fmt(p["load_avg"])] for p in probes]))
        pt = {p["threads"]: p for p in probes}
        if 1 in pt and 2 in pt:
            d1, d2 = pt[1]["fp32_s"], pt[2]["fp32_s"]
            print(f"decode scaling 1 -> 2 threads: {d1 / d2:.2f}x (no extrapolation: the cores were oversubscribed)" if d2 >= d1 else
                  f"decode scaling 1 -> 2 threads: {d1 / d2:.2f}x; Amdahl extrapolation of the full decode "
                  f"({fmt(ref['decode_s'])} s at {a.threads} threads) to 8 / 16 threads: "
                  f"{ref['decode_s'] * amdahl(d1, d2, 8) / d2:.0f} / {ref['decode_s'] * amdahl(d1, d2, 16) / d2:.0f} s"
                  if ref["decode_s"] and a.threads == 2 else f"decode scaling 1 -> 2 threads: {d1 / d2:.2f}x")
        res["probes"] = probes
    if quality:
        n0, r0, zr = quality[0]
        print(f"\nFewer steps ({a.quality_variant}, sampling only, same seed and mask): distance of the final latent to the "
              f"{n0}-step one, relative to how far the {n0}-step sampling moved it from the noise")
        noise = start_noise(a.seed, lat)
        moved = float((zr - noise).norm())
        hd = ["steps", "sampling s", "s/step", "norm(z_N - z_ref) / norm(z_ref - noise)", "norm(z_N - z_ref) / norm(z_ref)"]
        print(md_table(hd, [[n, fmt(r["sampling_s"]), fmt(r["per_step_s"], 2), f"{float((zq - zr).norm()) / moved:.3f}",
                             f"{float((zq - zr).norm() / zr.norm()):.3f}"] for n, r, zq in quality]))
        res["quality"] = [{"steps": n, "sampling_s": r["sampling_s"], "rel_to_moved": float((zq - zr).norm()) / moved} for n, r, zq in quality]
    print(f"\nmachine: {_machine()}")
    if a.json: Path(a.json).write_text(json.dumps(res, indent=2, default=str))


def _machine() -> str:
    import os, platform
    try: model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): model = platform.processor()
    return f"{model}, {os.cpu_count()} logical CPUs visible, load average {os.getloadavg()[0]:.1f} at the end"


if __name__ == "__main__":
    main()
