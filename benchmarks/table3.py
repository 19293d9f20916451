"""MAISI's inference time / peak GPU memory table (README "Table 3", A100 80 GB) re-measured with maisi_nb.

    python benchmarks/table3.py --dry-run                         # the plan: rows, settings, steps, MAISI's figures
    python benchmarks/table3.py                                   # CUDA: every row, rectified flow and DDPM
    python benchmarks/table3.py --rows 16g_256x256x128 24g_512x512x512 --schedulers rflow --ddpm-steps 1000
    python benchmarks/table3.py --device cpu --tiny               # self-check of the code path on the CPU (tiny networks)

For every memory preset of MAISI's `config_infer_<memory>_<size>.json` (output size, spacing, VAE sliding-window size
and overlap, tensor-parallel splits, as in the current MAISI repository's files; the plain `config_infer.json` too) and
both schedulers, it times what MAISI times: the diffusion model ("DM": ControlNet-guided UNet sampling, rectified flow
30 steps, DDPM 1000 steps, fp16 autocast as in MAISI) and the VAE decode with that preset's window/splits, on full-size
networks (`maisi-rflow` / `maisi-ddpm`, random weights from a fixed seed; timing and memory do not depend on the
values) and a chest+abdomen phantom mask. Peak memory is torch.cuda.max_memory_allocated over sampling and over the
decode, including the resident networks (MAISI does not say how it measured; nvidia-smi would add the CUDA context
and the allocator's cache). Each figure sits beside MAISI's with the ratio ours / MAISI's; the GPU differs unless it
is an A100 80 GB, so compare ratios across rows rather than absolute values.

DDPM's 1000 steps take long (MAISI: 57-904 s per row on an A100): by default `--ddpm-steps 20` are measured and the
DM time is projected as measured + (1000 - 20) x the median step time (marked "proj."); `--ddpm-steps 1000` runs them
all. The decode does not depend on the scheduler, so it runs once per row (with the rectified-flow latents) and both
schedulers' rows show that VAE time; their peak is the larger of their sampling peak and the decode's peak.

Only CUDA gives comparable numbers: elsewhere the script says so and exits 0, unless `--device cpu --tiny` runs the
same code on tiny networks and sizes (each size / 4) as a self-check.
"""
import argparse, gc, json, os, statistics, sys, time, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import build, md_table, fmt, peak_rss_bytes

GiB = 2 ** 30
# name: (output_size, spacing mm, VAE window (latent voxels), overlap, tp splits) -- MAISI's current config_infer files
CONFIGS = {
    "default":          ([256, 256, 256], [1.5, 1.5, 2.0], [48, 48, 48], 0.6666, None),
    "16g_256x256x128":  ([256, 256, 128], [1.5, 1.5, 4.0], [96, 96, 96], 0.25, 2),
    "16g_256x256x256":  ([256, 256, 256], [1.5, 1.5, 2.0], [48, 48, 64], 0.6666, 4),
    "16g_512x512x128":  ([512, 512, 128], [0.75, 0.75, 4.0], [64, 64, 32], 0.5, 2),
    "24g_256x256x256":  ([256, 256, 256], [1.5, 1.5, 2.0], [64, 64, 64], 0.25, 4),
    "24g_512x512x128":  ([512, 512, 128], [0.75, 0.75, 4.0], [80, 80, 32], 0.4, 2),
    "24g_512x512x512":  ([512, 512, 512], [0.75, 0.75, 1.0], [64, 64, 48], 0.4, 2),
    "32g_512x512x512":  ([512, 512, 512], [0.75, 0.75, 1.0], [80, 80, 48], 0.4, 4),
    "80g_512x512x512":  ([512, 512, 512], [0.75, 0.75, 1.0], [80, 80, 80], 0.4, 4),
    "80g_512x512x768":  ([512, 512, 768], [0.75, 0.75, 0.66667], [80, 80, 96], 0.4, 4),
}
# MAISI README (A100 80 GB): peak GB, DM seconds DDPM, DM seconds rflow, VAE seconds; None: not in the table
PAPER = {
    "16g_256x256x128": (15.0, 57, 2, 1), "16g_256x256x256": (15.4, 81, 3, 5), "16g_512x512x128": (15.7, 138, 5, 8),
    "24g_256x256x256": (22.7, 81, 3, 2), "24g_512x512x128": (21.0, 138, 5, 6), "24g_512x512x512": (22.8, 569, 19, 29),
    "32g_512x512x512": (28.4, 569, 19, 30), "80g_512x512x512": (45.3, 569, 19, 32), "80g_512x512x768": (49.7, 904, 30, 57),
}
NOTES = {"80g_512x512x512": "README lists tp 2; the config file has 4"}
STEPS = {"rflow": 30, "ddpm": 1000}
MASKS = {}  # config -> phantom mask sample, shared by both schedulers' passes


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--schedulers", nargs="+", default=["rflow", "ddpm"], choices=["rflow", "ddpm"])
    p.add_argument("--ddpm-steps", type=int, default=20, help="DDPM steps measured (the rest of 1000 projected)")
    p.add_argument("--rflow-steps", type=int, default=30, help="rectified-flow steps measured (MAISI: 30)")
    p.add_argument("--tiny", action="store_true", help="tiny networks, sizes / 4, 3 steps: a self-check of the code path")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    if not 1 <= a.ddpm_steps <= 1000 or not 1 <= a.rflow_steps <= 1000: p.error("--ddpm-steps / --rflow-steps: 1..1000")
    if a.tiny: a.ddpm_steps, a.rflow_steps = min(a.ddpm_steps, 3), min(a.rflow_steps, 3)
    return a


def row_settings(name:str, tiny:bool) -> dict:
    size, sp, win, ov, tp = CONFIGS[name]
    if tiny:  # the same shapes / 4 (outputs stay multiples of 32)
        size, sp, win = [s // 4 for s in size], [s * 4 for s in sp], [max(w // 4, 4) for w in win]
    return {"output_size": size, "spacing": sp, "window": win, "overlap": ov, "tp": tp}


def plan_text(a) -> str:
    rows = []
    for r in a.rows:
        s, pp = row_settings(r, a.tiny), PAPER.get(r)
        for k in a.schedulers:
            n = a.ddpm_steps if k == "ddpm" else a.rflow_steps
            rows.append([r, "x".join(map(str, s["output_size"])), "x".join(map(str, s["window"])), s["overlap"], s["tp"] or "-", k,
                         f"{n}" + (f" (of {STEPS[k]}, rest projected)" if n < STEPS[k] else ""),
                         fmt(pp[1 if k == "ddpm" else 2] if pp else None, 0), fmt(pp[3] if pp else None, 0), fmt(pp[0] if pp else None)])
    return md_table(["config", "output", "VAE window", "overlap", "tp", "scheduler", "steps measured", "MAISI DM s",
                     "MAISI VAE s", "MAISI peak GB"], rows)


def sync(dev):
    import torch
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def reset_peak(dev):
    import torch
    if dev.type == "cuda": gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)


def peak(dev) -> int:
    import torch
    return torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss_bytes()


def measure(a, kind:str, dev, decoded:dict) -> list:
    "Rows of one scheduler: DM time per config (and, for the first scheduler, the decode)."
    import torch
    from maisi_nb.inference import MaisiPipeline, SMALL_LIMITS, fast_inference, FAST_DEFAULTS
    from maisi_nb.sampling import sample_latents, make_scheduler
    from maisi_nb.labels import labels_to_bits
    preset = ("tiny" if kind == "rflow" else "tiny-ddpm") if a.tiny else f"maisi-{kind}"
    nets, desc = build(preset, dev, None, a.seed)
    pipe = MaisiPipeline(nets, limits=SMALL_LIMITS if a.tiny else None)
    unet, cn = nets.diffusion_unet, nets.controlnet
    fast = {k: v for k, v in FAST_DEFAULTS.items() if k != "sampling_dtype"}
    n = a.ddpm_steps if kind == "ddpm" else a.rflow_steps
    out = []
    for r in a.rows:
        s = row_settings(r, a.tiny)
        if r not in MASKS:  # kept on the CPU so that the other rows' masks do not count in this row's GPU peak
            ms = pipe.phantom_mask(["chest", "abdomen"], s["output_size"], s["spacing"], seed=a.seed)
            MASKS[r] = {**ms, "label": ms["label"].cpu()}
        ms = MASKS[r]
        lab = ms["label"].to(dev)
        ticks = []
        def cb(i, t, x): sync(dev); ticks.append(time.perf_counter())
        reset_peak(dev)
        t0 = time.perf_counter()
        with fast_inference(unet, cn, **fast):
            z = sample_latents(unet, make_scheduler(kind), (1, unet.in_channels, *[x // 4 for x in s["output_size"]]),
                               spacing=ms["spacing"], top_region_index=ms["top_region_index"],
                               bottom_region_index=ms["bottom_region_index"], modality=1, controlnet=cn,
                               controlnet_cond=labels_to_bits(lab), num_inference_steps=n, seed=a.seed, device=dev,
                               callback=cb, progress_bar=False)
        sync(dev)
        dm = time.perf_counter() - t0
        steps = [b - a_ for a_, b in zip(ticks, ticks[1:])]
        per = statistics.median(steps) if steps else dm / n
        dm_proj = dm + (STEPS[kind] - n) * per
        pk_dm = peak(dev)
        if r not in decoded:
            cfg = {"autoencoder_sliding_window_infer_size": s["window"], "autoencoder_sliding_window_infer_overlap": s["overlap"],
                   "autoencoder_tp_num_splits": s["tp"]}
            if a.tiny:  # the tiny VAE has other exact split counts
                from maisi_nb.networks import valid_num_splits
                roi = [min(w, x // 4) for w, x in zip(s["window"], s["output_size"])]
                cfg["autoencoder_tp_num_splits"] = max(v for v in valid_num_splits(pipe.autoencoder, roi) if v <= (s["tp"] or 1))
            reset_peak(dev)
            t1 = time.perf_counter()
            img = pipe.decode(z, cfg)
            sync(dev)
            decoded[r] = {"vae_s": time.perf_counter() - t1, "peak_vae": peak(dev), "tp_used": cfg["autoencoder_tp_num_splits"],
                          "finite": bool(torch.isfinite(img).all()), "shape": list(img.shape)}
            del img
        d = decoded[r]
        out.append({"config": r, "scheduler": kind, "steps": n, "dm_s": dm, "dm_projected_s": dm_proj, "per_step_s": per,
                    "vae_s": d["vae_s"], "peak_dm": pk_dm, "peak_vae": d["peak_vae"], "peak": max(pk_dm, d["peak_vae"]),
                    "tp_used": d["tp_used"], "finite": d["finite"], "weights": desc})
        print(f"  {r} {kind}: DM {dm:.1f} s ({n} steps), VAE {d['vae_s']:.1f} s, peak {out[-1]['peak'] / GiB:.1f} GiB",
              file=sys.stderr, flush=True)
        del z, lab
    del nets, pipe, unet, cn
    return out


def main(argv=None):
    a = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")   # no progress bars from the decode
    print(f"plan{' (tiny self-check)' if a.tiny else ''}: {len(a.rows)} config(s) x {a.schedulers}", file=sys.stderr)
    if a.dry_run:
        print(plan_text(a)); return 0
    import torch
    dev = torch.device(a.device)
    if dev.type != "cuda" and not a.tiny:
        print(f"table3: MAISI's table is GPU time and GPU memory; this needs CUDA (device {a.device!r}"
              f"{'' if torch.cuda.is_available() else ', and no CUDA device is available'}). "
              "Use --dry-run for the plan or --device cpu --tiny for a self-check."); return 0
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("table3: no CUDA device is available; nothing measured (use --dry-run or --device cpu --tiny)."); return 0
    warnings.simplefilter("ignore")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()} (tiny self-check)"
    decoded, rows = {}, []
    for k in sorted(a.schedulers, key=lambda k: k != "rflow"):  # rflow first: its latents feed the decodes
        rows += measure(a, k, dev, decoded)
    rows.sort(key=lambda r: (a.rows.index(r["config"]), r["scheduler"] != "rflow"))
    ratio = lambda x, y: "-" if y is None or not y else f"{x / y:.2f}"
    body = []
    for r in rows:
        pp = PAPER.get(r["config"]) if not a.tiny else None
        pdm = pp[1 if r["scheduler"] == "ddpm" else 2] if pp else None
        proj = r["steps"] < STEPS[r["scheduler"]]
        s = row_settings(r["config"], a.tiny)
        body.append([r["config"], "x".join(map(str, s["output_size"])), "x".join(map(str, s["window"])) + f" / {s['overlap']}",
                     r["tp_used"] or "-", r["scheduler"], f"{r['steps']}/{STEPS[r['scheduler']]}",
                     fmt(r["dm_projected_s"]) + (" proj." if proj else ""), fmt(pdm, 0), ratio(r["dm_projected_s"], pdm),
                     fmt(r["vae_s"]), fmt(pp[3] if pp else None, 0), ratio(r["vae_s"], pp[3] if pp else None),
                     fmt(r["peak"] / GiB), fmt(pp[0] if pp else None), ratio(r["peak"] / GiB, pp[0] if pp else None),
                     fmt(r["peak_dm"] / GiB), NOTES.get(r["config"], "")])
    unit = "GiB" if dev.type == "cuda" else "GiB RSS"
    print(f"\nMAISI Table 3 re-measured: {name}, torch {torch.__version__}, {rows[0]['weights'] if rows else ''}; "
          f"MAISI: A100 80 GB. DM = ControlNet-guided sampling; ratio = ours / MAISI's")
    print(md_table(["config", "output", "VAE window / overlap", "tp", "scheduler", "steps measured", "DM s", "MAISI DM s",
                    "DM ratio", "VAE s", "MAISI VAE s", "VAE ratio", f"peak {unit}", "MAISI peak GB", "peak ratio",
                    f"sampling peak {unit}", "note"], body))
    print("(proj.: measured steps + the remaining steps at the median step time; peak: max_memory_allocated over "
          "sampling and decode incl. the networks; MAISI's GB are as printed in its README)")
    bad = [r["config"] for r in rows if not r["finite"]]
    if bad: print(f"non-finite decoder output in {bad} (random weights in fp16 can overflow; timing and memory are still valid)")
    if a.json: Path(a.json).write_text(json.dumps({"device": name, "args": vars(a), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
