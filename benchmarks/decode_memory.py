"""Peak memory and time of MAISI VAE decoding: plain vs tensor-parallel splits vs sliding windows (vs both).

    python benchmarks/decode_memory.py --device cuda --size 256
    python benchmarks/decode_memory.py --device cpu --size 128 --splits 4 --window 32 32 8

Each mode runs in its own subprocess so that its peak is clean:
* CPU: peak RSS of the child (resource.getrusage) minus its RSS just before decoding (after torch, the network and
  the latent are in memory), i.e. the activation memory of the decode;
* CUDA: torch.cuda.max_memory_allocated minus the memory allocated before decoding. Windowed decodes gather the
  output on the CPU (as MAISI does), so their GPU peak excludes the output volume.
A small warm-up decode runs first in each child, so the timings leave out cuDNN/oneDNN start-up.

The network is the full MAISI VAE of `--preset` (random weights: memory and time do not depend on the values); the
latent is (1, 4, size/4, size/4, size/4). Each mode's output is compared with the plain decode (max / mean |diff|).

Target (from the project brief): for a 256^3 output, split+window decoding at <= 0.3x the plain decode's peak memory
and <= 1.5x its time. The default window is a slab (L, L, L/4) on the latent with overlap 0.25 (5 windows, 1.25x the
voxels), cut along the axis other than the split axis so the splits stay exact. MONAI's `save_mem` (empty the CUDA
cache after every op) is off by default, as in `decode_latents`: it does not change the allocated peak and costs ~20 %.

Measured (H100, 256^3, --splits 4 --repeat 3): plain 25118 MiB / 0.50 s; split 0.69x / 1.07-1.12x; window 0.25x /
1.35-1.42x; split+window 0.17x / 1.50-1.68x. So windows meet the target on their own; 4 splits cut the memory
further at ~0.1 s. CPU (128^3, window 32 32 8, 16 idle cores): plain 3606 MiB / 11.1 s; split 0.92x / 1.47x;
window 0.28x / 1.38x; split+window 0.28x / 1.72x.
"""
import argparse, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path


def _rss_bytes() -> int:
    "Current resident set size of this process."
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a) -> dict:
    "Run one decode in this process and return its measurements."
    import torch
    from maisi_nb.networks import build_networks, decode_latents
    torch.set_num_threads(a.threads) if a.threads else None
    dev = torch.device(a.device)
    ae = build_networks(a.preset, dev, which="autoencoder", seed=0).autoencoder
    L = a.size // 4
    z = torch.randn(1, 4, L, L, L, generator=torch.Generator().manual_seed(0))
    win = (tuple(a.window), a.overlap) if a.mode in ("window", "split+window") else None
    n = a.splits if a.mode in ("split", "split+window") else 1
    decode_latents(ae, torch.randn(1, 4, 8, 8, 8), num_splits=1)  # warm-up
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if dev.type == "cuda":
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    else: base = _rss_bytes()
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        out = decode_latents(ae, z, num_splits=n, dim_split=1, sliding_window=win, output_device=a.output_device,
                             save_mem={"keep": None, "on": True, "off": False}[a.save_mem]).cpu()
        sync(); times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    torch.save(out, a.out)
    return {"mode": a.mode, "splits": n, "window": list(win[0]) if win else None, "peak_bytes": int(peak),
            "seconds": min(times), "shape": list(out.shape),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=256, help="output voxels per axis (latent = size/4)")
    p.add_argument("--preset", default="maisi-rflow", help="network preset whose autoencoder is timed")
    p.add_argument("--splits", type=int, default=4, help="num_splits for the split modes (along dim_split=1)")
    p.add_argument("--window", type=int, nargs=3, default=None, help="latent roi; default (L, L, L/4)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--modes", nargs="+", default=["plain", "split", "window", "split+window"])
    p.add_argument("--output-device", default="cpu", help="where windowed decodes gather the output (cpu as MAISI)")
    p.add_argument("--save-mem", default="off", choices=["keep", "on", "off"], help="MONAI's empty-cache-after-each-op flag")
    p.add_argument("--repeat", type=int, default=1, help="decodes per mode (the fastest is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the children (0: default)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.size % 4: p.error(f"--size must be a multiple of 4, got {a.size}")
    L = a.size // 4
    a.window = a.window or [L, L, max(L // 4, 1)]
    if a.child:
        print(json.dumps(child(a))); return
    if "plain" not in a.modes: a.modes = ["plain"] + a.modes
    tmp, rows = Path(tempfile.mkdtemp()), []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    import torch
    for mode in a.modes:
        args = [sys.executable, __file__, "--child", "--mode", mode, "--out", str(tmp/f"{mode}.pt"), "--device", a.device,
                "--size", str(a.size), "--preset", a.preset, "--splits", str(a.splits), "--overlap", str(a.overlap),
                "--repeat", str(a.repeat), "--output-device", a.output_device, "--save-mem", a.save_mem, "--threads", str(a.threads), "--window", *map(str, a.window)]
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode: sys.exit(f"{mode} failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        out = torch.load(tmp/f"{mode}.pt").float()
        ref = torch.load(tmp/"plain.pt").float()
        row["max_abs_diff"] = float((out - ref).abs().max())
        row["rel_mean_abs_diff"] = float((out - ref).abs().mean() / ref.abs().mean())
        rows.append(row)
        print(f"  {mode}: {row['peak_bytes'] / 2**20:.0f} MiB, {row['seconds']:.1f} s", file=sys.stderr, flush=True)
    plain = rows[0]
    print(f"\nVAE decode, preset {a.preset}, output {a.size}^3 (latent {L}^3), device {a.device} ({plain['device_name']}), "
          f"overlap {a.overlap}, output gathered on {a.output_device}, save_mem {a.save_mem}")
    print(f"| mode | splits | window (latent) | peak MiB | time s | memory vs plain | time vs plain | max abs diff | mean abs diff / mean abs plain |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['splits']} | {r['window'] or '-'} | {r['peak_bytes'] / 2**20:.0f} | {r['seconds']:.2f} | "
              f"{r['peak_bytes'] / plain['peak_bytes']:.2f}x | {r['seconds'] / plain['seconds']:.2f}x | "
              f"{r['max_abs_diff']:.1e} | {r['rel_mean_abs_diff']:.1e} |")
    sw = next((r for r in rows if r["mode"] == "split+window"), None)
    if sw:
        m, t = sw["peak_bytes"] / plain["peak_bytes"], sw["seconds"] / plain["seconds"]
        print(f"\ntarget <= 0.30x memory at <= 1.50x time for split+window: {m:.2f}x memory, {t:.2f}x time -> "
              f"{'met' if m <= 0.3 and t <= 1.5 else 'NOT met'}")
    if a.json: Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
