"""Full-size checkpoints in NVIDIA's released layouts and file names: save from random networks, load strictly.

The notebook nbs/00_networks.ipynb tests the same code on tiny networks; here every role of both generations is
written at its real size (about 2.9 GB in a temporary folder, ~1 minute) under the released file names of the seed
release (DDPM) and the current one (rectified flow), then loaded back with `weights_only=True`.
"""
import pytest
import torch
from maisi_nb.networks import (CHECKPOINT_LAYOUTS, build_networks, find_checkpoints, load_checkpoint,
                               load_pretrained, save_checkpoint)

FILES = {  # released names: the seed release for DDPM, the current release (models/ folder) for rflow
    "ddpm": {"autoencoder": "autoencoder_epoch273.pt",
             "diffusion_unet": "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt",
             "controlnet": "controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt",
             "mask_generation_autoencoder": "mask_generation_autoencoder.pt",
             "mask_generation_diffusion": "mask_generation_diffusion_unet.pt"},
    "rflow": {"autoencoder": "models/autoencoder_v1.pt", "diffusion_unet": "models/diff_unet_3d_rflow-ct.pt",
              "controlnet": "models/controlnet_3d_rflow-ct.pt"},
}
EXTRAS = {"diffusion_unet": dict(scale_factor=0.5, epoch=3, loss=0.125, num_train_timesteps=1000),
          "mask_generation_diffusion": dict(scale_factor=1.0055984258651733),
          "controlnet": dict(epoch=7, loss=torch.tensor(0.25))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    "gen -> (folder, {role: path}): full-size random checkpoints written with `save_checkpoint`, made on first use."
    made = {}
    def get(gen):
        if gen not in made:
            d, files = tmp_path_factory.mktemp(gen), {}
            for role, name in FILES[gen].items():
                net = build_networks(f"maisi-{gen}", "cpu", which=role, seed=0)[role]
                files[role] = save_checkpoint(net, d/name, role, **EXTRAS.get(role, {}))
                del net
            made[gen] = d, files
        return made[gen]
    return get


@pytest.fixture(params=["ddpm", "rflow"])
def released(request, folders): return (request.param, *folders(request.param))


@pytest.mark.parametrize("gen,role", [(g, r) for g in FILES for r in FILES[g]])
def test_released_layout_loads_strictly(folders, gen, role):
    _, files = folders(gen)
    obj = torch.load(files[role], weights_only=True)
    wrap = CHECKPOINT_LAYOUTS[role]
    sd = obj if wrap is None else obj[wrap]
    assert (wrap is None) == all(isinstance(v, torch.Tensor) for v in obj.values())  # bare vs wrapped, as released
    fresh = build_networks(f"maisi-{gen}", "cpu", which=role, seed=1)[role]
    assert any(not torch.equal(v, sd[k]) for k, v in fresh.state_dict().items())  # loading has something to do
    info = load_checkpoint(fresh, files[role], role)
    assert set(fresh.state_dict()) == set(sd)
    for k, v in fresh.state_dict().items(): assert torch.equal(v, sd[k]), k
    assert info["converted_old_layout"] is False
    if wrap == "unet_state_dict":
        assert obj["scale_factor"].shape == () and obj["scale_factor"].dtype == torch.float32
        assert info["scale_factor"].item() == pytest.approx(EXTRAS[role]["scale_factor"])
    for k, v in EXTRAS.get(role, {}).items():
        if k != "scale_factor": assert info[k] == pytest.approx(float(v))


def test_folder_loader_finds_released_names(released):
    gen, d, files = released
    version, found = find_checkpoints(d)
    assert version == gen and found == files
    nets = load_pretrained(d, device="cpu")
    assert nets.version == gen and set(nets.networks()) == set(files)
    assert nets.scale_factor.item() == 0.5
    if "mask_generation_diffusion" in files:
        assert nets.mask_generation_scale_factor.item() == pytest.approx(1.0055984258651733)
    w = torch.load(files["autoencoder"], weights_only=True)["decoder.blocks.0.conv.conv.weight"]
    assert torch.equal(nets.autoencoder.state_dict()["decoder.blocks.0.conv.conv.weight"], w)


def test_other_generation_fails_with_advice(released):
    gen, _, files = released
    other = "rflow" if gen == "ddpm" else "ddpm"
    for role in ("diffusion_unet", "controlnet"):
        net = build_networks(f"maisi-{other}", "meta", which=role)[role]  # shapes only: the check comes first
        with pytest.raises(ValueError, match=f"does not fit the {role}.*looks like .*{gen.replace('rflow', 'RFlow').replace('ddpm', 'DDPM')}"
                                             f".* of preset maisi-{gen}; use preset maisi-{gen}"):
            load_checkpoint(net, files[role], role)
