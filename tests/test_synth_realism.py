"""verse synth realism: intensity models (calibration, noise level, marrow heterogeneity,
soft tissue) and the rule that intensity-only randomness never moves the ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from verse_cli.synth import acquisition as acq


def test_calibration_keeps_air_and_water():
    x = np.array([-1000, -100, 0, 40, 1000], np.float32)
    y = acq.calibrate(x, gain=1.1, fat_gain=1.1, offset=3.0)
    assert y[0] == pytest.approx(-997.0)  # air stays at -1000 (plus the offset)
    assert y[2] == pytest.approx(3.0)  # water at the offset
    assert y[1] == pytest.approx(-107.0)  # fat scaled about water
    assert y[4] == pytest.approx(1103.0)  # bone scaled about water
    assert np.all(np.diff(acq.calibrate(np.linspace(-1024, 3000, 500, dtype=np.float32), 0.9, 0.92, 0)) > 0)


@pytest.mark.parametrize("sp", [(0.4, 0.4, 2.0), (0.9, 0.9, 0.9), (2.5, 2.5, 3.0)])
def test_noise_level_is_what_the_realism_bench_measures(sp):
    sc = acq.Scanner("standard", 0.5, 0.0, 40.0, 0.5, False, -1024.0, noise_hp=0.6, noise_hp_mm=1.5)
    shape = tuple(int(min(np.ceil(60 / s), 120)) for s in sp)
    noise = acq.ct_noise(shape, np.array(sp), 2, sc, np.random.default_rng(3))
    assert acq.noise_level(noise, np.array(sp)) == pytest.approx(40.0, rel=0.15)


def test_band_pass_matches_wrapped_gaussians():
    from scipy import ndimage

    w = np.random.default_rng(0).standard_normal((32, 40, 24)).astype(np.float32)
    lo, hi = np.array([1.0, 1.2, 0.9]), np.array([3.0, 3.5, 2.5])
    ref = ndimage.gaussian_filter(w, lo, mode="wrap", truncate=4.0)
    ref -= ndimage.gaussian_filter(w, hi, mode="wrap", truncate=4.0)
    got = acq.band_pass(w, lo, hi)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_marrow_tile_is_heterogeneous_and_zero_mean():
    from verse_cli.synth.anatomy import marrow_tile

    spreads = []
    for s in range(6):
        h, _ = marrow_tile(np.random.default_rng(s), trab=150.0)
        assert h.shape == (64, 64, 64) and abs(float(h.mean())) < 1e-3
        spreads.append(float(np.percentile(h, 95) - np.percentile(h, 5)))
    # from an almost even body to a very heterogeneous one
    assert min(spreads) > 30 and max(spreads) > 150


def test_intensity_draws_leave_the_main_stream_alone(monkeypatch):
    from verse_cli.synth import anatomy
    from verse_cli.synth.engine import side_rng

    a, b = np.random.default_rng(7), np.random.default_rng(7)
    side_rng(a, 1).random(1000)
    assert a.random() == b.random()
    anatomy.bone_hu(a, 0.5)
    # the marrow texture comes from a side stream: drawing none of it leaves the main stream as it is
    monkeypatch.setattr(anatomy, "marrow_tile", lambda rng, trab: (np.zeros((64, 64, 64), np.float32), {}))
    anatomy.bone_hu(b, 0.5)
    assert a.random() == b.random()


def test_lumbar_case_tissue_statistics():
    """A small lumbar case: heterogeneous trabecular bone, muscle and fat in realistic ranges."""
    from scipy import ndimage

    from verse_cli.synth import generate_case

    c = generate_case(300, region="lumbar", max_voxels=600_000)
    body = ndimage.binary_erosion(c.mask > 0, iterations=1)
    trab = c.ct[body]
    assert np.percentile(trab, 95) - np.percentile(trab, 5) > 150
    soft = ndimage.gaussian_filter(c.ct.astype(np.float32), 1.0)
    far = ndimage.distance_transform_edt(c.mask == 0) > 8
    musc = c.ct[far & (soft > 10) & (soft < 100)]
    fat = c.ct[far & (soft > -160) & (soft < -50)]
    assert 10 < np.median(musc) < 70
    assert -135 < np.median(fat) < -65


def test_trabecular_texture_is_striated_along_the_spine():
    """Cancellous texture: zero mean, unit SD, longer-correlated along the vertebra's axis (z)
    than across it (vertical trabeculae outlast the horizontal ones), more so when old."""
    from verse_cli.synth.anatomy import TEX_VOX, trabecular_texture

    def corr(x, axis, mm):
        k = max(1, round(mm / TEX_VOX[axis]))
        return float((x * np.roll(x, k, axis=axis)).mean())

    for rodness in (0.0, 1.0):
        x, _ = trabecular_texture(np.random.default_rng(5), rodness)
        assert abs(float(x.mean())) < 1e-3 and float(x.std()) == pytest.approx(1.0, abs=1e-3)
        assert corr(x, 2, 1.6) > corr(x, 0, 1.6) + 0.1
    assert trabecular_texture(np.random.default_rng(5), 1.0)[1]["aniso"] > trabecular_texture(
        np.random.default_rng(5), 0.0)[1]["aniso"]


def test_low_density_draws_keep_the_body_core_above_soft_tissue():
    """The oldest, least dense draws: mean trabecular HU >= 70 (no pile-up on a floor), and the
    marrow's slow variation, with its level shift and centre drop, keeps a body core's HU above
    ~40 HU, where a hard 50 HU floor plus texture used to give cores at water or fat."""
    from verse_cli.synth.anatomy import bone_hu

    for s in range(4):
        b = bone_hu(np.random.default_rng(s), 1.0)
        assert 70 <= b.trabecular < 125
        assert b.centre_drop <= 0.25 * b.trabecular + 1e-6
        mat = b.material(key=20)
        pts = np.random.default_rng(s).uniform(-60, 60, (20000, 3)).astype(np.float32)
        hu = mat(pts, np.full(len(pts), -10.0, np.float32))  # 10 mm deep: trabecular core
        assert np.median(hu) - b.centre_drop > 40
        assert np.percentile(hu, 10) > -40


def _rendered_shapes(monkeypatch, seed: int, **kw):
    """The pelvis, sacrum and vertebra shapes a case is rendered from, with their levels."""
    from verse_cli.synth import anatomy, generate_case

    got: dict = {}

    def recorder(name, make):
        def record(*args, **kwargs):
            shape = make(*args, **kwargs)
            got.setdefault(name, []).append((args[0], shape))
            return shape
        return record

    for name in ("pelvis_shape", "sacrum_shape", "vertebra_shape"):
        monkeypatch.setattr(anatomy, name, recorder(name, getattr(anatomy, name)))
    generate_case(seed, **kw)
    return got


def _gap_mm(a, b, pts) -> float:
    """Distance between two solids from their SDFs: twice the least max(d_a, d_b) over points."""
    return 2.0 * float(np.maximum(a.sdf(pts), b.sdf(pts)).min())


def test_ilium_clears_the_l5_transverse_process_and_the_sacrum(monkeypatch):
    """The iliolumbar ligament, not bone, joins the L5 transverse process to the iliac crest, and
    the sacroiliac joints are a joint space: the ilium touches neither L5 nor the sacrum."""
    from verse_cli.synth.anatomy import SI_JOINT_MM

    got = _rendered_shapes(monkeypatch, 301, region="lumbar", max_voxels=200_000)
    pelvis = got["pelvis_shape"][0][1]
    sacrum = got["sacrum_shape"][0][1]
    l5, l5_shape = next((lv, sh) for lv, sh in got["vertebra_shape"] if lv.name == "L5")
    rng = np.random.default_rng(0)
    around_l5 = l5.to_world(rng.uniform([-75, -60, -45], [75, 40, 30], (150_000, 3))).astype(np.float32)
    assert _gap_mm(pelvis, l5_shape, around_l5) >= 8.0
    sac_lv = got["sacrum_shape"][0][0]
    around_sacrum = sac_lv.to_world(rng.uniform([-80, -60, -110], [80, 30, 10], (150_000, 3))).astype(np.float32)
    assert _gap_mm(pelvis, sacrum, around_sacrum) >= SI_JOINT_MM - 0.5
