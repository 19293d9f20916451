"""NV-Generate v2 compatibility: MR models, classifier-free guidance (CFG), released layouts and config files.

The CFG tests compare `sample_latents` with reference loops written here from NV-Generate's description of
`diff_model_infer.run_inference` (image only) and `utils_infer.run_controlnet_conditioned_image_dm` (image from a
mask): one forward of a doubled batch (conditional half first), class labels [modality, 0], a tumour-free mask for
the ControlNet's unconditional half, out = out_uncond + s (out_cond - out_uncond) handed to the scheduler step.
Tiny networks get small random weights everywhere (an untrained UNet predicts exactly zero).

NVIDIA's v2 JSON files and the network listings are read from the shared reference folder beside the checkout
when it exists (read only, never copied); those tests skip otherwise.
"""
import json, re, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from maisi_nb.labels import MODALITIES, check_modality, labels_to_bits, tumor_free_mask
from maisi_nb.networks import (MR_VARIANTS, PRESETS, VARIANTS, build_networks, check_mr_grid, find_checkpoints,
                               load_network_config, load_pretrained, network_version, save_checkpoint)
from maisi_nb.sampling import (check_guidance_scale, ddpm_step, make_generators, batch_randn, make_scheduler,
                               sample_latents)
from maisi_nb.utils import make_generator, randn, torch_save

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"
V2, KEYS = REF / "upstream_data" / "v2", REF / "state_dict_keys"
torch.set_num_threads(1)


def jitter(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters(): p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture(scope="module")
def rflow_nets():
    nets = build_networks("tiny", "cpu", which=("diffusion_unet", "controlnet"), seed=0, variant="rflow-ct")
    jitter(nets.diffusion_unet, 1); jitter(nets.controlnet, 2)
    return nets


@pytest.fixture(scope="module")
def ddpm_nets():
    nets = build_networks("tiny-ddpm", "cpu", which=("diffusion_unet", "controlnet"), seed=0, variant="ddpm-ct")
    jitter(nets.diffusion_unet, 3); jitter(nets.controlnet, 4)
    return nets


def _mask():
    "A (1,1,32,32,32) label volume: two lung lobes, a lung tumour, liver with a hepatic tumour, body."
    m = torch.full((1, 1, 32, 32, 32), 200, dtype=torch.long)
    m[..., :16, 8:24, 8:24], m[..., 16:, 8:24, 8:24] = 29, 30
    m[..., 18:22, 12:16, 12:16] = 23
    m[..., 4:12, 26:31, 4:28], m[..., 6:9, 27:30, 10:14] = 1, 26
    return m


def _rflow_reference(unet, x, s, m, spacing, n, controlnet=None, cond=None, cond_free=None):
    "Reference image-only / paired CFG loop (rectified flow), written from the description, not from our code."
    sch = make_scheduler("rflow")
    sch.set_timesteps(n, input_img_size_numel=int(np.prod(x.shape[2:])))
    ts = sch.timesteps; nxt = torch.cat([ts[1:], torch.zeros(1, dtype=ts.dtype)])
    sp = torch.tensor([spacing], dtype=torch.float32) * 100
    with torch.no_grad():
        for t, tn in zip(ts, nxt):
            xi, tt, lab = torch.cat([x, x]), torch.Tensor((float(t), float(t))), torch.tensor([m, 0])
            extra = {}
            if controlnet is not None:
                down, mid = controlnet(x=xi, timesteps=tt, controlnet_cond=torch.cat([cond, cond_free]), class_labels=lab)
                extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            out = unet(x=xi, timesteps=tt, spacing_tensor=torch.cat([sp, sp]), class_labels=lab, **extra)
            c, u = out.chunk(2)
            x, _ = sch.step(u + s * (c - u), t, x, tn)
    return x


@pytest.mark.parametrize("s", [0.5, 2.0, 7.0])
def test_image_only_cfg_matches_reference(rflow_nets, s):
    x0 = randn((1, 4, 8, 8, 8), make_generator(11))
    ref = _rflow_reference(rflow_nets.diffusion_unet, x0.clone(), s, MODALITIES["mri_t2"], [1.2, 1.0, 1.0], 5)
    ours = sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), spacing=[1.2, 1.0, 1.0],
                          modality="mri_t2", guidance_scale=s, latents=x0, num_inference_steps=5, device="cpu",
                          progress_bar=False)
    assert (ours - ref).abs().max() <= 1e-5
    plain = sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), spacing=[1.2, 1.0, 1.0],
                           modality="mri_t2", latents=x0, num_inference_steps=5, device="cpu", progress_bar=False)
    assert (ours - plain).abs().max() > 1e-3  # guidance changed something


def test_paired_cfg_matches_reference(rflow_nets):
    mask = _mask(); free = tumor_free_mask(mask)
    cond, cond_free = labels_to_bits(mask), labels_to_bits(free)
    x0 = randn((1, 4, 8, 8, 8), make_generator(5))
    ref = _rflow_reference(rflow_nets.diffusion_unet, x0.clone(), 3.0, 1, [1.5, 1.5, 2.0], 4,
                           rflow_nets.controlnet, cond, cond_free)
    ours = sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), spacing=[1.5, 1.5, 2.0],
                          modality=1, controlnet=rflow_nets.controlnet, controlnet_cond=cond, guidance_scale=3.0,
                          controlnet_cond_uncond=cond_free, latents=x0, num_inference_steps=4, device="cpu",
                          progress_bar=False)
    assert (ours - ref).abs().max() <= 1e-5


def test_paired_cfg_ddpm_matches_reference(ddpm_nets):
    "ddpm-ct: no class embedding, so only the mask differs between the halves; the posterior noise is the same draws."
    unet, cn = ddpm_nets.diffusion_unet, ddpm_nets.controlnet
    mask = _mask(); cond, cond_free = labels_to_bits(mask), labels_to_bits(tumor_free_mask(mask))
    reg = dict(top_region_index=[0, 1, 0, 0], bottom_region_index=[0, 0, 1, 0])
    x0, s, n = randn((1, 4, 8, 8, 8), make_generator(7)), 2.5, 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer DDPM steps than trained
        ours = sample_latents(unet, make_scheduler("ddpm"), (1, 4, 8, 8, 8), spacing=[1, 1, 1], controlnet=cn,
                              controlnet_cond=cond, controlnet_cond_uncond=cond_free, guidance_scale=s, latents=x0,
                              num_inference_steps=n, seed=9, device="cpu", progress_bar=False, **reg)
        sch = make_scheduler("ddpm"); sch.set_timesteps(n)
    gens, x = make_generators(1, 9), x0.clone()
    kw = {k: torch.tensor([v, v], dtype=torch.float32) * 100 for k, v in
          [("spacing_tensor", [1, 1, 1]), ("top_region_index_tensor", reg["top_region_index"]),
           ("bottom_region_index_tensor", reg["bottom_region_index"])]}
    with torch.no_grad():
        for t in sch.timesteps:
            xi, tt = torch.cat([x, x]), torch.Tensor((float(t),) * 2)
            down, mid = cn(x=xi, timesteps=tt, controlnet_cond=torch.cat([cond, cond_free]))
            c, u = unet(x=xi, timesteps=tt, down_block_additional_residuals=down, mid_block_additional_residual=mid, **kw).chunk(2)
            x = ddpm_step(sch, u + s * (c - u), int(t), x, batch_randn(x.shape, gens) if t > 0 else None)
    assert (ours - x).abs().max() <= 1e-5


def test_class_labels_reach_the_embeddings(rflow_nets):
    "Codes reach the UNet's and ControlNet's class embedding; the unconditional half gets label 0 (or the one asked for)."
    seen = {"unet": [], "controlnet": []}
    hooks = [getattr(rflow_nets, r).class_embedding.register_forward_hook(
             lambda m, i, o, r=k: seen[r].append(i[0].tolist())) for k, r in (("unet", "diffusion_unet"), ("controlnet", "controlnet"))]
    cond = labels_to_bits(_mask()); free = labels_to_bits(tumor_free_mask(_mask()))
    kw = dict(spacing=[1, 1, 1], num_inference_steps=2, seed=0, device="cpu", progress_bar=False)
    try:
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (2, 4, 8, 8, 8), modality="mri_flair",
                       guidance_scale=4, **kw)
        assert seen["unet"] == [[11, 11, 0, 0]] * 2 and seen["controlnet"] == []
        seen["unet"].clear()
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), modality=31,
                       guidance_scale=4, unconditional_modality="mri", **kw)
        assert seen["unet"] == [[31, 8]] * 2
        seen["unet"].clear()
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), modality="ct",
                       controlnet=rflow_nets.controlnet, controlnet_cond=cond, controlnet_cond_uncond=free,
                       guidance_scale=2, **kw)
        assert seen["unet"] == [[1, 0]] * 2 and seen["controlnet"] == [[1, 0]] * 2
        seen["unet"].clear(); seen["controlnet"].clear()
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), modality="ct",
                       controlnet=rflow_nets.controlnet, controlnet_cond=cond, guidance_scale=0, **kw)
        assert seen["unet"] == [[1]] * 2 and seen["controlnet"] == [[1]] * 2  # 0 = off: one pass
    finally:
        for h in hooks: h.remove()


def test_cfg_errors(rflow_nets, ddpm_nets):
    cond = labels_to_bits(_mask())
    kw = dict(spacing=[1, 1, 1], num_inference_steps=2, seed=0, device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="controlnet_cond_uncond: guidance with a ControlNet needs"):
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), controlnet=rflow_nets.controlnet,
                       controlnet_cond=cond, guidance_scale=2, **kw)
    with pytest.raises(ValueError, match="controlnet_cond_uncond: shape"):
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), controlnet=rflow_nets.controlnet,
                       controlnet_cond=cond, controlnet_cond_uncond=cond[..., :16], guidance_scale=2, **kw)
    with pytest.raises(ValueError, match="only used with a controlnet"):
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), controlnet_cond_uncond=cond,
                       guidance_scale=2, **kw)
    with pytest.raises(ValueError, match="guidance_scale: expected a number >= 0"):
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), guidance_scale=-2, **kw)
    with pytest.raises(ValueError, match="did you mean 'mri_t1'"):
        sample_latents(rflow_nets.diffusion_unet, make_scheduler("rflow"), (1, 4, 8, 8, 8), modality="mri t1w", guidance_scale=2, **kw)
    with pytest.warns(UserWarning, match="has no effect here"):  # DDPM UNet, no ControlNet: both halves would be equal
        sample_latents(ddpm_nets.diffusion_unet, make_scheduler("ddpm"), (1, 4, 8, 8, 8), top_region_index=[1, 0, 0, 0],
                       bottom_region_index=[0, 1, 0, 0], guidance_scale=5, **kw)


def test_default_behaviour_unchanged(rflow_nets):
    "None, 0 and 1 give the unguided latent; the same seed gives the same guided latent."
    kw = dict(spacing=[1, 1, 1], modality=9, num_inference_steps=3, seed=4, device="cpu", progress_bar=False)
    sch, u = make_scheduler("rflow"), rflow_nets.diffusion_unet
    base = sample_latents(u, sch, (1, 4, 8, 8, 8), **kw)
    assert torch.equal(sample_latents(u, sch, (1, 4, 8, 8, 8), guidance_scale=None, **kw), base)
    assert torch.equal(sample_latents(u, sch, (1, 4, 8, 8, 8), guidance_scale=0, **kw), base)
    assert (sample_latents(u, sch, (1, 4, 8, 8, 8), guidance_scale=1, **kw) - base).abs().max() <= 1e-6
    a, b = (sample_latents(u, sch, (1, 4, 8, 8, 8), guidance_scale=15, **kw) for _ in range(2))
    assert torch.equal(a, b)


def test_tumor_free_mask_as_upstream():
    m = _mask()
    free = tumor_free_mask(m)
    assert set(free.unique().tolist()) == {1, 29, 30, 200}
    assert (free[..., 18:22, 12:16, 12:16] == 30).all()  # lung tumour -> the lobe around it
    m[..., 0, 0, 0] = 128
    assert tumor_free_mask(m)[..., 0, 0, 0].item() == 128  # bone lesions are left, as upstream does


# ---- released models: presets, listings, checkpoint folders, config files

def _listing(name):
    lines = [l.split("\t") for l in (KEYS / name).read_text().splitlines() if l and not l.startswith("#")]
    return {k: tuple(int(s) for s in re.findall(r"\d+", shp)) for k, shp in lines}


@pytest.mark.skipif(not KEYS.exists(), reason="state-dict listings not available")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_networks_match_released_listings(variant):
    "Every v2 model's networks have the released names and shapes (what a strict load of the real files needs)."
    v = VARIANTS[variant].version
    nets = build_networks(variant, "meta", which=("autoencoder", "diffusion_unet", "controlnet"))
    assert nets.variant == variant
    for role, f in (("autoencoder", "autoencoder.txt"), ("diffusion_unet", f"{v}_diffusion_unet.txt"),
                    ("controlnet", f"{v}_controlnet.txt")):
        got = {k: tuple(t.shape) for k, t in nets[role].state_dict().items()}
        assert list(got.items()) == list(_listing(f).items()), (variant, role)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_released_folder_layout_loads_per_variant(tmp_path, variant):
    "A folder with the variant's released names and layouts (tiny weights) loads strictly and is recognised."
    spec = VARIANTS[variant]
    preset = "tiny" if spec.version == "rflow" else "tiny-ddpm"
    src = build_networks(preset, "cpu", which=("autoencoder", "diffusion_unet"), seed=1)
    d = tmp_path / "models"; d.mkdir()
    ae = src.autoencoder.state_dict()
    torch_save({"unet_state_dict": ae} if variant == "rflow-mr-brain" else ae, d / spec.files["autoencoder"][0])
    save_checkpoint(src.diffusion_unet, d / spec.files["diffusion_unet"][0], "diffusion_unet", 0.96240234375,
                    epoch=10, loss=0.1, num_train_timesteps=1000)
    nets = load_pretrained(tmp_path, config=preset, device="cpu")
    assert nets.variant == variant and nets.version == spec.version
    assert float(nets.scale_factor) == 0.96240234375
    for role in ("autoencoder", "diffusion_unet"):
        for k, t in src[role].state_dict().items(): assert torch.equal(nets[role].state_dict()[k], t), (role, k)
    assert find_checkpoints(tmp_path, variant=variant)[1]["diffusion_unet"].name == spec.files["diffusion_unet"][0]


def test_mismatch_message_for_mr_folder(tmp_path):
    "A DDPM UNet saved under the MR name fails strictly with the existing clear message."
    src = build_networks("tiny-ddpm", "cpu", which=("diffusion_unet",), seed=0)
    save_checkpoint(src.diffusion_unet, tmp_path / "diff_unet_3d_rflow-mr.pt", "diffusion_unet")
    with pytest.raises(ValueError, match="looks like a DDPM diffusion UNet of preset tiny-ddpm; use preset tiny-ddpm"):
        load_pretrained(tmp_path, config="tiny", device="cpu")


@pytest.mark.skipif(not V2.exists(), reason="NV-Generate v2 files not available")
def test_v2_network_files_load_unchanged():
    for net, names in (("rflow", ("rflow-ct", "rflow-mr", "rflow-mr-brain")), ("ddpm", ("ddpm-ct",))):
        f = V2 / f"config_network_{net}.json"
        assert network_version(f) == net
        for n in names: assert load_network_config(f) == load_network_config(n)
        up = build_networks(f, "meta", which=("diffusion_unet", "controlnet", "noise_scheduler"))
        ours = build_networks(names[0], "meta", which=("diffusion_unet", "controlnet"))
        for r in ("diffusion_unet", "controlnet"):
            assert {k: t.shape for k, t in up[r].state_dict().items()} == {k: t.shape for k, t in ours[r].state_dict().items()}


@pytest.mark.skipif(not V2.exists(), reason="NV-Generate v2 files not available")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_v2_image_only_configs_validate(variant):
    "The shipped image-only settings pass our checks unchanged: modality, guidance scale, and (MR) the output grid."
    inf = json.loads((V2 / f"config_maisi_diff_model_{variant}.json").read_text())["diffusion_unet_inference"]
    assert check_modality(inf["modality"], variant) == inf["modality"]
    assert check_guidance_scale(inf["cfg_guidance_scale"]) == VARIANTS[variant].guidance_scale
    if variant in MR_VARIANTS: check_mr_grid(inf["dim"], inf["spacing"], variant)
    env = json.loads((V2 / f"environment_maisi_diff_model_{variant}.json").read_text())
    assert env["model_filename"] in VARIANTS[variant].files["diffusion_unet"]


@pytest.mark.skipif(not V2.exists(), reason="NV-Generate v2 files not available")
def test_v2_modality_table():
    assert json.loads((V2 / "modality_mapping.json").read_text()) == MODALITIES
    infer = [json.loads(f.read_text()) for f in sorted(V2.glob("config_infer*.json"))]
    assert len(infer) == 10
    for c in infer:  # the paired path's settings: CT, tumour guidance off
        assert check_modality(c["modality"], "rflow-ct") == 1 and check_guidance_scale(c["cfg_guidance_scale"]) == 0.0
    ctrl = json.loads((V2 / "config_maisi_controlnet_train_rflow-mr.json").read_text())["controlnet_infer"]
    assert check_modality(ctrl["modality"], "rflow-mr") == 9


def test_full_size_mr_folders_load_strictly(tmp_path):
    "Full-size random weights under NVIDIA's MR names and layouts (about 800 MB, ~15 s) load strictly, weights_only."
    mr = tmp_path / "mr" / "models"; mr.mkdir(parents=True)
    brain = tmp_path / "brain" / "models"; brain.mkdir(parents=True)
    src = build_networks("rflow-mr", "cpu", which=("autoencoder", "diffusion_unet"), seed=0)
    save_checkpoint(src.autoencoder, mr / "autoencoder_v2.pt", "autoencoder")
    save_checkpoint(src.diffusion_unet, mr / "diff_unet_3d_rflow-mr.pt", "diffusion_unet", 0.96240234375)
    torch_save({"unet_state_dict": src.autoencoder.state_dict()}, brain / "autoencoder_v1.pt")  # v2 also reads this layout
    (brain / "diff_unet_3d_rflow-mr-brain_v1.pt").hardlink_to(mr / "diff_unet_3d_rflow-mr.pt")
    probe = {k: v.clone() for k, v in list(src.diffusion_unet.state_dict().items())[:3]} | \
            {"class_embedding.weight": src.diffusion_unet.class_embedding.weight.detach().clone()}
    del src
    for folder, variant in ((mr.parent, "rflow-mr"), (brain.parent, "rflow-mr-brain")):
        nets = load_pretrained(folder, device="cpu")
        assert (nets.variant, nets.preset, float(nets.scale_factor)) == (variant, variant, 0.96240234375)
        sd = nets.diffusion_unet.state_dict()
        for k, v in probe.items(): assert torch.equal(sd[k], v), k
        del nets


@pytest.mark.skipif(not V2.exists(), reason="NV-Generate v2 files not available")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_v2_image_only_files_load_unchanged(variant):
    from maisi_nb.networks import load_model_config
    c = load_model_config(V2 / f"config_maisi_diff_model_{variant}.json", V2 / f"environment_maisi_diff_model_{variant}.json")
    v = VARIANTS[variant]
    assert c["variant"] == variant
    inf = c["diffusion_unet_inference"]
    assert (inf["dim"], inf["spacing"], inf["modality"], inf["cfg_guidance_scale"], inf["random_seed"]) == \
           (list(v.output_size), list(v.spacing), v.modality, v.guidance_scale, v.seed)


def test_modality_label_dropout():
    from maisi_nb.labels import augment_modality_labels
    codes = torch.tensor([2, 9, 29, 1] * 1000)
    a = augment_modality_labels(codes, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, augment_modality_labels(codes, 0.1, torch.Generator().manual_seed(1)))
    assert set(a[codes == 2].tolist()) == {0, 1, 2} and set(a[codes == 29].tolist()) == {0, 8, 29}
    assert set(a[codes == 1].tolist()) == {0, 1}
    assert abs((a == 0).float().mean().item() - 0.1) < 0.02


@pytest.mark.parametrize("preset,variant,modality,lo,hi", [("tiny", "rflow-mr-brain", "mri_flair_skull_stripped", 0, None),
                                                           ("tiny-ddpm", "ddpm-ct", "ct", -1000, 1000)])
def test_generate_image_only_units(preset, variant, modality, lo, hi):
    from maisi_nb.sampling import generate_image_only
    nets = build_networks(preset, "cpu", which=("autoencoder", "diffusion_unet", "noise_scheduler"), seed=0, variant=variant)
    jitter(nets.diffusion_unet, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DDPM with few steps; guidance without class embedding
        r = generate_image_only(nets, [32, 32, 32], [2.0, 2.0, 2.0], modality=modality, num_inference_steps=3,
                                check_grid=False, device="cpu", progress_bar=False)
    img = r["image"]
    assert img.shape == (32, 32, 32) and img.min() >= lo and (hi is None or img.max() <= hi)
    assert r["image_kind"] == ("mr" if lo == 0 else "ct") and r["guidance_scale"] == VARIANTS[variant].guidance_scale


# ---- training side: modality label dropout in diffusion training

def _labels_seen(unet):
    "A list that collects the class labels each forward of `unet` receives, and the hook to remove."
    seen = []
    return seen, unet.class_embedding.register_forward_hook(lambda m, i, o: seen.append(i[0].tolist()))


def _dropout_step(unet, batch, p, seed=7):
    from maisi_nb.diffusion import diffusion_step
    opt = torch.optim.SGD(unet.parameters(), lr=0.0)  # the labels are what is checked; the weights stay
    return diffusion_step(unet, make_scheduler("rflow"), batch, opt, torch.amp.GradScaler("cpu", enabled=False), 1.0,
                          make_generator(seed), modality_dropout=p)


def test_modality_dropout_reaches_the_unet():
    "With a fixed generator the UNet sees v2's augmented labels (drawn before the noise); 0.0 leaves them untouched."
    from maisi_nb.labels import augment_modality_labels
    from maisi_nb.diffusion import diffusion_loss
    unet = build_networks("tiny", "cpu", which=("diffusion_unet",), seed=0).diffusion_unet
    codes = torch.tensor([2, 3, 7, 9, 10, 29, 33, 1, 8, 1] * 3)
    batch = {"image": randn((30, 4, 8, 8, 8), make_generator(0)), "spacing": torch.ones(30, 3), "modality": codes}
    seen, hook = _labels_seen(unet)
    try:
        _dropout_step(unet, batch, 0.4)
        want = augment_modality_labels(codes, 0.4, make_generator(7))
        assert seen.pop() == want.tolist()
        changed = want != codes
        assert changed.sum() >= 8  # something changed, and only as v2 relabels: 2-7 -> 1, >= 9 -> 8, any -> 0
        for c, w in zip(codes[changed].tolist(), want[changed].tolist()):
            assert w == 0 or (2 <= c <= 7 and w == 1) or (c >= 9 and w == 8), (c, w)
        for p in (0, 0.0):  # off: labels untouched and nothing drawn, so the loss is the plain diffusion loss
            loss = _dropout_step(unet, batch, p)["loss"]
            assert seen.pop() == codes.tolist()
            with torch.no_grad():
                ref = diffusion_loss(unet, make_scheduler("rflow"), batch["image"], spacing=batch["spacing"], modality=codes,
                                     generator=make_generator(7))
            assert abs(loss - ref.item()) < 1e-6
    finally:
        hook.remove()


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.1", True, float("nan"), None])
def test_modality_dropout_bad_values(bad):
    from maisi_nb.diffusion import load_diffusion_config
    unet = build_networks("tiny", "cpu", which=("diffusion_unet",), seed=0).diffusion_unet
    batch = {"image": torch.zeros(1, 4, 8, 8, 8), "spacing": torch.ones(1, 3)}
    with pytest.raises(ValueError) as e: _dropout_step(unet, batch, bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("modality_dropout: got ") and msg.endswith("allowed: a number in [0, 1]"), msg
    if bad is not None and not isinstance(bad, str):
        with pytest.raises(ValueError, match=r"^modality_dropout: got .*; allowed: a number in \[0, 1\] or null$"):
            load_diffusion_config({}, overrides=[f"modality_dropout={json.dumps(bad)}"])


# ---- training side: NV-Generate v2's region contrastive loss (ControlNet)

def _region_reference(o, o_free, target, label, label_free, delta):
    "Region contrastive terms in float64 NumPy/SciPy, written from the description (not from our code)."
    from scipy.ndimage import binary_dilation
    o, o_free, target = (np.asarray(t.detach(), dtype=np.float64) for t in (o, o_free, target))
    roi = np.asarray(label) != np.asarray(label_free)                                          # (B,1,X,Y,Z)
    bg = ~np.stack([binary_dilation(r[0], np.ones((3, 3, 3)), border_value=0)[None] for r in roi])  # 1 - dilate3(ROI)
    f = [s // t for s, t in zip(roi.shape[2:], o.shape[2:])]                                   # nearest resize by f
    small = lambda m: np.repeat(m[:, :, ::f[0], ::f[1], ::f[2]].astype(np.float64), o.shape[1], axis=1)  # all channels
    r, b = small(roi), small(bg)
    fg = -(np.abs(o - o_free) * r).sum() / ((r > 0).sum() + 1e-5)
    fg = max(fg + delta, 0.0) - delta
    return fg, (np.abs(o_free - target) * b).sum() / ((b > 0).sum() + 1e-5)


@pytest.mark.parametrize("delta", [2.0, 0.05])
def test_region_contrastive_loss_matches_reference(delta):
    from maisi_nb.controlnet import region_contrastive_loss
    g = make_generator(3)
    label = torch.cat([_mask(), _mask()])
    label[1][label[1] == 23] = 30; label[1][label[1] == 26] = 1       # second sample: no tumour
    label[0, 0, 0:3, 0:3, 0:3] = 26                                  # a tumour touching the border (dilation padding)
    free = tumor_free_mask(label)
    o, o_free, target = (randn((2, 4, 8, 8, 8), g) for _ in range(3))
    o_free = o + 0.3 * o_free  # the tumour-free pass differs a little
    fg, bg = region_contrastive_loss(o, o_free, target, label, free, delta)
    ref_fg, ref_bg = _region_reference(o, o_free, target, label, free, delta)
    assert abs(fg.item() - ref_fg) <= 1e-6 and abs(bg.item() - ref_bg) <= 1e-6, (fg.item(), ref_fg, bg.item(), ref_bg)
    assert (abs(fg.item() + delta) < 1e-6) == (delta == 0.05)  # the clamp bites only for the small delta


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    "Phantoms with tiny checkpoints and latents (conftest.tiny_training_data); a liver tumour painted into every mask."
    from conftest import tiny_training_data
    from maisi_nb.utils import load_nifti, save_nifti
    f = tiny_training_data(tmp_path_factory.mktemp("v2_training"))
    labels = [p for p in sorted((f["dir"] / "data").rglob("*.nii.gz")) if "label" in str(p.relative_to(f["dir"] / "data"))]
    assert len(labels) == 4
    for p in labels:
        lab, aff = load_nifti(p)
        lab = np.asarray(lab).copy(); lab[12:16, 12:16, 12:16] = 26
        save_nifti(lab.astype(np.uint8), aff, p, overwrite=True)
    return f


def _cn_run(f, name, *extra):
    from maisi_nb.controlnet import train_controlnet_cli
    from maisi_nb.utils import save_json
    d = f["dir"]
    env = save_json({"model_dir": str(d / name), "exp_name": "cn", "output_dir": str(d / f"{name}_out"), "tfevent_path": None,
                     "trained_diffusion_path": str(f["unet"]), "trained_autoencoder_path": str(f["autoencoder"]),
                     "existing_ckpt_filepath": str(f["controlnet"]), "modality_mapping_path": "./configs/modality_mapping.json",
                     "data_base_dir": [str(f["controlnet_datalist"].parent)], "json_data_list": [str(f["controlnet_datalist"])]},
                    d / f"{name}_env.json")
    tc = save_json({"controlnet_train": {"batch_size": 1, "n_epochs": 1, "lr": 1e-3, "fold": 0, "weighted_loss_label": [23],
                                         "weighted_loss": 100}}, d / f"{name}_train.json")
    return train_controlnet_cli(["-e", str(env), "-c", "tiny", "-t", str(tc), "--device", "cpu", "--seed", "0", *extra])


def test_controlnet_training_with_region_contrastive_loss(training_data, one_thread, capsys):
    "A v2 environment (existing_ckpt_filepath) and the rflow-ct switch: a tiny ControlNet run trains and its file loads."
    from maisi_nb.controlnet import load_controlnet_checkpoint
    from maisi_nb.training import load_state
    f = training_data
    assert _cn_run(f, "cn_on", "--set", "use_region_contrasive_loss=true", "region_contrasive_loss_weight=0.5") == 0
    assert _cn_run(f, "cn_off") == 0
    on, off = (load_state(f["dir"] / n / "cn_train_state.pt") for n in ("cn_on", "cn_off"))
    assert on["meta"]["region_contrastive"] == [2.0, 0.5] and "region_contrastive" not in off["meta"]
    l_on, l_off = on["records"][0]["train_loss"], off["records"][0]["train_loss"]
    assert np.isfinite(l_on) and l_on != l_off  # the same draws, one more term
    cn = build_networks("tiny", "cpu", which=("controlnet",)).controlnet
    assert load_controlnet_checkpoint(f["dir"] / "cn_on" / "cn_current.pt", cn)["epoch"] == 1
    capsys.readouterr()


def test_controlnet_start_checkpoint_keys(training_data, one_thread, capsys):
    "existing_ckpt_filepath and trained_controlnet_path naming different files is one clear error, before any work."
    f = training_data
    with pytest.raises(SystemExit) as e: _cn_run(f, "cn_both", "--set", f"trained_controlnet_path={f['unet']}")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "name different ControlNets to start training from" in err, err
    assert not (f["dir"] / "cn_both" / "cn_current.pt").exists()
    from maisi_nb.controlnet import infer_controlnet_cli  # generating needs trained_controlnet_path, asked for by name
    env = json.loads((f["dir"] / "cn_both_env.json").read_text())
    with pytest.raises(SystemExit) as e: infer_controlnet_cli(["-e", str(f["dir"] / "cn_both_env.json"), "-c", "tiny", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "trained_controlnet_path is required" in err and env["existing_ckpt_filepath"] in err, err


# ---- training side: NV-Generate v2's trainer files load and validate

@pytest.mark.skipif(not V2.exists(), reason="NV-Generate v2 files not available")
def test_v2_training_files_load_and_validate():
    "Every training config/environment NVIDIA ships with v2 loads unchanged into our trainers' configs, with v2's meaning."
    from maisi_nb.diffusion import load_diffusion_config
    from maisi_nb.controlnet import load_controlnet_config, start_controlnet_path
    from maisi_nb.vae import load_vae_train_config, start_autoencoder_path
    read = lambda name: json.loads((V2 / name).read_text())
    seen = set()
    for v in VARIANTS:  # diffusion UNet training: v2's label dropout where the environment names a modality table (rflow)
        env, mc = f"environment_maisi_diff_model_{v}.json", f"config_maisi_diff_model_{v}.json"
        c = load_diffusion_config(V2 / env, V2 / mc, require=("embedding_base_dir", "json_data_list", "model_dir", "model_filename"))
        assert c["modality_dropout"] == (0.0 if v == "ddpm-ct" else 0.1), v
        assert (c["lr"], c["n_epochs"], c["batch_size"]) == (1e-5, 1000, read(mc)["diffusion_unet_train"]["batch_size"])
        assert c["existing_ckpt_filepath"] == read(env)["existing_ckpt_filepath"]
        seen |= {env, mc}
    for s in ("", "_ddpm-ct", "_rflow-ct", "_rflow-mr"):  # ControlNet training
        env, tc = f"environment_maisi_controlnet_train{s}.json", f"config_maisi_controlnet_train{s}.json"
        c = load_controlnet_config(V2 / env, V2 / tc)
        t, raw = c["controlnet_train"], read(env)
        assert t["use_region_contrasive_loss"] is (s == "_rflow-ct")
        if s == "_rflow-ct":
            assert (t["region_contrasive_loss_delta"], t["region_contrasive_loss_weight"], t["weighted_loss_label"]) == (2, 0.01, [23])
        assert start_controlnet_path(c["environment"]) == (raw.get("existing_ckpt_filepath") or raw.get("trained_controlnet_path"))
        seen |= {env, tc}
    c = load_vae_train_config(V2 / "config_maisi_vae_train.json", V2 / "environment_maisi_vae_train.json")  # VAE fine-tuning
    assert c["environment"]["finetune"] is True
    assert start_autoencoder_path(c["environment"]) == read("environment_maisi_vae_train.json")["trained_autoencoder_path"]
    with pytest.raises(ValueError, match="finetune: true starts a new run .* cannot be combined with --resume"):
        start_autoencoder_path(c["environment"], resume=True)
    seen |= {"config_maisi_vae_train.json", "environment_maisi_vae_train.json"}
    training = {p.name for p in V2.glob("*.json") if "_train" in p.name or "diff_model" in p.name}
    assert training == seen, training ^ seen


# ---- training side: an MR diffusion run on the tiny preset

def test_mr_diffusion_training_tiny(training_data, one_thread, tmp_path, capsys):
    "maisi_train_diffusion on MR latents with v2's label dropout (0.1): the run finishes, its checkpoint loads strictly."
    from maisi_nb.diffusion import make_latents_cli, train_diffusion_cli, load_diffusion_config
    from maisi_nb.networks import load_checkpoint
    from maisi_nb.training import load_state
    from maisi_nb.utils import save_json
    f = training_data
    # the CT phantoms stand in for MR volumes: their datalist records say "mri_t1" (code 9), so the latents' side-cars
    # and the class labels of every batch carry the MR code
    recs = json.loads(Path(f["datalist"]).read_text())
    recs["training"] = [{**r, "modality": "mri_t1"} for r in recs["training"]]
    dl = save_json(recs, tmp_path / "datalist_mr.json")
    env = {"data_base_dir": str(f["dir"] / "data"), "embedding_base_dir": str(tmp_path / "emb_mr"), "json_data_list": str(dl),
           "model_dir": str(tmp_path / "models"), "model_filename": "diff_unet_mr.pt", "trained_autoencoder_path": str(f["autoencoder"]),
           "modality_mapping_path": "./configs/modality_mapping.json"}
    env_file = save_json(env, tmp_path / "env.json")
    mc = save_json({"diffusion_unet_train": {"batch_size": 2, "n_epochs": 2, "lr": 1e-3, "modality_dropout": 0.1}}, tmp_path / "mc.json")
    base = ["--env_config", str(env_file), "--model_def", "tiny", "--device", "cpu"]
    assert make_latents_cli(base + ["--size_multiple", "32"]) == 0
    assert {json.loads(p.read_text())["modality"] for p in (tmp_path / "emb_mr").rglob("*_emb.nii.gz.json")} == {9}
    assert load_diffusion_config(env_file)["modality_dropout"] == 0.1  # also v2's default for such an environment
    capsys.readouterr()
    with pytest.raises(SystemExit) as e: train_diffusion_cli(base + ["--model_config", str(mc), "--set", "modality_dropout=2"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]  # (progress bars aside) one line
    assert e.value.code == 2 and err[-1] == "maisi_train_diffusion: error: modality_dropout: got 2; allowed: a number in [0, 1] or null", err
    assert train_diffusion_cli(base + ["--model_config", str(mc), "--modality", "mri_t1", "--seed", "3"]) == 0
    unet = build_networks("tiny", "cpu", which=("diffusion_unet",)).diffusion_unet
    ck = load_checkpoint(unet, tmp_path / "models" / "diff_unet_mr.pt", "diffusion_unet")  # strict
    assert ck["epoch"] == 2 and np.isfinite(float(ck["loss"])) and float(ck["scale_factor"]) > 0
    st = load_state(tmp_path / "models" / "diff_unet_mr_train_state.pt")
    assert st["meta"]["modality_dropout"] == 0.1 and len(st["records"]) == 2
    capsys.readouterr()


def test_modality_dropout_is_part_of_the_run(training_data, one_thread, tmp_path):
    "Same seed, same weights with dropout on; a resume with another dropout is refused."
    from maisi_nb.diffusion import latent_records, train_diffusion
    f = training_data
    recs = [{**r, "modality": 9} for r in latent_records(f["datalist"], f["dir"] / "emb")]
    def run(name, p, **kw):
        unet = build_networks("tiny", "cpu", which=("diffusion_unet",), seed=0).diffusion_unet
        train_diffusion(unet, make_scheduler("rflow"), recs, n_epochs=2, lr=1e-3, batch_size=2, ckpt_path=tmp_path / name,
                        modality_dropout=p, seed=1, device="cpu", progress_bar=False, **kw)
        return unet.state_dict()
    a, b = run("a.pt", 0.5), run("b.pt", 0.5, until_epoch=1)
    b = run("b.pt", 0.5, resume=True)
    for k in a: assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="modality_dropout: resuming a run started with modality_dropout 0.5, got 0.1"):
        run("b.pt", 0.1, resume=True)
