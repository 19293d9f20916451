"The interactive tools driven from code: the generation panel's controls, errors, Cancel (synchronous and in its thread), the overlay opacity and the 3D view's geometry."
import threading
import numpy as np
import pytest
import torch
from maisi_nb.inference import MaisiPipeline, default_pipeline, render_slices, OVERLAY_ALPHA
from maisi_nb.labels import modality_id
from maisi_nb.networks import build_networks
from maisi_nb.panel import (GenerationPanel, SliceViewer, VIEWER_NOTE, itk_image_dict, itk_physical_point, render_views,
                            to_itk_image, view_3d, _itkwidgets)

torch.set_num_threads(1)
LPS = np.diag([-1., -1., 1., 1.])

@pytest.fixture(scope="module")
def tiny(): return MaisiPipeline(build_networks("tiny", "cpu", seed=0), source="tiny")

def small_panel(pipe, tmp_path, **kw):
    p = GenerationPanel(pipe, output_dir=tmp_path / "out", **kw)
    for w, v in zip(p.output_size + p.spacing, [32, 32, 32, 12., 12., 12.]): w.value = v
    p.steps.value, p.max_attempts.value = 2, 1
    return p

def test_generate_error_clears_and_empty_region(tiny, tmp_path):
    p = small_panel(tiny, tmp_path, background=False)
    p.generate_button.click()
    assert p.status.value.startswith("done") and p.viewer_box.children and not p.save_button.disabled
    p.output_size[2].value = 40; p.generate_button.click()               # bad grid: message, old result gone
    assert "output_size: Z = 40" in p.status.value
    assert (p.result, p.viewer_box.children, p.qc_html.value, p.progress.value, p.save_button.disabled) == (None, (), "", 0, True)
    p.output_size[2].value = 32; p.body_region.value = ()
    calls = []
    p.progress.observe(lambda ch: calls.append(ch), "value")
    p.generate_button.click()                                               # refused before any work
    assert "body region: select at least one" in p.status.value and calls == [] and p.result is None

def test_cancel_sync_and_warning_once(tiny, tmp_path):
    p = small_panel(tiny, tmp_path, background=False)
    p.scheduler.value, p.max_attempts.value = "ddpm", 3
    p.generate_button.click()
    assert p.status.value.count("DDPM sampling with num_inference_steps") == 1, p.status.value
    p.steps.value = 5
    p.progress.observe(lambda ch: p.cancel_button.click(), "value")
    p.generate_button.click()
    assert "cancelled" in p.status.value and p.progress.value == 0 and p.result is None
    assert (p.generate_button.disabled, p.cancel_button.disabled) == (False, True)

def test_cancel_background_thread(tiny, tmp_path):
    p = small_panel(tiny, tmp_path)
    assert p.background
    p.steps.value = 1000
    started = threading.Event()
    p.progress.observe(lambda ch: started.set(), "value")
    p.generate_button.click()
    assert started.wait(120) and p.thread.is_alive() and p.generate_button.disabled
    p.cancel_button.click(); p.thread.join(120)
    assert not p.thread.is_alive() and "cancelled" in p.status.value and p.result is None

def test_no_mask_generator_sizes_scale_the_phantom(tiny, tmp_path):
    from dataclasses import replace
    bare = MaisiPipeline(replace(tiny.networks, mask_generation_autoencoder=None, mask_generation_diffusion=None))
    p = GenerationPanel(bare, output_dir=tmp_path / "bare", background=False)
    assert not p.has_mask_generator and p.mask_steps.disabled and not any(c.disabled or s.disabled for c, s in p.sizes.values())
    p.sizes["liver"][0].value, p.sizes["liver"][1].value = True, 0.9; p.steps.value = 2
    p.generate_button.click()   # no mask generator: the phantom is scaled to the requested size
    assert p.status.value.startswith("done"), p.status.value
    assert p.result.samples[0].mask["source"] == "phantom" and p.result.samples[0].mask["organ_scale"]["liver"] > 1
    q = GenerationPanel(tiny, output_dir=tmp_path / "full", background=False)
    assert q.has_mask_generator and not q.mask_steps.disabled and not any(c.disabled for c, s in q.sizes.values())

def test_size_sliders_draw_with_the_bundled_mask_generator(tmp_path):
    "The demo model with its bundled mask generator: ticked sizes make the panel draw the mask, larger liver for a larger request."
    pipe = default_pipeline(mask_generator=True)
    livers = {}
    for q in (0.1, 0.9):
        p = small_panel(pipe, tmp_path / str(q), background=False)
        assert p.has_mask_generator and not p.mask_steps.disabled
        p.sizes["liver"][0].value, p.sizes["liver"][1].value = True, q
        p.steps.value, p.mask_steps.value, p.seed.value, p.max_attempts.value = 2, 50, 3, 1
        p.generate_button.click()
        assert p.status.value.startswith("done"), p.status.value
        s = p.result.samples[0]
        assert s.mask["source"] == "generated" and p.result.config["controllable_anatomy_size"] == [["liver", q]]
        livers[q] = int((np.asarray(s.label) == 1).sum())
    assert livers[0.9] > livers[0.1] > 0, livers

def test_demo_model_contrast(tmp_path):
    p = GenerationPanel(output_dir=tmp_path / "demo", background=False)  # the demo model has a modality input
    assert not p.modality.disabled and modality_id(p.settings()["modality"]) == p.pipeline.default_modality   # the model's own phase
    p.modality.value = "ct_contrast"; p.steps.value = 2
    p.generate_button.click()
    assert p.status.value.startswith("done"), p.status.value
    assert p.result.config["modality"] == 3                                 # contrast-enhanced CT's class label
    assert all(w.style.description_width == "initial" for w in (p.max_attempts, p.mask_steps, p.body_region))

def test_overlay_opacity():
    rng = np.random.default_rng(0)
    img = rng.normal(0, 300, (16, 16, 16)).astype(np.float32); lab = rng.integers(0, 6, (16, 16, 16)).astype(np.uint8)
    assert render_views(img, lab, alpha=OVERLAY_ALPHA) == render_slices(img, lab)
    v = SliceViewer(img, lab)
    assert v.opacity.value == .3
    a = v.view.value; v.opacity.value = .9
    assert v.view.value != a
    v.overlay.value = False
    assert v.opacity.disabled and v.view.value == render_slices(img, None)
    v.show_3d()
    if _itkwidgets() is None: assert "needs itkwidgets" in v.note_3d.value

def oblique(seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4); aff[:3, :3] = q * [0.7, 1.5, 2.5]; aff[:3, 3] = rng.normal(0, 50, 3)
    return aff, rng.normal(size=(3, 4, 5)).astype(np.float32)

def test_itk_geometry_matches_affine():
    aff, vol = oblique()
    d = itk_image_dict(vol, aff)
    assert d["size"] == (3, 4, 5) and d["data"].shape == (5, 4, 3)
    np.testing.assert_allclose(d["spacing"], [0.7, 1.5, 2.5])
    np.testing.assert_allclose(d["direction"].T @ d["direction"], np.eye(3), atol=1e-12)
    for idx in [(0, 0, 0), (2, 3, 4), (1, 0, 3)]:
        np.testing.assert_allclose(itk_physical_point(d, idx), (LPS @ aff @ [*idx, 1])[:3])
        assert d["data"][idx[::-1]] == vol[idx]
    img = to_itk_image(vol, aff)
    if isinstance(img, dict): assert img["origin"] == d["origin"]       # ITK absent: the same dict
    else:                                                                 # ITK present: what the viewer gets
        np.testing.assert_allclose(tuple(img.GetSpacing()), d["spacing"])
        np.testing.assert_allclose(tuple(img.GetOrigin()), d["origin"])
        np.testing.assert_allclose(np.array(img.GetDirection()), d["direction"], atol=1e-12)
        np.testing.assert_allclose(tuple(img.TransformIndexToPhysicalPoint((2, 3, 4))), (LPS @ aff @ [2, 3, 4, 1])[:3])
        assert img.GetPixel((2, 3, 4)) == pytest.approx(float(vol[2, 3, 4]))

def test_itk_geometry_errors_and_note():
    _, vol = oblique()
    with pytest.raises(ValueError, match="affine: expected a 4x4"): itk_image_dict(vol, np.eye(3))
    with pytest.raises(ValueError, match=r"image: expected an \(X,Y,Z\) volume"): itk_image_dict(vol[0], np.eye(4))
    if _itkwidgets() is None: assert view_3d(vol, None, np.eye(4)) == VIEWER_NOTE

def _tool(name):
    import importlib, sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try: return importlib.import_module(name)
    finally: sys.path.pop(0)

def test_local_3d_viewer_serves_viewer_and_files(tmp_path):
    import urllib.request
    lv = _tool("local_3d_viewer")
    with pytest.raises(FileNotFoundError, match="--viewer: .* is not itk-vtk-viewer's dist folder"): lv.serve(tmp_path, [])
    dist = tmp_path / "dist"; dist.mkdir()
    (dist / "index.html").write_text("<html>viewer</html>"); (dist / "itkVtkViewer.js").write_text("//")
    img = tmp_path / "s_image.nii.gz"; img.write_bytes(b"nifti bytes")
    server, root, base = lv.serve(dist, [img])
    try:
        assert base.startswith("http://127.0.0.1:")
        url = lv.viewer_url(base, img, tmp_path / "s_label.nii.gz")
        assert url == f"{base}/viewer/index.html?image={base}/data/s_image.nii.gz&labelImage={base}/data/s_label.nii.gz"
        assert urllib.request.urlopen(url, timeout=10).read() == b"<html>viewer</html>"
        assert urllib.request.urlopen(f"{base}/data/s_image.nii.gz", timeout=10).read() == b"nifti bytes"
    finally: server.shutdown()

def test_panel_page_loads_nothing_from_the_network(tmp_path):
    ps = _tool("panel_screenshot")
    page = ps.panel_html(tmp_path / "panel.html", generate=False).read_text()
    assert '<script src="embed.js"></script>' in page and "application/vnd.jupyter.widget-state+json" in page
    assert "http://" not in page and "https://" not in page and (tmp_path / "embed.js").stat().st_size > 1_000_000
