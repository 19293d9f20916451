"""Does the size condition control the generated masks?

For each of the 10 controllable anatomies, request the size percentiles 0.1, 0.5 and 0.9 (MAISI's completion of the
other slots from the size database), draw masks with several seeds and measure the achieved volume of the requested
anatomy as a percentile of the training masks' volumes. Reports per slot: Spearman rank correlation between requested and
achieved, how often the anatomy is lost (absent after post-processing) or duplicated (more than one connected piece
before post-processing), and how post-processing changes its volume; side by side, the same requests through the
candidate-mask database (which ignores sizes) and through phantoms (sizes mapped to `organ_scale` / tumour radius).
A second table shows what the mask autoencoder alone keeps: held-out phantom masks (never trained on) encoded and
decoded, per anatomy the Dice, the rank correlation between input and reconstructed volume, and how often it is lost.

    python benchmarks/size_control.py                      # bundled demo mask generator, 6 seeds (3 levels: 18 masks per slot)
    python benchmarks/size_control.py --seeds 2 --json out.json
"""
import argparse, json, tempfile, time
from pathlib import Path
import numpy as np
import torch
from scipy import ndimage, stats
from maisi_nb.labels import CONTROLLABLE_ANATOMIES, compact_to_maisi, label_name
from maisi_nb.masks import find_masks, mask_generator_spacing, post_process_generated_mask, prepare_size_condition, target_tumor_label
from maisi_nb.phantoms import make_phantom
from maisi_nb.utils import load_nifti, spacing_from_affine
from maisi_nb.mask_generator import (SIZE_CONDITION_IDS, demo_mask_generator_dir, encode_masks, load_mask_generator, load_mask_set,
                                     make_mask_phantoms, mask_datalist, mask_generator_data, phantom_size_request,
                                     read_size_conditions, sample_masks, volume_percentile)

_REGION = {"lung tumor": ["chest"], "bone lesion": ["abdomen"]}

def _pct(v, ref) -> float:
    "Percentile of a volume among the training volumes (NaN when no training mask has the anatomy)."
    return volume_percentile(v, ref) if (np.asarray(ref) > 0).any() else float("nan")

def _spearman(req, got) -> float:
    req, got = np.asarray(req, float), np.asarray(got, float)
    if np.ptp(got) == 0 or np.ptp(req) == 0: return float("nan")
    return float(stats.spearmanr(req, got).statistic)

def autoencoder_table(nets, grid, spacing, n:int=40, seed:int=777) -> list:
    "Markdown rows: the mask autoencoder's round trip on n held-out phantom masks (its training grid, another seed)."
    with tempfile.TemporaryDirectory() as tmp:
        labs, _, _ = load_mask_set(mask_datalist(make_mask_phantoms(tmp, n, grid, spacing, seed=seed), None))
    ae = nets.mask_generation_autoencoder.float().eval()
    z = encode_masks(ae, labs)
    with torch.no_grad(): rec = compact_to_maisi(np.concatenate([ae.decode(z[i:i + 4]).argmax(1).numpy() for i in range(0, n, 4)]))
    out = [f"Mask autoencoder round trip on {n} held-out phantom masks: voxel agreement {(rec == labs).mean():.3f}", "",
           "| anatomy | masks with it | Dice | volume rank correlation (input vs reconstruction) | median volume ratio | lost |",
           "|---|---|---|---|---|---|"]
    for j, name in enumerate(CONTROLLABLE_ANATOMIES):
        a, b = labs == SIZE_CONDITION_IDS[j], rec == SIZE_CONDITION_IDS[j]
        va, vb = a.sum((1, 2, 3)), b.sum((1, 2, 3)); has = va > 0
        if not has.any(): out.append(f"| {name} | 0 | - | - | - | - |"); continue
        dice = 2 * (a & b).sum((1, 2, 3))[has] / (va[has] + vb[has])
        out.append(f"| {name} | {has.sum()} | {dice.mean():.2f} | {_spearman(va[has], vb[has]):.2f} | "
                   f"{np.median(vb[has] / va[has]):.2f} | {np.mean(vb[has] == 0):.0%} |")
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--directory", default=None, help="mask-generator folder (default: the bundled demo)")
    p.add_argument("--levels", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--seeds", type=int, default=6, help="seeds per request (3 seeds give 9 masks per slot: too few for a stable rank correlation)")
    p.add_argument("--steps", type=int, default=1000, help="DDPM steps")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="write the per-sample results here")
    a = p.parse_args(argv)
    d = Path(a.directory) if a.directory else demo_mask_generator_dir()
    data, info = mask_generator_data(d), json.loads((d / "training.json").read_text())
    grid, sp = info["recipe"]["phantoms"]["output_size"], info["recipe"]["phantoms"]["spacing"]
    recs = read_size_conditions(data["size_conditions"])
    ref = np.array([r["organ_volume_ml"] for r in recs])
    vox = float(np.prod(sp)) / 1000
    nets = load_mask_generator(d, a.device)
    gsp = mask_generator_spacing(nets.config["mask_generation_latent_shape"])  # post-processing on the generator's grid
    jobs = [(j, lv, s) for j in range(10) for lv in a.levels for s in range(a.seeds)]
    conds = [prepare_size_condition([[CONTROLLABLE_ANATOMIES[j], lv]], recs) for j, lv, s in jobs]
    t0 = time.time()
    compact = sample_masks(nets, conds, [1000 * j + s for j, lv, s in jobs], a.steps, batch_size=len(jobs), device=a.device)
    t_sample = time.time() - t0
    rows = []
    for (j, lv, s), c, cond in zip(jobs, compact, conds):
        lab, raw = SIZE_CONDITION_IDS[j], compact_to_maisi(c)
        post = post_process_generated_mask(raw, target_tumor_label(cond), spacing=gsp)
        v_raw, v_post = float((raw == lab).sum() * vox), float((post == lab).sum() * vox)
        pieces = ndimage.label(raw == lab, structure=np.ones((3, 3, 3)))[1]
        changed = float((raw != post).mean())
        scale, tumors = phantom_size_request([[CONTROLLABLE_ANATOMIES[j], lv]])
        ph = make_phantom(grid, sp, ("chest", "abdomen"), seed=s, organ_scale=scale, tumors=tumors, strict_tumors=False)
        v_ph = float((ph.label == lab).sum() * vox)
        rows.append({"slot": j, "level": lv, "seed": s, "v_raw": v_raw, "v_post": v_post, "pieces": int(pieces),
                     "changed": changed, "pct": _pct(v_post, ref[:, j]), "v_phantom": v_ph,
                     "pct_phantom": _pct(v_ph, ref[:, j])})
    # database path: candidates holding the anatomy; the request's size plays no part in the choice
    db = json.loads(Path(data["mask_database"]).read_text())
    out = ["| slot | anatomy | Spearman (generated) | achieved pct @ " + " / ".join(map(str, a.levels)) +
           " | lost | duplicated | post-proc. volume change | voxels changed | Spearman (phantom) | phantom pct @ levels | database: candidates, pct range |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for j, name in enumerate(CONTROLLABLE_ANATOMIES):
        r = [x for x in rows if x["slot"] == j]
        req = [x["level"] for x in r]
        med = lambda key: " / ".join(f"{np.nanmedian([x[key] for x in r if x['level'] == lv]):.2f}" for lv in a.levels)
        rel = [(x["v_post"] - x["v_raw"]) / x["v_raw"] for x in r if x["v_raw"] > 0]
        cands = find_masks(_REGION.get(name, ["abdomen"]), [SIZE_CONDITION_IDS[j]], [6.0] * 3, [64] * 3, db, data["mask_dir"])
        pct_db = []
        for cnd in cands:
            m, aff = load_nifti(cnd["pseudo_label"])
            pct_db.append(_pct(float((m == SIZE_CONDITION_IDS[j]).sum() * np.prod(spacing_from_affine(aff)) / 1000), ref[:, j]))
        dbs = f"{len(cands)}, {np.nanmin(pct_db):.2f}–{np.nanmax(pct_db):.2f}" if pct_db else "0, –"
        out.append(f"| {j} | {name} | {_spearman(req, [x['v_post'] for x in r]):.2f} | {med('pct')} | "
                   f"{np.mean([x['v_post'] == 0 for x in r]):.0%} | {np.mean([x['pieces'] > 1 for x in r]):.0%} | "
                   f"{np.median(rel) if rel else float('nan'):+.0%} | {np.mean([x['changed'] for x in r]):.1%} | "
                   f"{_spearman(req, [x['v_phantom'] for x in r]):.2f} | {med('pct_phantom')} | {dbs} |")
    print(f"{len(jobs)} generated masks ({a.seeds} seeds x {len(a.levels)} levels x 10 slots), {a.steps} DDPM steps, "
          f"sampling {t_sample:.0f} s on {a.device} ({torch.get_num_threads()} threads)\n")
    print("\n".join(out))
    print("\n" + "\n".join(autoencoder_table(nets, grid, sp)))
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__": main()
