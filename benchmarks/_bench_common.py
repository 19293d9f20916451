"""Shared helpers of benchmarks/cpu_fullsize.py and benchmarks/table3.py (full-size networks, random or released weights)."""
import contextlib, os, resource, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child_env(threads:int|None=None) -> dict:
    "Environment of a measuring subprocess: the repository on PYTHONPATH and, if given, the thread count."
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"): env[k] = str(threads)
    return env


def rss_bytes() -> int:
    "Current resident set size of this process."
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    "Peak resident set size of this process so far (Linux reports kilobytes)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refill_zero_init(*modules, seed:int=0) -> int:
    """Give the layers MONAI initialises to zero (UNet output conv, ResNet second convs, ControlNet residual blocks)
    ordinary random weights, so that random networks predict a non-zero velocity and different step counts or dtypes
    give different latents. Timing does not depend on the values; the latent distances do. Returns the layers refilled."""
    import torch
    n = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in modules:
            if m is None: continue
            for layer in m.modules():
                w = getattr(layer, "weight", None)
                if isinstance(layer, (torch.nn.Conv3d, torch.nn.Linear)) and w is not None and not bool(w.detach().any()):
                    layer.reset_parameters(); n += 1
    return n


def build(preset:str, device, weights=None, seed:int=0, which=("autoencoder", "diffusion_unet", "controlnet", "noise_scheduler")):
    "(MaisiNetworks, description): released weights from `weights`, else `preset` with seeded random weights."
    from maisi_nb.networks import build_networks, load_pretrained
    if weights:
        nets = load_pretrained(weights, device=device, which=which)
        return nets, f"released weights from {weights}"
    nets = build_networks(preset, device, which=which, seed=seed)
    k = refill_zero_init(nets.diffusion_unet, nets.controlnet, seed=seed)
    return nets, f"random weights (seed {seed}; {k} zero-initialised layers refilled)"


def md_table(headers, rows) -> str:
    "A markdown table; numbers right-aligned."
    def num(v):
        if isinstance(v, (int, float)): return True
        w = str(v).split(" ")[0].rstrip("*")
        try: float(w); return True
        except ValueError: return w == "-"
    al = ["---:" if rows and all(num(r[i]) for r in rows) else "---" for i in range(len(headers))]
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join(al) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def fmt(v, nd:int=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"
