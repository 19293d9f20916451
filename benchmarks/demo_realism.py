"""Realism of a demo model: generated CT against the paired held-out phantoms and the real chest CT.

Every held-out phantom mask (`maisi_nb.demo.holdout_masks`, the recipe's held-out seed, as benchmarks/demo_quality.py)
is used as a user mask, one attempt each, at every step count in --steps (same noise seed per mask for all step
counts). The real chest CT (LIDC-IDRI, CC BY 3.0) at the model's spacing is generated from its own mapped mask.
Per row:
  - median HU error per organ group against the paired reference (bone, liver, spleen, kidney, pancreas, lung, body),
    the bone median as a share of the reference's, and the mean soft-organ error (liver, spleen, kidney, pancreas)
  - air holes: share of voxels below -500 HU inside solid-tissue labels (organs, vessels, bone, muscle, heart, ...)
  - texture: std of (image - its 3x3x3 median) inside eroded organ masks, divided by the paired reference's
  - latent texture: std of (latent - its 3x3x3 mean) of the sampled latent, divided by that of the encoded phantom
  - 2.5D KID (unbiased MMD^2, kernel (x.y/d + 1)^3) and FID with the offline HED-VGG16 features (conv5_3, central
    half of the slices of each plane) against the paired held-out phantom images; KID's spread from paired half-subsets
  - QC pass rate with one attempt, seconds per volume
--diagnose adds where the anatomy is lost, stage by stage: the autoencoder round trip, latent statistics against the
scale factor, the diffusion UNet without its ControlNet, and ControlNet sampling at each step count.

    python benchmarks/demo_realism.py [--model DIR ...] [--baseline DIR] [--n-masks 12] [--steps 30 5 1] [--threads 2]
                                      [--phase-modality] [--diagnose] [--out table.md|results.json] [--seed 0]
The first rows are the reference model's (the bundled demo model, or --baseline); the KID target is half of its KID.
"""
import argparse, copy, json, math, sys, time, warnings
from pathlib import Path
import numpy as np
import torch
from scipy import ndimage as ndi
from maisi_nb.demo import DEMO_RECIPE, check_recipe, holdout_masks, holdout_phase, without_controlnet
from maisi_nb.phantoms import parse_region_choices
from maisi_nb.inference import MaisiPipeline, demo_model_dir
from maisi_nb.labels import BODY_ID, LABELS, MODALITIES
from maisi_nb.data import load_example_ct
from maisi_nb.diffusion import encode_latent
from maisi_nb.vae import channel_snr
from maisi_nb.networks import decode_latents, to_hu
from maisi_nb.qc import fid_from_features
from maisi_nb.utils import atomic_path
try: from maisi_nb.hu_qc import ORGAN_GROUPS
except ImportError: from maisi_nb.qc import ORGAN_GROUPS
from maisi_nb.features import hu_to_unit
try: from maisi_nb.features import PLANES, extract_features_2p5d, load_feature_network, network_info, plane_slices, preprocess_slices
except ImportError: from maisi_nb.qc import PLANES, extract_features_2p5d, load_feature_network, network_info, plane_slices, preprocess_slices

GROUPS = {**{g: tuple(ORGAN_GROUPS[g]) for g in ("bone", "liver", "spleen", "kidney", "pancreas", "lung")},
          "body": (BODY_ID,)}  # body: soft tissue not covered by another label (fat, muscle, skin)
SOFT = ("liver", "spleen", "kidney", "pancreas")
SOLID_KINDS = ("organ", "kidney", "vessel", "vertebra", "rib", "bone", "muscle", "cardiac", "neuro", "urogenital", "tumor")
SOLID_IDS = tuple(i for i, (_, kind) in LABELS.items() if kind in SOLID_KINDS)  # no lungs, airways, bowel (gas), body
TEXTURE_IDS = tuple(i for g in SOFT for i in GROUPS[g]) + tuple(i for i, (_, k) in LABELS.items() if k in ("muscle", "cardiac"))
LAYERS = {"conv3_3": slice(0, 256), "conv4_3": slice(256, 768), "conv5_3": slice(768, 1280)}  # channels of LayerFeatures
HEADLINE = "conv5_3"
MIN_VOXELS = 8  # a group counts in a volume from this many voxels
HOLE_HU = -500.0
TARGETS = {"bone_ratio": 0.85, "soft_err": 25.0, "air_holes": 0.005, "kid_share": 0.5, "psnr_phantoms": 32.0,
           "psnr_real": 28.0, "qc_pass": 0.95}
MEASURES = {  # name -> (label, lower is better)
    "kid": (f"KID ({HEADLINE})", True), "fid": (f"FID ({HEADLINE})", True),
    **{f"kid_{l}": (f"KID ({l})", True) for l in ("conv3_3", "conv4_3")}, "texture_gap": ("|1 - texture ratio|", True),
    "latent_texture_gap": ("|1 - latent texture ratio|", True), "bone_gap": ("|1 - bone ratio|", True),
    "soft_err": ("soft-organ error", True), "air_holes": ("air holes", True)}


# ---------------------------------------------------------------- measures of one volume
def group_medians(img:np.ndarray, lab:np.ndarray) -> dict:
    "Median HU per group (None where the group has fewer than MIN_VOXELS voxels)."
    out = {}
    for g, ids in GROUPS.items():
        v = img[np.isin(lab, ids)]
        out[g] = float(np.median(v)) if v.size >= MIN_VOXELS else None
    return out

def air_holes(img:np.ndarray, lab:np.ndarray) -> tuple:
    "(voxels below HOLE_HU, voxels) inside solid-tissue labels."
    m = np.isin(lab, SOLID_IDS)
    return int((img[m] < HOLE_HU).sum()), int(m.sum())

def interior(lab:np.ndarray, ids=TEXTURE_IDS) -> np.ndarray:
    "Voxels of `ids` whose 6-neighbours carry the same label (each label eroded on its own: no edges between organs)."
    out = np.zeros(lab.shape, bool)
    for i in np.intersect1d(np.unique(lab), ids): out |= ndi.binary_erosion(lab == i)
    return out

def texture(img:np.ndarray, inside:np.ndarray) -> float|None:
    "Std (HU) of the image minus its 3x3x3 median inside `inside` (fine-scale residual), None if too few voxels."
    if inside.sum() < 50: return None
    return float((img - ndi.median_filter(img, size=3))[inside].std())

def latent_texture(z:torch.Tensor) -> float:
    "Std of a (1,C,x,y,z) latent minus its 3x3x3 mean (fine-scale latent energy)."
    z = z.float()
    return float((z - torch.nn.functional.avg_pool3d(z, 3, 1, 1, count_include_pad=False)).std())

def psnr(img:np.ndarray, ref:np.ndarray) -> float:
    "PSNR (dB) of HU volumes mapped to [0,1] over -1000..1000 HU (the autoencoder's window)."
    u = lambda v: (np.clip(v, -1000, 1000) + 1000) / 2000
    return float(10 * np.log10(1.0 / max(np.mean((u(img) - u(ref)) ** 2), 1e-12)))

def compare(img:np.ndarray, ref:np.ndarray, lab:np.ndarray, ref_stats:dict=None) -> dict:
    "Every per-volume measure of `img` against the reference `ref` on the label map `lab`."
    rs = ref_stats or reference_stats(ref, lab)
    med, holes = group_medians(img, lab), air_holes(img, lab)
    tex = texture(img, rs["inside"])
    err = {g: None if med[g] is None or rs["medians"][g] is None else abs(med[g] - rs["medians"][g]) for g in GROUPS}
    soft = [err[g] for g in SOFT if err[g] is not None]
    return {"medians": med, "errors": err, "soft_err": float(np.mean(soft)) if soft else None,
            "bone_ratio": None if med["bone"] is None or not rs["medians"]["bone"] else med["bone"] / rs["medians"]["bone"],
            "holes": holes[0], "solid": holes[1], "texture": tex,
            "texture_ratio": None if tex is None or not rs["texture"] else tex / rs["texture"], "psnr": psnr(img, ref)}

def reference_stats(ref:np.ndarray, lab:np.ndarray) -> dict:
    inside = interior(lab)
    return {"medians": group_medians(ref, lab), "inside": inside, "texture": texture(ref, inside), "holes": air_holes(ref, lab)}


# ---------------------------------------------------------------- KID / FID over sets of volumes
def kid_poly(x:torch.Tensor, y:torch.Tensor) -> float:
    "Unbiased MMD^2 between feature sets x (m,d) and y (n,d) with the kernel (x.y/d + 1)^3 (Binkowski et al. 2018)."
    x, y = x.double(), y.double()
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b.T / d + 1) ** 3
    kxx, kyy = k(x, x), k(y, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * k(x, y).mean())


class LayerFeatures(torch.nn.Module):
    "HED-VGG16 slices -> spatially averaged conv3_3, conv4_3 and conv5_3 maps, concatenated (one forward pass)."
    def __init__(self, net):
        super().__init__()
        self.net, self.default_preprocessing = net, net.default_preprocessing
    def forward(self, x): return torch.cat([o.mean((2, 3)) for o in self.net.stages(x)[2:]], 1)

def _unit(v:torch.Tensor) -> torch.Tensor:
    "Rows scaled to length sqrt(d), so that the kernel's x.y/d is a cosine."
    # pooled VGG maps are heavy-tailed: the cubic kernel on raw ones is ruled by a few bright slices (measured: it ranked
    # the UNet without ControlNet above the ControlNet-conditioned samples and close to the autoencoder round trip)
    v = v.double()
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12) * v.shape[1] ** 0.5

def _cat(feats:list, idx, layer:str) -> dict:
    return {p: _unit(torch.cat([feats[i][p][:, LAYERS[layer]] for i in idx])) for p in feats[0]}

def kid(gen:list, ref:list, layer:str, idx=None) -> float:
    "KID averaged over planes, between per-volume feature dicts `gen` and `ref` (volumes `idx`, default all)."
    idx = range(len(gen)) if idx is None else idx
    g, r = _cat(gen, idx, layer), _cat(ref, idx, layer)
    return float(np.mean([kid_poly(g[p], r[p]) for p in g]))

def half_subsets(n:int, k:int, seed:int) -> list:
    "k random subsets of n//2 volume indices (paired: the same masks on both sides)."
    rng = np.random.default_rng([seed, 7])
    return [np.sort(rng.choice(n, max(n // 2, 2), replace=False)) for _ in range(k)]

def set_scores(gen:list, ref:list, subsets:list) -> dict:
    "KID per layer (all volumes) with its values on the half-subsets, and FID (all volumes) of the headline layer."
    ks = {l: {"kid": kid(gen, ref, l), "kid_subsets": [kid(gen, ref, l, s) for s in subsets]} for l in LAYERS}
    all_ = range(len(gen))
    fid = fid_from_features({p: v.float() for p, v in _cat(gen, all_, HEADLINE).items()},
                            {p: v.float() for p, v in _cat(ref, all_, HEADLINE).items()})["avg"]
    return {"kid": ks[HEADLINE]["kid"], "kid_subsets": ks[HEADLINE]["kid_subsets"], "kid_layers": ks, "fid": fid}


# ---------------------------------------------------------------- data
def unit_image(img:np.ndarray) -> torch.Tensor:
    "(1,1,X,Y,Z) autoencoder input from HU (`hu_to_unit`)."
    return torch.as_tensor(hu_to_unit(img), dtype=torch.float32)[None, None]

def fit_grid(img:np.ndarray, lab:np.ndarray, affine:np.ndarray, size) -> tuple:
    "Pad (air, at the end) or centre-crop a volume and its label to `size`; the affine follows the crop."
    aff, sl, pads = np.array(affine, float), [], []
    for n, s in zip(img.shape, size):
        lo = max((n - s) // 2, 0); sl.append(slice(lo, lo + min(n, s))); pads.append((0, max(s - n, 0)))
    aff[:3, 3] += aff[:3, :3] @ np.array([s.start for s in sl], float)
    img = np.pad(img[tuple(sl)], pads, constant_values=-1000.0)
    return img.astype(np.float32), np.pad(lab[tuple(sl)], pads).astype(np.uint8), aff

def model_recipe(d:Path) -> tuple:
    "(recipe, note): the model's training recipe, else the demo recipe at the model's own grid."
    f = d / "training.json"
    if f.is_file(): return check_recipe(json.loads(f.read_text())["recipe"]), ""
    return copy.deepcopy(DEMO_RECIPE), f"{f} missing: held-out masks from the demo recipe"


# ---------------------------------------------------------------- one model
class Run:
    "Generations, measures and features of one model over the held-out masks and the real CT."
    def __init__(self, a, d:Path, name:str, net):
        self.a, self.d, self.name, self.net = a, d, name, net
        self.pipe = MaisiPipeline.from_pretrained(d, device="cpu")
        self.recipe, self.note = model_recipe(d)
        self.recipe.update(output_size=list(self.pipe.output_size), spacing=list(self.pipe.spacing))
        if a.body_regions: self.recipe["phantoms"]["body_regions"] = a.body_regions   # the same held-out masks for every model
        t = time.time()
        self.masks = holdout_masks(self.recipe, a.n_masks)  # (label, affine, regions, phantom image)
        self.phases = [holdout_phase(self.recipe, i) for i in range(a.n_masks)]
        self.refs = [reference_stats(m[3], m[0]) for m in self.masks]
        self.ref_feats = [self.features(m[3]) for m in self.masks]
        self.subsets = half_subsets(a.n_masks, a.kid_subsets, a.seed)
        ct = load_example_ct(spacing=self.pipe.spacing)
        self.real = fit_grid(ct.image, ct.label, ct.affine, self.pipe.output_size)  # (image, label, affine)
        self.real_ref = reference_stats(self.real[0], self.real[1])
        self.seconds = {"references": time.time() - t}
        self.enc = [self.encode(m[3]) for m in self.masks]  # encoded phantom latents (diffusion space)
        self.recs = [self.decode(z) for z in self.enc]  # their round trip through the autoencoder (HU)
        self.rec_medians = [group_medians(r, m[0]) for r, m in zip(self.recs, self.masks)]

    @torch.no_grad()
    def features(self, img:np.ndarray) -> dict:
        "{plane: (N, 1280)} slice features of the central slices; a fixed -1000..1000 HU window or MAISI's joint min-max."
        if self.a.window == "maisi": return extract_features_2p5d(img, self.net, center_slices_ratio=self.a.slices_ratio)
        v, pre, out = torch.as_tensor(np.clip(img, -1000, 1000), dtype=torch.float32), self.net.default_preprocessing, {}
        for p in PLANES:
            sl = plane_slices(v, p, self.a.slices_ratio)
            out[p] = torch.cat([self.net(preprocess_slices(sl[i:i + 16], pre, -1000.0, 1000.0)) for i in range(0, len(sl), 16)])
        return out

    @property
    def knows_phase(self) -> bool:
        "Trained on contrast phases: its default modality is a phase, not plain ct (1); a model that never saw a phase code gets ct."
        return int(self.pipe.default_modality) != MODALITIES["ct"]

    def modality(self, i:int|None):
        if not self.a.phase_modality or i is None or not self.knows_phase: return MODALITIES["ct"]
        return MODALITIES[self.phases[i]]

    @torch.no_grad()
    def encode(self, img:np.ndarray) -> torch.Tensor:
        "Encoded mean latent (1,4,x,y,z) in diffusion space (times the scale factor)."
        return encode_latent(self.pipe.autoencoder, unit_image(img)) * float(self.pipe.scale_factor)

    @torch.no_grad()
    def decode(self, z:torch.Tensor, lab:np.ndarray=None) -> np.ndarray:
        hu = to_hu(decode_latents(self.pipe.autoencoder, z, self.pipe.scale_factor),
                   None if lab is None else torch.as_tensor(lab.astype(np.int64))[None, None])
        return hu[0, 0].numpy().astype(np.float32)

    def generate(self, pipe:MaisiPipeline, lab, aff, steps:int, seed:int, i:int|None) -> tuple:
        "(HU volume, final latent, QC passed, seconds) for one mask."
        last = {}
        t = time.time()
        res = pipe(mask=(lab, aff), mask_source="user", num_inference_steps=steps, seed=seed, max_attempts=1,
                   modality=self.modality(i), progress_bar=False, callback=lambda e: last.update(z=e["latents"].clone()))
        s = res.samples[0]
        return s.image, last["z"], bool(s.qc.passed), time.time() - t

    def phantom_row(self, pipe:MaisiPipeline, steps:int, with_features:bool=True) -> dict:
        "Measures of `pipe` at `steps` over the held-out masks."
        per, feats, lat, qc, secs = [], [], [], [], []
        for i, (lab, aff, regs, ref) in enumerate(self.masks):
            img, z, ok, s = self.generate(pipe, lab, aff, steps, self.a.seed + i, i)
            per.append(compare(img, ref, lab, self.refs[i])); qc.append(ok); secs.append(s)
            lat.append({"std": float(z.std()), "mean": float(z.mean()),
                        "texture_ratio": latent_texture(z) / latent_texture(self.enc[i])})
            if with_features: feats.append(self.features(img))
        row = summarise(per) | {"qc_pass": float(np.mean(qc)), "seconds_per_volume": float(np.mean(secs)),
                                "latent_std": float(np.mean([l["std"] for l in lat])),
                                "latent_texture_ratio": float(np.mean([l["texture_ratio"] for l in lat])),
                                "per_mask": [{"bone_ratio": p["bone_ratio"], "soft_err": p["soft_err"],
                                              "texture_ratio": p["texture_ratio"], "holes": p["holes"], "solid": p["solid"],
                                              "latent_texture_ratio": l["texture_ratio"]} for p, l in zip(per, lat)]}
        if with_features: row |= set_scores(feats, self.ref_feats, self.subsets)
        row |= self.versus_autoencoder(per)
        return row

    def versus_autoencoder(self, per:list) -> dict:
        "Bone median / the autoencoder round trip's, and the soft-organ median error against it (what sampling loses)."
        bone, soft = [], []
        for p, rm in zip(per, self.rec_medians):
            if p["medians"]["bone"] is not None and rm["bone"]: bone.append(p["medians"]["bone"] / rm["bone"])
            e = [abs(p["medians"][g] - rm[g]) for g in SOFT if p["medians"][g] is not None and rm[g] is not None]
            if e: soft.append(np.mean(e))
        return {"bone_vs_ae": float(np.mean(bone)) if bone else None, "soft_err_vs_ae": float(np.mean(soft)) if soft else None}

    def real_row(self, pipe:MaisiPipeline, steps:int) -> dict:
        "Measures of `pipe` at `steps` on the real CT's own mask, over --real-seeds noise seeds."
        img_ref, lab, aff = self.real
        per = [compare(self.generate(pipe, lab, aff, steps, self.a.seed + k, None)[0], img_ref, lab, self.real_ref)
               for k in range(self.a.real_seeds)]
        return summarise(per)

    def autoencoder_rows(self) -> dict:
        "Round trip through the autoencoder: held-out phantoms and the real CT (outside the body kept as decoded)."
        per, feats = [], []
        for (lab, aff, regs, ref), rec, rs in zip(self.masks, self.recs, self.refs):
            per.append(compare(rec, ref, lab, rs)); feats.append(self.features(rec))
        ph = summarise(per) | set_scores(feats, self.ref_feats, self.subsets) | {"latent_texture_ratio": 1.0}
        img_ref, lab, _ = self.real
        real = summarise([compare(self.decode(self.encode(img_ref)), img_ref, lab, self.real_ref)])
        return {"phantoms": ph, "real_ct": real}

    def latent_stats(self) -> dict:
        "Statistics of the encoded latents in diffusion space (a scale factor of 1/std gives std 1)."
        z = torch.cat([e.flatten() for e in self.enc])
        zr = self.encode(self.real[0])
        raw = z / float(self.pipe.scale_factor)
        return {"scale_factor": float(self.pipe.scale_factor), "phantom_std": float(z.std()), "phantom_mean": float(z.mean()),
                "phantom_channel_std": [float(torch.cat([e[0, c].flatten() for e in self.enc]).std()) for c in range(self.enc[0].shape[1])],
                "ideal_scale_factor": float(1 / raw.std()), "real_std": float(zr.std()), "real_mean": float(zr.mean()),
                "posterior_snr": self.posterior_snr()}

    @torch.no_grad()
    def posterior_snr(self) -> list:
        "`channel_snr` pooled over the held-out phantoms (near 1 or below: the channel carries little beyond the prior's noise)."
        mus, sigmas = zip(*[self.pipe.autoencoder.encode(unit_image(m[3])) for m in self.masks])
        return channel_snr(torch.cat([m.flatten(2) for m in mus], 2), torch.cat([s.flatten(2) for s in sigmas], 2))[0].tolist()


def summarise(per:list) -> dict:
    "Row summary of per-volume comparisons."
    mean = lambda k: (lambda v: float(np.mean(v)) if v else None)([p[k] for p in per if p[k] is not None])
    errs = {g: (lambda v: float(np.mean(v)) if v else None)([p["errors"][g] for p in per if p["errors"][g] is not None])
            for g in GROUPS}
    holes, solid = sum(p["holes"] for p in per), sum(p["solid"] for p in per)
    return {"n": len(per), "errors": errs, "soft_err": mean("soft_err"), "bone_ratio": mean("bone_ratio"),
            "bone_median": mean_med(per, "bone"), "air_holes": holes / max(solid, 1), "texture": mean("texture"),
            "texture_ratio": mean("texture_ratio"), "psnr": mean("psnr")}

def mean_med(per, g):
    v = [p["medians"][g] for p in per if p["medians"][g] is not None]
    return float(np.mean(v)) if v else None


# ---------------------------------------------------------------- formatting
def f(v, fmt="{:.2f}", none="-"):
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)

def kid_cell(r:dict) -> str:
    if "kid" not in r: return "-"
    return f"{1000 * r['kid']:.2f} ± {1000 * np.std(r['kid_subsets']):.2f}"

def realism_table(rows:list) -> str:
    h = ["| model | steps | bone / phantom | soft-organ err (HU) | air holes | texture ratio | latent texture ratio | "
         "KID×1000 (± half-set sd) | FID | QC pass | s / volume |", "|" + "---|" * 11]
    for name, steps, r in rows:
        h.append(f"| {name} | {steps} | {f(r['bone_ratio'])} | {f(r['soft_err'], '{:.0f}')} | {f(r['air_holes'], '{:.2%}')} | "
                 f"{f(r['texture_ratio'])} | {f(r.get('latent_texture_ratio'))} | {kid_cell(r)} | {f(r.get('fid'), '{:.1f}')} | "
                 f"{f(r.get('qc_pass'), '{:.0%}')} | {f(r.get('seconds_per_volume'), '{:.1f}')} |")
    return "\n".join(h)

def hu_table(rows:list) -> str:
    h = ["| model | steps | " + " | ".join(GROUPS) + " |", "|" + "---|" * (2 + len(GROUPS))]
    for name, steps, r in rows:
        h.append(f"| {name} | {steps} | " + " | ".join(f(r["errors"][g], "{:.0f}") for g in GROUPS) + " |")
    return "\n".join(h)

def real_table(rows:list) -> str:
    h = ["| model | steps | bone / real | soft-organ err (HU) | " + " | ".join(f"{g} err" for g in GROUPS)
         + " | air holes | texture ratio |", "|" + "---|" * (6 + len(GROUPS))]
    for name, steps, r in rows:
        h.append(f"| {name} | {steps} | {f(r['bone_ratio'])} | {f(r['soft_err'], '{:.0f}')} | "
                 + " | ".join(f(r["errors"][g], "{:.0f}") for g in GROUPS)
                 + f" | {f(r['air_holes'], '{:.2%}')} | {f(r['texture_ratio'])} |")
    return "\n".join(h)

def diagnosis_table(rows:list) -> str:
    h = ["| stage | bone median (HU) | bone / phantom | bone / AE round trip | soft-organ err (HU) | soft-organ err vs AE round trip (HU) | "
         "air holes | texture ratio | PSNR vs phantom (dB) | latent std | latent texture ratio | KID×1000 |", "|" + "---|" * 12]
    for name, r in rows:
        h.append(f"| {name} | {f(r.get('bone_median'), '{:.0f}')} | {f(r.get('bone_ratio'))} | {f(r.get('bone_vs_ae'))} | "
                 f"{f(r.get('soft_err'), '{:.0f}')} | {f(r.get('soft_err_vs_ae'), '{:.0f}')} | "
                 f"{f(r.get('air_holes'), '{:.2%}')} | {f(r.get('texture_ratio'))} | {f(r.get('psnr'), '{:.1f}')} | "
                 f"{f(r.get('latent_std'))} | {f(r.get('latent_texture_ratio'))} | {kid_cell(r)} |")
    return "\n".join(h)


# ---------------------------------------------------------------- verdicts
def measure_values(r:dict) -> dict:
    "Per measure: (value over the set, per-mask or per-subset values) for the discrimination check."
    pm = r["per_mask"]
    gap = lambda k: [abs(1 - p[k]) if p[k] is not None else None for p in pm]
    holes = [p["holes"] / max(p["solid"], 1) for p in pm]
    out = {"texture_gap": (abs(1 - r["texture_ratio"]), gap("texture_ratio")),
           "latent_texture_gap": (abs(1 - r["latent_texture_ratio"]), gap("latent_texture_ratio")),
           "bone_gap": (abs(1 - r["bone_ratio"]), gap("bone_ratio")),
           "soft_err": (r["soft_err"], [p["soft_err"] for p in pm]), "air_holes": (r["air_holes"], holes)}
    if "kid" in r:
        out["kid"] = (r["kid"], r["kid_subsets"])
        out |= {f"kid_{l}": (v["kid"], v["kid_subsets"]) for l, v in r["kid_layers"].items() if l != HEADLINE}
    if "fid" in r: out["fid"] = (r["fid"], None)
    return out

def discriminates(best:dict, worst:dict) -> dict:
    "Per measure: is `worst` (few steps) clearly worse than `best` (most steps)? >=1.5x and worse in >=90 % of pairs."
    vb, vw, out = measure_values(best), measure_values(worst), {}
    for k in vb:
        (b, bs), (w, ws) = vb[k], vw[k]
        pairs = [] if bs is None else [(x, y) for x, y in zip(bs, ws) if x is not None and y is not None]
        share = float(np.mean([y > x for x, y in pairs])) if pairs else None
        ratio = w / b if b else float("inf") if w else 1.0
        clear = ratio >= 1.5 and (share is None or share >= 0.9)
        out[k] = {"best": b, "worst": w, "ratio": ratio, "worse_share": share, "clear": bool(clear)}
    return out

def verdict_lines(name:str, rows:dict, ae:dict, base_kid:float|None, is_base:bool, phase_given:bool) -> tuple:
    "Targets with PASS/FAIL for one model (at its most steps), and the discrimination check."
    steps = sorted(rows); hi, lo = steps[-1], steps[0]
    r = rows[hi]
    ok = lambda c: "PASS" if c else "FAIL"
    L = [f"**Targets: {name}, {hi} steps**", ""]
    L.append(f"- bone median >= {TARGETS['bone_ratio']}x the paired phantom's: {f(r['bone_ratio'])} -> {ok(r['bone_ratio'] >= TARGETS['bone_ratio'])}")
    L.append(f"- soft-organ median error <= {TARGETS['soft_err']:.0f} HU: {f(r['soft_err'], '{:.0f}')} HU -> {ok(r['soft_err'] <= TARGETS['soft_err'])}"
             + ("" if phase_given else " (contrast phase not given to the model)"))
    L.append(f"- air holes <= {TARGETS['air_holes']:.1%}: {r['air_holes']:.2%} -> {ok(r['air_holes'] <= TARGETS['air_holes'])}")
    if is_base or base_kid is None:
        L.append(f"- KID vs held-out phantoms <= half the reference model's: {'this is the reference model' if is_base else 'no reference-model row in this run'} "
                 f"(KID×1000 {1000 * r['kid']:.2f}; target for a new model <= {500 * r['kid'] if is_base else float('nan'):.2f}) -> n/a")
    else:
        L.append(f"- KID vs held-out phantoms <= half the reference model's ({1000 * base_kid:.2f} -> <= {500 * base_kid:.2f}): "
                 f"{1000 * r['kid']:.2f} -> {ok(r['kid'] <= TARGETS['kid_share'] * base_kid)}")
    disc = discriminates(r, rows[lo]) if lo != hi else {}
    if disc:
        k = disc["kid"]
        L.append(f"- {lo} step(s) clearly worse than {hi} steps on KID (>=1.5x and worse in >=90 % of paired half-subsets): "
                 f"KID×1000 {1000 * k['worst']:.2f} vs {1000 * k['best']:.2f} (x{k['ratio']:.2f}, worse in {k['worse_share']:.0%}) -> {ok(k['clear'])}")
        fd, tx = disc["fid"], disc["texture_gap"]
        L.append(f"  - FID: {fd['worst']:.1f} vs {fd['best']:.1f} (x{fd['ratio']:.2f}) -> {'clearly worse' if fd['clear'] else 'NOT clearly worse'}")
        L.append(f"- {lo} step(s) clearly worse than {hi} steps on fine-scale texture (|1 - texture ratio|, >=1.5x and worse on >=90 % of masks): "
                 f"{tx['worst']:.3f} vs {tx['best']:.3f} (x{tx['ratio']:.2f}, worse on {tx['worse_share']:.0%}) -> {ok(tx['clear'])}")
    L.append(f"- autoencoder PSNR >= {TARGETS['psnr_phantoms']:.0f} dB on held-out phantoms: {ae['phantoms']['psnr']:.1f} dB -> {ok(ae['phantoms']['psnr'] >= TARGETS['psnr_phantoms'])}")
    L.append(f"- autoencoder PSNR >= {TARGETS['psnr_real']:.0f} dB on the real chest CT: {ae['real_ct']['psnr']:.1f} dB -> {ok(ae['real_ct']['psnr'] >= TARGETS['psnr_real'])}")
    L.append(f"- QC pass rate >= {TARGETS['qc_pass']:.0%} with one attempt: {r['qc_pass']:.0%} -> {ok(r['qc_pass'] >= TARGETS['qc_pass'])}")
    if disc:
        L += ["", f"Does {lo} step score clearly worse than {hi} steps? (clearly: >=1.5x worse, and worse on >=90 % of masks or paired half-subsets)", "",
              f"| measure (lower is better) | {hi} steps | {lo} step(s) | ratio | worse share | clearly worse |", "|---|---|---|---|---|---|"]
        for k, v in disc.items():
            L.append(f"| {MEASURES[k][0]} | {v['best']:.4g} | {v['worst']:.4g} | {v['ratio']:.2f} | {f(v['worse_share'], '{:.0%}')} | {'yes' if v['clear'] else 'no'} |")
        yes = [MEASURES[k][0] for k, v in disc.items() if v["clear"]]
        L += ["", f"Measures on which {lo} step(s) is clearly worse: {', '.join(yes) if yes else 'none'}."
              + ("" if disc["kid"]["clear"] else f" KID does not separate {lo} from {hi} steps for this model.")]
    return L, disc


# ---------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, help="saved pipeline folder (repeatable; default: the bundled demo model)")
    p.add_argument("--no-baseline", action="store_true", help="with --model: do not add the bundled model as the reference rows")
    p.add_argument("--baseline", default=None, help="saved pipeline folder to compare the others with (default: the bundled demo model), "
                   "e.g. the previous model after a new one is bundled")
    p.add_argument("--n-masks", type=int, default=12, help="held-out phantom masks (default 12)")
    p.add_argument("--steps", type=int, nargs="+", default=[30, 5, 1], help="rectified-flow step counts (default 30 5 1)")
    p.add_argument("--real-seeds", type=int, default=2, help="noise seeds on the real CT's mask (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of mask i is seed + i (default 0)")
    p.add_argument("--slices-ratio", type=float, default=0.5, help="central fraction of slices per plane for KID/FID (default 0.5)")
    p.add_argument("--window", choices=("fixed", "maisi"), default="fixed",
                   help="slice intensity scaling for KID/FID: fixed -1000..1000 HU (default) or MAISI's per-volume min-max")
    p.add_argument("--kid-subsets", type=int, default=50, help="paired half-subsets for KID's spread (default 50)")
    p.add_argument("--phase-modality", action="store_true",
                   help="give each phantom's contrast phase as MAISI's modality (ct_wo_contrast 2, ct_contrast 3) instead of ct (1), "
                        "to models trained on phases (a model whose default modality is ct never saw a phase code and gets ct)")
    p.add_argument("--body-regions", nargs="+", default=None,
                   help="body-region choices of the held-out masks for every model (default: each model's own recipe), "
                        "e.g. chest abdomen chest,abdomen abdomen,lower to compare models trained on different regions on the same masks")
    p.add_argument("--diagnose", action="store_true", help="add the stage-by-stage diagnosis")
    p.add_argument("--out", default=None, help="also write the results: .json (everything) or markdown (the tables)")
    a = p.parse_args(argv)
    if a.n_masks < 4: p.error(f"--n-masks: got {a.n_masks}; allowed: 4 or more (KID needs two volumes per half-subset)")
    if any(s < 1 for s in a.steps): p.error(f"--steps: got {a.steps}; allowed: positive integers")
    if a.threads < 1: p.error(f"--threads: got {a.threads}; allowed: 1 or more")
    if a.real_seeds < 0: p.error(f"--real-seeds: got {a.real_seeds}; allowed: 0 or more")
    if not 0 < a.slices_ratio <= 1: p.error(f"--slices-ratio: got {a.slices_ratio}; allowed: (0, 1]")
    if a.kid_subsets < 2: p.error(f"--kid-subsets: got {a.kid_subsets}; allowed: 2 or more")
    if a.body_regions:
        try: parse_region_choices(a.body_regions, "--body-regions")
        except ValueError as e: p.error(str(e))
    bundled = demo_model_dir()
    if a.baseline:
        if not (Path(a.baseline) / "pipeline.json").is_file(): p.error(f"--baseline: {a.baseline} is not a saved pipeline folder (no pipeline.json)")
        if a.no_baseline: p.error("--baseline and --no-baseline: give one of them")
        bundled = Path(a.baseline)
    models = [Path(m) for m in (a.model or [])]
    if bundled is not None and (not models or not a.no_baseline) and all(m.resolve() != bundled.resolve() for m in models):
        models.insert(0, bundled)
    if not models: p.error("--model: no demo model bundled (maisi_nb/demo_model/pipeline.json missing); pass a saved pipeline folder")
    for m in models:
        if not (m / "pipeline.json").is_file(): p.error(f"--model: {m} is not a saved pipeline folder (no pipeline.json)")
    if a.out and Path(a.out).is_dir(): p.error(f"--out: {a.out} is a folder; give a .json or .md file")
    a.steps = sorted(set(a.steps), reverse=True)
    return a, models, bundled


def main(argv=None):
    a, models, bundled = parse(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # scipy's sqrtm(disp=...) inside MONAI's FID
    torch.set_num_threads(a.threads)
    t_all = time.time()
    hed = load_feature_network("hed_vgg16")
    info, net = network_info(hed), LayerFeatures(hed).eval()
    results, rows, hu_rows, real_rows, diag, verdicts = {}, [], [], [], {}, []
    base_kid = None
    for d in models:
        is_base = bundled is not None and d.resolve() == bundled.resolve()
        name = d.name if a.baseline or not is_base else "bundled demo model"
        t0 = time.time()
        run = Run(a, d, name, net)
        if run.note: print(f"note: {run.note}", file=sys.stderr)
        res = {"phantoms": {}, "real_ct": {}, "grid": [run.pipe.output_size, run.pipe.spacing], "phase_given": a.phase_modality and run.knows_phase,
               "phases": run.phases, "regions": ["+".join(m[2]) for m in run.masks]}
        log = lambda what: print(f"[{time.time() - t_all:.0f} s] {name}: {what}", file=sys.stderr, flush=True)
        log("references ready")
        for s in a.steps:
            res["phantoms"][s] = run.phantom_row(run.pipe, s); log(f"{s} steps on the held-out masks")
            rows.append((name, s, res["phantoms"][s])); hu_rows.append((name, s, res["phantoms"][s]))
            if a.real_seeds:
                res["real_ct"][s] = run.real_row(run.pipe, s); real_rows.append((name, s, res["real_ct"][s]))
        res["autoencoder"] = ae = run.autoencoder_rows(); log("autoencoder round trip")
        if is_base: base_kid = res["phantoms"][a.steps[0]]["kid"]
        if a.diagnose:
            hi = a.steps[0]
            res["no_controlnet"] = nc = run.phantom_row(without_controlnet(run.pipe), hi)
            res["latents"] = lat = run.latent_stats()
            ref = summarise([compare(m[3], m[3], m[0], rs) for m, rs in zip(run.masks, run.refs)])
            drows = [(f"held-out phantoms (reference, n={a.n_masks})", ref | {"psnr": None, "latent_std": lat["phantom_std"], "latent_texture_ratio": 1.0}),
                     ("autoencoder round trip (encode mean, decode)", ae["phantoms"] | {"latent_std": lat["phantom_std"], "bone_vs_ae": 1.0, "soft_err_vs_ae": 0.0}),
                     (f"diffusion UNet without ControlNet, {hi} steps", nc)]
            drows += [(f"UNet + ControlNet, {s} step{'s' if s > 1 else ''}", res["phantoms"][s]) for s in a.steps]
            diag[name] = (drows, lat, ae)
        res["seconds"] = time.time() - t0
        results[name] = res
        verdicts.append((name, res, ae, is_base))
    # -------- print
    out = [f"# Demo realism: {a.n_masks} held-out phantom masks, steps {a.steps}, one attempt each, seed {a.seed}, "
           f"{torch.get_num_threads()} threads", "",
           f"Features: {info.get('network')} (offline BSDS500 weights, sha256 {str(info.get('weights_sha256'))[:12]}), "
           f"spatially averaged {', '.join(LAYERS)} maps of the central {a.slices_ratio:.0%} of the slices of each plane, "
           f"{'a fixed -1000..1000 HU window' if a.window == 'fixed' else 'MAISI per-volume min-max scaling'}, each slice's vector "
           f"scaled to length sqrt(d); KID and FID on {HEADLINE}, against the paired held-out phantom images. "
           f"Modality given: {'the phantom contrast phase to models trained on phases, ct (1) to the others' if a.phase_modality else 'ct (1) for every mask'}.", ""]
    for name, res, _, _ in verdicts:
        ph = res["phases"]
        out.append(f"Held-out phantoms of {name} (grid {res['grid'][0]} at {res['grid'][1]} mm): "
                   + ", ".join(f"{i}: {r} ({'contrast' if p == 'ct_contrast' else 'plain'})" for i, (r, p) in enumerate(zip(res["regions"], ph)))
                   + f" — {sum(p == 'ct_contrast' for p in ph)} of {len(ph)} contrast-enhanced (portal venous).")
    out += ["", "## Realism against the paired held-out phantoms", "", realism_table(rows), "",
            "Median HU error per group (HU, mean over masks):", "", hu_table(hu_rows), ""]
    if real_rows:
        out += [f"## Real chest CT generated from its own mask ({a.real_seeds} noise seeds)", "", real_table(real_rows), ""]
    out += ["## Autoencoder round trip", "", "| model | PSNR phantoms (dB) | PSNR real CT (dB) | bone / phantom | soft-organ err (HU) | "
            "air holes | texture ratio | KID×1000 |", "|---|---|---|---|---|---|---|---|"]
    for name, res, ae, _ in verdicts:
        p = ae["phantoms"]
        out.append(f"| {name} | {p['psnr']:.1f} | {ae['real_ct']['psnr']:.1f} | {f(p['bone_ratio'])} | {f(p['soft_err'], '{:.0f}')} | "
                   f"{p['air_holes']:.2%} | {f(p['texture_ratio'])} | {kid_cell(p)} |")
    out.append("")
    for name, res, ae, is_base in verdicts:
        lines, disc = verdict_lines(name, res["phantoms"], ae, base_kid, is_base, res["phase_given"])
        res["discrimination"] = disc
        out += lines + [""]
    if a.diagnose:
        for name, (drows, lat, ae) in diag.items():
            out += [f"## Diagnosis: where the anatomy is lost ({name})", "", diagnosis_table(drows), "",
                    f"Latents in diffusion space (encoded mean × scale factor {lat['scale_factor']:.4f}): held-out phantoms mean "
                    f"{lat['phantom_mean']:.3f}, std {lat['phantom_std']:.3f} (per channel {', '.join(f'{v:.2f}' for v in lat['phantom_channel_std'])}); "
                    f"real CT mean {lat['real_mean']:.3f}, std {lat['real_std']:.3f}. The scale factor that gives the phantoms std 1: "
                    f"{lat['ideal_scale_factor']:.4f}. Posterior signal-to-noise per channel (spread of the encoder's means / mean sigma; "
                    f"about 1 or below: the channel carries little): {', '.join(f'{v:.2f}' for v in lat['posterior_snr'])}.",
                    f"Autoencoder round trip on the real CT: PSNR {ae['real_ct']['psnr']:.1f} dB, bone / real {f(ae['real_ct']['bone_ratio'])}, "
                    f"soft-organ err {f(ae['real_ct']['soft_err'], '{:.0f}')} HU, air holes {ae['real_ct']['air_holes']:.2%}, "
                    f"texture ratio {f(ae['real_ct']['texture_ratio'])}.", ""]
    out.append(f"Wall time {time.time() - t_all:.0f} s on {torch.get_num_threads()} threads.")
    text = "\n".join(out)
    print(text)
    if a.out:
        with atomic_path(a.out, overwrite=True) as tmp:
            if a.out.endswith(".json"):
                Path(tmp).write_text(json.dumps({"settings": {k: v for k, v in vars(a).items() if k != "model"} | {
                    "models": [str(m) for m in models], "feature_network": info}, "results": results, "markdown": text},
                    indent=1, default=str))
            else: Path(tmp).write_text(text + "\n")


if __name__ == "__main__":
    main()
