"Mask generator: condition order, size conditions, training commands (tiny preset), resume, released layouts, bundle."
import json, warnings
import numpy as np
import pytest
import torch
from maisi_nb.labels import COMPACT_TO_MAISI, CONTROLLABLE_ANATOMIES, compact_to_maisi
from maisi_nb.masks import _TUMOR_SLOTS, find_masks, prepare_size_condition, read_mask_record
from maisi_nb.networks import CHECKPOINT_LAYOUTS, build_networks, load_checkpoint
from maisi_nb.mask_generator import (SIZE_CONDITION_IDS, SIZE_CONDITIONS_FILE, maisi_to_compact, size_percentiles,
                                     volume_percentile, make_mask_phantoms, train_mask_vae_cli, train_mask_diffusion_cli,
                                     read_size_conditions, demo_mask_generator_dir, load_mask_generator,
                                     mask_generator_data, sample_masks, phantom_size_request)

def test_condition_order_matches_maisi():
    assert SIZE_CONDITION_IDS == (10, 1, 12, 4, 62, 23, 24, 26, 27, 128)
    assert all(SIZE_CONDITION_IDS[s] == t for s, t in _TUMOR_SLOTS.items())
    assert len(CONTROLLABLE_ANATOMIES) == 10

def test_compact_round_trip():
    assert np.array_equal(compact_to_maisi(maisi_to_compact(COMPACT_TO_MAISI)), COMPACT_TO_MAISI)
    assert maisi_to_compact(np.array([116, 117, 2]))[:2].tolist() == maisi_to_compact(np.array([14, 5])).tolist()
    assert COMPACT_TO_MAISI[maisi_to_compact(np.array([2]))[0]] == 200  # a placeholder id becomes body
    t = torch.tensor([0, 1, 200, 132])
    assert torch.equal(compact_to_maisi(maisi_to_compact(t)), t)

def test_size_percentiles():
    v = np.zeros((4, 10)); v[:, 1] = [100, 300, 200, 400]; v[1, 7] = 5.0
    p = size_percentiles(v)
    assert p[:, 1].tolist() == [0.125, 0.625, 0.375, 0.875]  # Hazen positions (rank - 0.5) / n
    assert p[1, 7] == 0.5 and (p[[0, 2, 3], 7] == -1).all() and (p[:, 0] == -1).all()
    assert volume_percentile(250, [100, 200, 300, 400]) == 0.5 and volume_percentile(0, [1]) == -1
    with pytest.raises(ValueError, match="volumes"): size_percentiles(np.zeros((3, 9)))

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    dl = make_mask_phantoms(d / "data", 4, seed=1, tumor_prob=1.0)
    common = ["--datalist", str(dl), "--network_config", "tiny-ddpm", "--device", "cpu"]
    assert train_mask_vae_cli(common + ["--model_dir", str(d / "m"), "--set", "n_epochs=1", "steps_per_epoch=1",
                                        "batch_size=1", "patch_size=[16,16,16]"]) == 0
    return d, dl, common

def test_vae_command_writes_released_layout(run):
    d, _, _ = run
    sd = torch.load(d / "m" / "mask_generation_autoencoder.pt", weights_only=True)
    assert CHECKPOINT_LAYOUTS["mask_generation_autoencoder"] is None and "decoder.blocks.0.conv.conv.weight" in sd
    nets = build_networks("tiny-ddpm", "cpu", which=("mask_generation_autoencoder",))
    load_checkpoint(nets.mask_generation_autoencoder, d / "m" / "mask_generation_autoencoder.pt", "mask_generation_autoencoder")
    assert max(v.shape[0] for k, v in sd.items() if k.startswith("decoder.") and v.ndim == 5) == 125
    assert (d / "m" / "mask_generation_autoencoder_loss.png").is_file()

def _diff(run, model_dir, *extra):
    d, _, common = run
    return train_mask_diffusion_cli(common + ["--model_dir", str(model_dir), "--set", "n_epochs=2", "steps_per_epoch=1",
                                              "batch_size=2", f"trained_mask_autoencoder_path={d / 'm' / 'mask_generation_autoencoder.pt'}",
                                              *extra])

def test_diffusion_command_resume_and_size_database(run, tmp_path):
    assert _diff(run, tmp_path / "a") == 0
    ck = torch.load(tmp_path / "a" / "mask_generation_diffusion_unet.pt", weights_only=True)
    assert set(ck) >= {"unet_state_dict", "scale_factor"} and ck["scale_factor"].ndim == 0
    assert ck["unet_state_dict"]["down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 10
    recs = read_size_conditions(tmp_path / "a" / SIZE_CONDITIONS_FILE)
    assert len(recs) == 4 and all(len(r["organ_size"]) == 10 for r in recs)
    assert all(r["organ_size"][1] > 0 for r in recs)  # every phantom has a liver
    assert len(prepare_size_condition([["liver", 0.3]], recs)) == 10
    # stopped after epoch 1 then resumed == uninterrupted
    assert _diff(run, tmp_path / "b", "--until_epoch", "1") == 0
    assert _diff(run, tmp_path / "b", "--resume") == 0
    ck_b = torch.load(tmp_path / "b" / "mask_generation_diffusion_unet.pt", weights_only=True)
    assert all(torch.equal(ck["unet_state_dict"][k], ck_b["unet_state_dict"][k]) for k in ck["unet_state_dict"])
    assert float(ck["scale_factor"]) == float(ck_b["scale_factor"])

def test_command_errors(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e: _diff(run, tmp_path / "c", "--resume")
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: train_mask_vae_cli(["--model_dir", str(tmp_path)])
    assert e.value.code == 2 and "datalist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: train_mask_vae_cli(["--datalist", str(run[1]), "--set", "patch_size=[15,16,16]"])
    assert e.value.code == 2 and "patch_size" in capsys.readouterr().err

def test_phantom_size_request():
    scale, tum = phantom_size_request([["liver", 0.0], ["hepatic tumor", 1.0]])
    assert scale == {"liver": pytest.approx(0.6)} and tum == [(26, pytest.approx(12 * 2.2))]

bundled = pytest.mark.skipif(demo_mask_generator_dir() is None, reason="demo mask generator not bundled")

@bundled
def test_bundled_generator_and_database():
    nets = load_mask_generator(None, "cpu")
    assert next(nets.mask_generation_diffusion.parameters()).dtype == torch.float32
    data = mask_generator_data()
    assert all(v is not None for v in data.values())
    c = find_masks(["abdomen"], ["liver"], [6.0] * 3, [64] * 3, data["mask_database"], data["mask_dir"])
    assert c and 1 in np.unique(read_mask_record(c[0], [6.0] * 3, [64] * 3)["label"].numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = sample_masks(nets, [[0.5] * 5 + [-1] * 5], [3], num_inference_steps=5, progress_bar=False)
        b = sample_masks(nets, [[0.5] * 5 + [-1] * 5], [3], num_inference_steps=5, progress_bar=False)
    assert a.shape == (1, 32, 32, 32) and np.array_equal(a, b)

def test_vae_sample_posterior_false_trains_on_the_mean(tmp_path, capsys):
    # one mask, one step, a negligible learning rate: the recorded cross-entropy is the initial network's on that mask
    from maisi_nb.mask_generator import load_mask_set, mask_datalist, mask_networks, mask_vae_loss
    from maisi_nb.labels import labels_to_bits
    dl = make_mask_phantoms(tmp_path / "data", 1, seed=2)
    ce = {}
    for flag in ("false", "true"):
        assert train_mask_vae_cli(["--datalist", str(dl), "--network_config", "tiny-ddpm", "--device", "cpu", "-s", "0",
                                   "--model_dir", str(tmp_path / flag), "--set", "n_epochs=1", "steps_per_epoch=1",
                                   "batch_size=1", "lr=1e-12", f"sample_posterior={flag}"]) == 0
        rec = json.loads((tmp_path / flag / "mask_generation_autoencoder_metrics.jsonl").read_text().splitlines()[-1])
        ce[flag] = rec["train_ce"]
    labs, _, _ = load_mask_set(mask_datalist(dl, None))
    ae = mask_networks("tiny-ddpm", "cpu", 0, which=("mask_generation_autoencoder",)).mask_generation_autoencoder
    x = torch.as_tensor(labs).long().unsqueeze(1)
    with torch.no_grad():
        mu, sigma = ae.encode(labels_to_bits(x))
        expected = float(mask_vae_loss(ae.decode(mu), maisi_to_compact(x[:, 0]), mu, sigma)["ce"])
    assert ce["false"] == pytest.approx(expected, rel=1e-4)
    assert ce["true"] != pytest.approx(expected, rel=1e-4)   # a posterior sample gives another reconstruction
    with pytest.raises(SystemExit):
        train_mask_vae_cli(["--datalist", str(dl), "--model_dir", str(tmp_path / "x"), "--set", "sample_posterior=sometimes"])
    assert "sample_posterior" in capsys.readouterr().err

def test_vae_anatomy_dice_weight_adds_the_controlled_anatomies_dice(tmp_path, capsys):
    dl = make_mask_phantoms(tmp_path / "data", 1, seed=2)
    args = ["--datalist", str(dl), "--network_config", "tiny-ddpm", "--device", "cpu", "-s", "0", "--model_dir", str(tmp_path / "m"),
            "--set", "n_epochs=1", "steps_per_epoch=1", "batch_size=1", "lr=1e-12", "kl_weight=0", "anatomy_dice_weight=2"]
    assert train_mask_vae_cli(args) == 0
    rec = json.loads((tmp_path / "m" / "mask_generation_autoencoder_metrics.jsonl").read_text().splitlines()[-1])
    assert 0 < rec["train_anatomy_dice"] < 1
    assert rec["train_loss"] == pytest.approx(rec["train_ce"] + rec["train_dice"] + 2 * rec["train_anatomy_dice"], rel=1e-5)
    with pytest.raises(SystemExit):
        train_mask_vae_cli(args[:-1] + ["anatomy_dice_weight=-1"])
    assert "anatomy_dice_weight" in capsys.readouterr().err
