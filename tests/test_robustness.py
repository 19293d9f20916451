"""Robustness: every bad input of the API and of the commands maisi_generate, maisi_qc, maisi_fid, maisi_build_mask_db
and maisi_make_phantoms is one clear line (exit status 2, no traceback), found before any heavy work; NaN/Inf never
reach a written volume or a passing check; an interrupted batch resumes to the files of an uninterrupted run; a pickle
payload named like a released checkpoint is refused on every loading path.

Most command cases run in this process (`cli(argv)` with SystemExit captured) with sampling replaced by a function
that fails the test, so "before heavy work" is checked, not assumed; a few run as real subprocesses."""
import contextlib, hashlib, io, json, os, pickle, signal, subprocess, sys, time, warnings
os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars would share stderr with the error line
from pathlib import Path
import numpy as np
import pytest
import torch
from maisi_nb.utils import save_nifti, load_nifti, affine_from_spacing, check_output_dir
from maisi_nb.networks import build_networks, read_checkpoint, save_pretrained as save_networks, PRESETS
from maisi_nb.phantoms import make_phantom, make_phantoms_cli
from maisi_nb.masks import build_mask_db, build_mask_db_cli, prepare_user_mask
from maisi_nb.hu_qc import quality_check, NONFINITE
from maisi_nb import inference
from maisi_nb.inference import MaisiPipeline, generate_cli, NonFiniteOutputError
from maisi_nb.qc import qc_cli, fid_cli, FeatureCache, list_volumes

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--output-size", "32", "32", "32", "--spacing", "12", "12", "12", "--num-inference-steps", "2", "--max-attempts", "1"]
RELEASED = ["autoencoder_v1.pt", "diff_unet_3d_rflow-ct.pt", "controlnet_3d_rflow-ct.pt", "mask_generation_autoencoder.pt",
            "mask_generation_diffusion_unet.pt"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one OpenMP thread per test module


class Evil:
    "A pickle payload: unpickling it with a permissive loader would create the marker file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def F(tmp_path_factory):
    "Every input file the cases need, made once."
    d = tmp_path_factory.mktemp("robust")
    f = {"d": d}
    nets = build_networks("tiny", "cpu", seed=0)
    f["weights"] = d / "weights"; save_networks(nets, f["weights"])
    ph = make_phantom((32, 32, 32), (12.,) * 3, ("chest", "abdomen"), seed=0)
    f["mask"] = save_nifti(ph.label, ph.affine, d / "masks" / "m0.nii.gz")
    f["image"] = save_nifti(ph.image, ph.affine, d / "ct.nii.gz", dtype=np.float32)
    f["db"] = d / "db.json"; build_mask_db(d / "masks", f["db"])
    lab = ph.label
    save_nifti(np.stack([lab, lab], -1), ph.affine, d / "two.nii.gz")
    save_nifti(np.zeros_like(lab), ph.affine, d / "zeros.nii.gz")
    save_nifti(np.where(lab == 1, 150, lab).astype(np.uint8), ph.affine, d / "odd.nii.gz")
    (d / "cut.nii.gz").write_bytes(f["mask"].read_bytes()[:400])
    (d / "notes.txt").write_text("liver, spleen")
    (d / "afile").write_text("I am a file")
    (d / "notjson.json").write_text("{'single': quotes}")
    (d / "list.json").write_text("[1, 2]"); (d / "null.json").write_text("null")
    (d / "obj.json").write_text("{}")
    (d / "env_typo.json").write_text(json.dumps({"trained_autoencoder_pth": "models/autoencoder_v1.pt"}))
    (d / "infer_typo.json").write_text(json.dumps({"num_inference_step": 3}))
    (d / "net.json").write_text(json.dumps(PRESETS["tiny"]))
    ck = d / "ck"; ck.mkdir()
    good = f["weights"] / "models"
    (ck / "cut.pt").write_bytes((good / "autoencoder_v1.pt").read_bytes()[:2000])
    env = lambda **kw: {"trained_autoencoder_path": str(good / "autoencoder_v1.pt"),
                        "trained_diffusion_path": str(good / "diff_unet_3d_rflow-ct.pt"),
                        "trained_controlnet_path": str(good / "controlnet_3d_rflow-ct.pt")} | kw
    (d / "env_cut.json").write_text(json.dumps(env(trained_controlnet_path=str(ck / "cut.pt"))))
    (d / "env_wrong.json").write_text(json.dumps(env(trained_controlnet_path=str(good / "autoencoder_v1.pt"))))
    (d / "env_half.json").write_text(json.dumps({"trained_autoencoder_path": str(good / "autoencoder_v1.pt")}))
    (d / "env_empty.json").write_text(json.dumps(env(trained_diffusion_path="")))
    cutw = d / "cut_weights"; save_networks(nets, cutw)
    p = cutw / "models" / "diff_unet_3d_rflow-ct.pt"; p.write_bytes(p.read_bytes()[:3000])
    nan_img = ph.image.astype(np.float32).copy(); nan_img[lab == 1] = np.nan
    save_nifti(nan_img, ph.affine, d / "nan_ct.nii.gz")
    save_nifti(lab[:16], ph.affine, d / "lab_small.nii.gz")
    (d / ".ct.nii.gz.a1b2c3d4.nii.gz").write_bytes(b"half")
    vols = d / "vols"; nanv = d / "nanvols"
    for k in range(2): save_nifti(ph.image[..., 8 * k:8 * k + 16].astype(np.float32), ph.affine, vols / f"v{k}.nii.gz")
    save_nifti(np.full((16, 16, 16), np.nan, np.float32), ph.affine, nanv / "v.nii.gz")
    (d / "emptydir").mkdir()
    (d / "db_out_exists.json").write_text("[]")
    (d / "ok_stats_missing").mkdir()
    return f


def sub(F, s):
    "Replace {name} placeholders by fixture paths."
    return str(s).format(d=F["d"], w=F["weights"], mask=F["mask"], db=F["db"], image=F["image"])


def call(cli, argv):
    "(exit status, stdout, stderr) of a command called in this process."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = cli(argv)
        except SystemExit as e: rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture()
def no_heavy_work(monkeypatch):
    "Any denoising step fails the test: the error must come before heavy work."
    def boom(*a, **k): raise AssertionError("heavy work started before the error")
    monkeypatch.setattr(inference.MaisiPipeline, "sample_image", boom)
    monkeypatch.setattr(inference, "sample_mask_latents", boom)


GEN = [  # (extra argv, expected fragment of the one error line); "{d}" etc. are fixture paths
    (["--output-size", "32", "32", "40"], "output_size: Z = 40 is not allowed"),
    (["--spacing", "12", "12", "nan"], "spacing: expected 3 positive numbers"),
    (["--spacing", "12", "12"], "--spacing: expected 3 argument"),
    (["--anatomy-list", "livr"], "unknown anatomy name 'livr'"),
    (["--controllable-anatomy-size", "liver"], "expected NAME=SIZE"),
    (["--controllable-anatomy-size", "liver=nan"], "size of 'liver' must be in [0, 1]"),
    (["--controllable-anatomy-size", "spleen=0.5"], "'spleen' cannot be controlled"),
    (["--mask", "{d}/missing.nii.gz"], "mask: {d}/missing.nii.gz does not exist"),
    (["--mask", "{d}/emptydir"], "mask: {d}/emptydir is a folder, not a NIfTI file"),
    (["--mask", "{d}/notes.txt"], "notes.txt is not a readable NIfTI file"),
    (["--mask", "{d}/cut.nii.gz"], "cut.nii.gz is not a readable NIfTI file: truncated"),
    (["--mask", "{d}/two.nii.gz"], "two.nii.gz holds 2 volumes (shape (32, 32, 32, 2))"),
    (["--mask", "{d}/zeros.nii.gz"], "mask: holds only background (0): no body (200) and no organ"),
    (["--mask", "{d}/odd.nii.gz"], "values [150] are not MAISI ids"),
    (["--mask", "{mask}", "--output-size", "32", "32", "32", "--spacing", "4", "4", "4"],
     "mask: its own grid is [32, 32, 32] voxels at [12.0, 12.0, 12.0] mm (384 × 384 × 384 mm), but output_size × spacing is "
     "[32, 32, 32] voxels at [4.0, 4.0, 4.0] mm (128 × 128 × 128 mm)"),
    (["--mask-source", "database"], "needs a mask database"),
    (["--mask-database", "{d}/notjson.json"], "database: {d}/notjson.json is not valid JSON"),
    (["--mask-database", "{d}/obj.json"], "database: expected a JSON list of records"),
    (["-e", "{d}/nope.json"], "environment (-e): {d}/nope.json does not exist"),
    (["-e", "{d}/list.json"], "environment (-e): {d}/list.json must hold an object {{...}}, got list"),
    (["-e", "{d}/null.json"], "must hold an object {{...}}, got null"),
    (["-e", "{d}/notjson.json"], "notjson.json is not valid JSON"),
    (["-e", "{d}/emptydir"], "is a folder, not a JSON file"),
    (["-i", "{d}/list.json"], "infer config (-i): {d}/list.json must hold an object"),
    (["-i", "{d}/null.json"], "got null"),
    (["-i", "{d}/infer_typo.json"], "did you mean 'num_inference_steps'"),
    (["-x", "{d}/list.json"], "extra config (-x): {d}/list.json must hold an object"),
    (["-o", "{d}/afile"], "output_dir (-o): {d}/afile is a file, not a folder"),
    (["-o", "{d}/afile/sub"], "{d}/afile is a file, not a folder"),
    (["--version", "maisi4"], "--version: expected maisi3d-rflow or maisi3d-ddpm"),
    (["--weights-dir", "{w}"], "give one of --preset, --weights-dir"),
    (["--device", "gpu"], "device: got 'gpu'"),
    (["--num-output-samples", "0"], "num_output_samples: expected an integer in 1.."),
    (["--num-inference-steps", "0"], "num_inference_steps: expected an integer in 1..1000"),
    (["--mask-generation-num-inference-steps", "5000"], "mask_generation_num_inference_steps"),
    (["--max-attempts", "0"], "max_attempts: expected an integer in 1..20"),
    (["--resume"], "--resume: needs the seed (-s)"),
    (["--resume", "--overwrite", "-s", "1"], "excludes overwrite"),
    (["-s", "-1"], "seed: expected an integer"),
    (["-s", "x"], "argument -s/--seed/--random-seed: invalid int value"),
    (["--prefix", "a/b"], "output_prefix: expected a plain file-name prefix"),
    (["--image-output-ext", ".png"], "image_output_ext: '.png' is not supported"),
    (["--modality", "xray"], "modality: unknown name 'xray'"),
    (["--body-region", "arm"], "arm"),
    (["--label-ids", "anatomy_list"], "label_ids: 'anatomy_list' numbers"),
    (["--autoencoder-tp-num-splits", "3"], "autoencoder_tp_num_splits"),
    (["--autoencoder-sliding-window-infer-overlap", "1.5"], "autoencoder_sliding_window_infer_overlap: expected a number in [0, 1)"),
    (["--autoencoder-sliding-window-infer-size", "20", "20", "20"], "must be divisible by 16"),
    (["--size-conditions", "{d}/obj.json"], "--size-conditions: {d}/obj.json must hold a list"),
    (["--scheduler", "euler"], "argument --scheduler: invalid choice"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]
if not torch.cuda.is_available(): GEN.append((["--device", "cuda"], "CUDA is not available on this machine"))

GEN_NO_PRESET = [  # cases that must not use --preset (weights named other ways)
    (["-e", "{d}/env_typo.json"], "unknown key 'trained_autoencoder_pth' (did you mean 'trained_autoencoder_path'?)"),
    (["-c", "{d}/net.json", "-e", "{d}/env_cut.json"], "cut.pt is not a readable checkpoint (truncated or not a torch file)"),
    (["-c", "{d}/net.json", "-e", "{d}/env_wrong.json"], "a controlnet checkpoint is a dict with 'controlnet_state_dict', but this file holds"),
    (["-c", "{d}/net.json", "-e", "{d}/env_half.json"], "trained_diffusion_path"),
    (["-c", "{d}/net.json", "-e", "{d}/env_empty.json"], "trained_diffusion_path = '' not found"),
    (["--weights-dir", "{d}/cut_weights"], "diff_unet_3d_rflow-ct.pt is not a readable checkpoint (truncated or not a torch file)"),
    (["--weights-dir", "{d}/nowhere"], "is not a folder"),
    (["-c", "{d}/net.json"], "-c/--network-config: given, but no weights are"),
    (["--version", "rflow"], "--version: given, but no weights are"),
]


@pytest.mark.parametrize("extra, fragment", GEN)
def test_generate_errors(F, tmp_path, no_heavy_work, extra, fragment):
    out = tmp_path / "out"
    argv = ["--preset", "tiny", *GRID, "-o", str(out)] + [sub(F, a) for a in extra]
    rc, _, err = call(generate_cli, argv)
    assert rc == 2, err
    assert err.startswith("maisi_generate: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sub(F, fragment) in err, err
    assert not out.exists() or not any(out.iterdir())          # nothing written


@pytest.mark.parametrize("extra, fragment", GEN_NO_PRESET)
def test_generate_weight_errors(F, tmp_path, no_heavy_work, extra, fragment):
    out = tmp_path / "out"
    rc, _, err = call(generate_cli, [*GRID, "-o", str(out)] + [sub(F, a) for a in extra])
    assert rc == 2 and err.startswith("maisi_generate: error: ") and len(err.splitlines()) == 1, err
    assert sub(F, fragment) in err, err


QC = [
    (["{d}/missing.nii.gz", "{mask}"], "{d}/missing.nii.gz does not exist"),
    (["{d}/cut.nii.gz", "{mask}"], "cut.nii.gz is not a readable NIfTI file"),
    (["{image}", "{d}/odd.nii.gz"], "label: values [150] are not MAISI ids"),
    (["{image}", "{d}/lab_small.nii.gz"], "label: shape (16, 32, 32) differs from image shape (32, 32, 32)"),
    (["{image}", "{mask}", "--organs", "heart"], "organs: unknown organ group 'heart'"),
    (["{image}", "{mask}", "--json", "{d}/obj.json"], "obj.json exists; pass --overwrite"),
    (["{image}", "{mask}", "--json", "{d}/emptydir"], "emptydir is a folder; give a file name"),
    (["{image}", "{mask}", "--png", "{d}/afile/qc.png"], "afile is a file, not a folder"),
    (["{image}", "{mask}", "--statistics", "{d}/nostats.json"], "statistics: no such file"),
    (["{d}/.ct.nii.gz.a1b2c3d4.nii.gz", "{mask}"], "is a temporary file left by an interrupted write"),
    (["{image}", "{mask}", "--rule", "strict"], "argument --rule: invalid choice"),
    (["{image}"], "the following arguments are required: label"),
]

FID = [
    (["--real", "{d}/nothing", "--synth", "{d}/vols"], "not found"),
    (["--real", "{d}/vols", "--synth", "{d}/nanvols"], "v.nii.gz has 4096 NaN/Inf voxels"),
    (["--real", "{d}/vols", "--synth", "{d}/emptydir"], "volumes: no .nii/.nii.gz files"),
    (["--real", "{d}/vols", "--synth", "{d}/.ct.nii.gz.a1b2c3d4.nii.gz"], "is a temporary file left by an interrupted write"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--target-shape", "64x64"], "--target-shape: expected three positive numbers"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--spacing", "0x1x1"], "--spacing: expected three positive numbers"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--batch-size", "0"], "--batch-size: expected a positive integer"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--center-slices-ratio", "2"], "--center-slices-ratio: expected a number in (0, 1]"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--network", "radimagenet_resnet50"], "needs a local weights file"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--network", "radimagenet_resnet50", "--weights", "{d}/ck/cut.pt"],
     "--weights: {d}/ck/cut.pt is not a readable checkpoint"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--json", "{d}/obj.json"], "obj.json exists; pass --overwrite"),
    (["--real", "{d}/vols", "--synth", "{d}/vols", "--device", "gpu"], "device: got 'gpu'"),
    (["--real", "{d}/vols"], "the following arguments are required: --synth"),
]

MASKDB = [
    (["{d}/nowhere", "{d}/db2.json"], "mask_dir: {d}/nowhere is not a folder"),
    (["{d}/emptydir", "{d}/db2.json"], "no .nii/.nii.gz files"),
    (["{d}/masks", "{d}/emptydir"], "out_json: {d}/emptydir is a folder"),
    (["{d}/masks", "{d}/afile/db.json"], "{d}/afile is a file, not a folder"),
    (["{d}/masks", "{d}/db_out_exists.json"], "exists; pass overwrite=True"),
    (["{d}/masks", "{d}/db2.json", "--names", "{d}/notjson.json", "--out-mask-dir", "{d}/o"], "notjson.json is not valid JSON"),
    (["{d}/masks", "{d}/db2.json", "--names", "{d}/obj.json"], "out_mask_dir: needed"),
]

PHANTOMS = [
    (["--out", "{d}/afile"], "--out: {d}/afile is a file, not a folder"),
    (["--out", "{d}/afile/sub"], "{d}/afile is a file, not a folder"),
    (["--out", "{d}/ph", "--size", "16", "16", "0"], "--size: expected 3 positive integers"),
    (["--out", "{d}/ph", "--regions", "arm"], "--regions: unknown body region 'arm'"),
    (["--out", "{d}/ph", "--n", "0"], "--n: expected a positive integer"),
    (["--out", "{d}/ph", "--seed", "-1"], "--seed: expected a non-negative integer"),
    (["--out", "{d}/ph", "--tumor-prob", "2"], "--tumor-prob: expected a number in [0, 1]"),
    (["--out", "{d}/ph", "--spacing", "nan", "4", "4"], "--spacing: expected 3 positive numbers"),
]

COMMANDS = [("maisi_qc", qc_cli, a, m) for a, m in QC] + [("maisi_fid", fid_cli, a, m) for a, m in FID] + \
           [("maisi_build_mask_db", build_mask_db_cli, a, m) for a, m in MASKDB] + \
           [("maisi_make_phantoms", make_phantoms_cli, a, m) for a, m in PHANTOMS]


@pytest.mark.parametrize("prog, cli, args, fragment", COMMANDS, ids=[f"{c[0]}-{i}" for i, c in enumerate(COMMANDS)])
def test_command_errors(F, prog, cli, args, fragment):
    rc, _, err = call(cli, [sub(F, a) for a in args])
    assert rc == 2, (rc, err)
    assert err.startswith(f"{prog}: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert sub(F, fragment) in err, err
    assert not (F["d"] / "ph").exists()


API = [  # (callable on the fixture dict, exception type, fragment)
    (lambda F: MaisiPipeline(None), TypeError, "networks: expected a MaisiNetworks"),
    (lambda F: MaisiPipeline("tiny"), TypeError, "got str"),
    (lambda F: F["pipe"](mask=(np.zeros((2, 32, 32, 32)), np.eye(4))), ValueError, "holds 2 volumes (shape (2, 32, 32, 32))"),
    (lambda F: F["pipe"](mask=(np.zeros((32, 32, 32)), np.eye(4) * 12)), ValueError, "holds only background"),
    (lambda F: F["pipe"](mask=[1, 2, 3]), TypeError, "mask: expected a NIfTI path or an (array, affine) pair"),
    (lambda F: F["pipe"](latents=torch.full((1, 4, 16, 16, 16), float("nan"))), ValueError, "latents: 16384 of its values are NaN or Inf"),
    (lambda F: F["pipe"](output_size=[32] * 3, spacing=[12.] * 3, latents=torch.full((1, 4, 8, 8, 8), float("inf"))), ValueError, "NaN or Inf"),
    (lambda F: F["pipe"](mask=F["mask"], output_size=[32] * 3, spacing=[4.] * 3), ValueError, "would be cropped away"),
    (lambda F: F["pipe"](output_dir=F["d"] / "afile" / "x"), NotADirectoryError, "afile is a file, not a folder"),
    (lambda F: F["pipe"](resume=True, seed=1), ValueError, "resume: needs output_dir"),
    (lambda F: prepare_user_mask(np.zeros((2, 8, 8, 8)), np.eye(4)), ValueError, "the array holds 2 volumes"),
    (lambda F: prepare_user_mask(F["d"] / "cut.nii.gz"), ValueError, "not a readable NIfTI file"),
    (lambda F: quality_check(np.zeros((8, 8, 8)), np.full((8, 8, 8), 150)), ValueError, "values [150] are not MAISI ids"),
    (lambda F: check_output_dir(F["d"] / "afile"), NotADirectoryError, "is a file, not a folder"),
    (lambda F: load_nifti(F["d"] / "cut.nii.gz"), ValueError, "truncated"),
    (lambda F: read_checkpoint(F["d"] / "ck" / "cut.pt"), ValueError, "is not a readable checkpoint (truncated or not a torch file)"),
    (lambda F: MaisiPipeline.from_pretrained(F["d"] / "cut_weights"), ValueError, "is not a readable checkpoint"),
]


@pytest.mark.parametrize("k", range(len(API)))
def test_api_errors(F, no_heavy_work, k):
    F.setdefault("pipe", MaisiPipeline.from_preset("tiny", "cpu"))
    fn, exc, fragment = API[k]
    with pytest.raises(exc) as e: fn(F)
    assert fragment in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_subprocess_error_has_no_traceback(F):
    "As a user runs it (the kill test below runs maisi_generate so): exit status 2, one line, no traceback."
    code = "import sys; from maisi_nb.qc import qc_cli; sys.exit(qc_cli(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    r = subprocess.run([sys.executable, "-c", code, sub(F, "{image}"), sub(F, "{d}/odd.nii.gz")], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "maisi_qc: error: label: values [150] are not MAISI ids" in r.stderr, r.stderr


# NaN / Inf at every stage

KW = dict(output_size=[32] * 3, spacing=[12.] * 3, num_inference_steps=2, seed=3, progress_bar=False)


def test_nan_in_the_denoising_loop_is_retried(tmp_path):
    "Attempt 1 turns NaN mid-sampling: it is recorded, attempt 2 is kept, and the written volume is finite."
    pipe = MaisiPipeline.from_preset("tiny", "cpu")
    def poison(e):
        if e["stage"] == "image" and e["attempt"] == 0: e["latents"].fill_(float("nan"))
    r = pipe(max_attempts=2, callback=poison, output_dir=tmp_path, **KW)
    s = r.samples[0]
    assert [a["nonfinite_voxels"] > 0 for a in s.attempts] == [True, False]
    assert NONFINITE in s.attempts[0]["qc_failed"]
    assert np.isfinite(load_nifti(s.files["image"])[0]).all()
    side = json.loads(s.files["sidecar"].read_text())
    assert side["config"]["num_inference_steps"] == 2 and side["attempts"][1]["num_inference_steps"] == 2


@pytest.mark.parametrize("role, value", [("diffusion_unet", float("nan")), ("autoencoder", float("inf")),
                                         ("controlnet", float("nan"))])
def test_non_finite_weights_never_written(tmp_path, role, value):
    pipe = MaisiPipeline.from_preset("tiny", "cpu")
    with torch.no_grad():
        for p in pipe.networks[role].parameters(): p.fill_(value)
    for qc in (True, False):
        with pytest.raises(NonFiniteOutputError, match="all 2 attempt\\(s\\) gave a volume with NaN/Inf voxels"):
            pipe(max_attempts=2, qc=qc, output_dir=tmp_path, **KW)
        assert not any(tmp_path.iterdir())


def test_quality_check_and_maisi_qc_fail_non_finite(F):
    img, lab = load_nifti(F["image"], np.float32)[0], load_nifti(F["mask"])[0]
    assert quality_check(img, lab).passed
    for v in (np.nan, np.inf, -np.inf):
        bad = img.copy(); bad[0, 0, 0] = v                      # one voxel, outside every organ
        q = quality_check(bad, lab)
        assert not q.passed and q.failed == [NONFINITE] and q.status == "failed"
    rc, out, err = call(qc_cli, [sub(F, "{d}/nan_ct.nii.gz"), str(F["mask"])])
    assert rc == 1 and "FAILED" in out and NONFINITE in out, out + err


@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_maisi_fid_checks_synthetic_volumes_first(F, tmp_path, monkeypatch, value):
    "One non-finite voxel in one synthetic volume (an Inf the HU clip would hide) stops maisi_fid before any feature."
    import maisi_nb.qc as qc
    def boom(*a, **k): raise AssertionError("features computed before the synthetic volumes were checked")
    monkeypatch.setattr(qc, "extract_features_2p5d", boom)
    img, aff = load_nifti(F["d"] / "vols" / "v0.nii.gz", np.float32)
    save_nifti(img, aff, tmp_path / "synth" / "a.nii.gz"); img[3, 4, 5] = value
    bad = save_nifti(img, aff, tmp_path / "synth" / "b.nii.gz")
    rc, _, err = call(fid_cli, ["--real", sub(F, "{d}/vols"), "--synth", str(tmp_path / "synth"), "--network", "random_tiny",
                                "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2 and err.strip() == (f"maisi_fid: error: synth: {bad} has 1 NaN/Inf voxels; FID of such a volume means "
                                       "nothing (check it with maisi_qc)"), err
    assert not list((tmp_path / "cache").rglob("*.pt"))
    with pytest.raises(ValueError, match="synth: .*b.nii.gz has 1 NaN/Inf voxels"):
        qc.compute_fid(F["d"] / "vols", tmp_path / "synth", "random_tiny")


def test_nothing_checked_is_not_passed(F, tmp_path):
    "A label with body only (or only organs QC does not measure) is 'not checked', and maisi_qc exits 1."
    img = load_nifti(F["image"], np.float32)[0]
    body = np.full(img.shape, 200, np.uint8)
    q = quality_check(img, body)
    assert (q.passed, q.status) == (False, "not checked")
    save_nifti(body, np.eye(4), tmp_path / "body.nii.gz")
    rc, out, _ = call(qc_cli, [str(F["image"]), str(tmp_path / "body.nii.gz")])
    assert rc == 1 and "NOT CHECKED" in out


def test_field_of_view_without_anatomy_warns():
    "A 32³ request at 0.5 mm is a fragment of the body's inside: a warning says so, for every phantom seed."
    pipe = MaisiPipeline.from_preset("tiny", "cpu")
    for seed in range(3):
        with pytest.warns(UserWarning, match="holds almost none of the requested anatomy"):
            pipe(output_size=[32] * 3, spacing=[0.5] * 3, num_inference_steps=1, max_attempts=1, seed=seed, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                      # a proper field of view: no warning
        pipe(output_size=[32] * 3, spacing=[12.] * 3, num_inference_steps=1, max_attempts=1, seed=0, progress_bar=False)


# kill, then resume

def digest(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_kill_then_resume_equals_uninterrupted(F, tmp_path):
    "SIGKILL mid-batch; readers skip its temp files; --resume keeps complete samples and remakes the rest identically."
    code = "import sys; from maisi_nb.inference import generate_cli; sys.exit(generate_cli(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    args = ["--preset", "tiny", "--output-size", "32", "32", "32", "--spacing", "12", "12", "12", "--num-inference-steps", "6",
            "--max-attempts", "1", "-s", "5", "--num-output-samples", "4"]
    a, b = tmp_path / "a", tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-c", code, *args, "-o", str(b)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (b / "sample_seed5_000.json").exists() and p.poll() is None and time.time() - t0 < 240: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    assert (b / "sample_seed5_000.json").exists()
    (b / ".sample_seed5_003_image.nii.gz.zz9kill0.nii.gz").write_bytes(b"half a volume")   # as a kill mid-write leaves
    assert all(not n.name.startswith(".") for n in list_volumes(b))         # maisi_fid's reader skips it
    r = subprocess.run([sys.executable, "-c", code, *args, "-o", str(b)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-c", code, *args, "-o", str(b), "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "complete from the interrupted run" in r.stdout
    rc, _, err = call(generate_cli, args + ["-o", str(a)])
    assert rc == 0, err
    assert sorted(x.name for x in a.iterdir()) == sorted(x.name for x in b.iterdir())   # no temp file left
    for i in range(4):
        for k in ("image.nii.gz", "label.nii.gz", "preview.png"):
            assert digest(a / f"sample_seed5_{i:03d}_{k}") == digest(b / f"sample_seed5_{i:03d}_{k}"), (i, k)


def test_sample_seed_depends_only_on_index(tmp_path):
    pipe = MaisiPipeline.from_preset("tiny", "cpu")
    one = pipe(num_output_samples=1, max_attempts=1, **KW)
    three = pipe(num_output_samples=3, max_attempts=1, **KW)
    assert np.array_equal(one.images[0], three.images[0]) and three.samples[2].seed == inference.sample_seed(3, 2)


# pickle payloads named like released checkpoints

def test_pickle_payload_refused_everywhere(F, tmp_path, no_heavy_work):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"state_dict": Evil(marker)}, protocol=2)
    import shutil
    for name in RELEASED:
        d = tmp_path / name.replace(".", "_")
        shutil.copytree(F["weights"], d)
        (d / "models" / name).write_bytes(payload)
        with pytest.raises(ValueError, match="refused by torch.load\\(weights_only=True\\)"):
            MaisiPipeline.from_pretrained(d)
        rc, _, err = call(generate_cli, ["--weights-dir", str(d), *GRID, "-o", str(tmp_path / "o")])
        assert rc == 2 and "refused by torch.load" in err and len(err.splitlines()) == 1, err
        env = {k: str(d / "models" / n) for k, n in zip(inference.ENV_WEIGHT_KEYS.values(), RELEASED)}
        (tmp_path / "env.json").write_text(json.dumps(env))
        rc, _, err = call(generate_cli, ["-c", sub(F, "{d}/net.json"), "-e", str(tmp_path / "env.json"), *GRID, "-o", str(tmp_path / "o")])
        assert rc == 2 and "refused by torch.load" in err, err
        with pytest.raises(ValueError, match="refused"): read_checkpoint(d / "models" / name)
    # the diffusion checkpoint's version is read from its contents when its name does not tell
    (tmp_path / "unet.pt").write_bytes(payload)
    with pytest.raises(ValueError, match="refused"): inference._guess_version(tmp_path / "unet.pt")
    # feature networks and the FID feature cache
    rc, _, err = call(fid_cli, ["--real", sub(F, "{d}/vols"), "--synth", sub(F, "{d}/vols"), "--network",
                                "radimagenet_resnet50", "--weights", str(tmp_path / "unet.pt")])
    assert rc == 2 and "not a readable checkpoint" in err, err
    cache = FeatureCache(tmp_path / "cache", {"s": 1})
    vol = F["d"] / "vols" / "v0.nii.gz"
    cache.path(vol).parent.mkdir(parents=True); cache.path(vol).write_bytes(payload)
    assert cache.load(vol) is None
    assert not marker.exists()
