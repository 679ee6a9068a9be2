"""`mugv curate` scorers and configs on synthetic frames with known answers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mugv.core.curation import CurateConfig, FilterConfig, ShotConfig
from mugv.core.validate import ConfigError
from mugv.torch_backend.data.curation import scorers


def _texture(rng, h=61, w=83, sigma=2.0):
    """A smooth random RGB texture (odd shape on purpose): flow needs structure at several scales."""
    base = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), sigma)
    base = (base - base.min()) / (base.max() - base.min()) * 200 + 25
    return np.repeat(base[..., None], 3, axis=-1).round().astype(np.uint8)


def test_sharpness_is_the_laplacian_variance_and_blur_lowers_it():
    rng = np.random.default_rng(1)
    frame = _texture(rng, sigma=0.8)
    # reference: 3x3 Laplacian [0 1 0; 1 -4 1; 0 1 0] with OpenCV's default border (reflect-101)
    g = frame[..., 0].astype(np.float64)   # grey == any channel of a grey RGB frame
    p = np.pad(g, 1, mode="reflect")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * g
    got = scorers.sharpness([frame])
    assert abs(got - lap.var()) <= 1e-9 * lap.var(), f"sharpness {got} != numpy Laplacian variance {lap.var()}"
    blurred = ndimage.gaussian_filter(frame.astype(np.float64), (2.5, 2.5, 0)).round().astype(np.uint8)
    sharp_v, blur_v = scorers.sharpness([frame]), scorers.sharpness([blurred])
    assert blur_v < 0.1 * sharp_v, f"blurred frame sharpness {blur_v:.1f} not < 10% of sharp {sharp_v:.1f}"


@pytest.mark.parametrize("shift", [(0, 0), (2, 0), (0, 3), (3, 4)])
def test_farneback_motion_measures_a_known_shift(shift):
    rng = np.random.default_rng(2)
    big = _texture(rng, 90, 110, sigma=3.0)
    dy, dx = shift
    a = big[10:71, 10:93]
    b = big[10 - dy:71 - dy, 10 - dx:93 - dx]     # content moves by (+dy, +dx)
    got = scorers.motion_farneback([(a, b)] * 3, motion_width=a.shape[1])
    want = float(np.hypot(dx, dy))
    assert abs(got - want) <= 0.15 * want + 0.05, f"shift {shift}: flow magnitude {got:.3f}, expected {want:.3f}"
    # pixels are counted at motion_width: the same clip at twice the width reads twice the motion
    doubled = scorers.motion_farneback([(a, b)], motion_width=2 * a.shape[1])
    assert abs(doubled - 2 * scorers.motion_farneback([(a, b)], a.shape[1])) < 1e-9


def test_black_and_frozen_fractions():
    rng = np.random.default_rng(3)
    frames = np.stack([_texture(rng, 20, 30) for _ in range(6)])
    frames[4] = rng.integers(0, 6, frames[4].shape)          # black: dark and flat
    frames[5] = frames[4]                                    # a frozen pair (4 -> 5)
    assert scorers.black_fraction(frames) == pytest.approx(2 / 6), "frames 4 and 5 are black"
    assert scorers.frozen_fraction(frames) == pytest.approx(1 / 5), "only the pair (4, 5) is frozen"


def test_decide_names_each_failed_filter_and_skips_unmeasured():
    cfg = FilterConfig()
    scores = {"duration": 1.0, "short_side": 720.0, "aspect": 16 / 9, "black": 0.0, "frozen": 0.0,
              "sharpness": 150.0, "motion": 25.0, "aesthetic": None}
    failed = scorers.decide(scores, cfg, min_duration_s=2.0)
    assert [f["filter"] for f in failed] == ["duration", "sharpness", "motion"], failed
    assert failed[1] == {"filter": "sharpness", "value": 150.0, "min": 200.0, "max": 2000.0}
    ok = dict(scores, duration=3.0, sharpness=500.0, motion=5.0)
    assert scorers.decide(ok, cfg, 2.0) == [], "a clip inside every range fails nothing"


def test_unavailable_scorers_record_why():
    rng = np.random.default_rng(4)
    small = np.stack([_texture(rng, 24, 32) for _ in range(8)])
    clip = scorers.ClipFrames(0, 8, 2.0, 24, 32, small, {i: small[i] for i in range(8)})
    scores, skipped = scorers.score(clip, FilterConfig(motion_method="raft"))
    assert scores["motion"] is None and "raft_weights" in skipped["motion"], skipped
    assert scores["aesthetic"] is None and "aesthetic_weights" in skipped["aesthetic"], skipped
    scores, skipped = scorers.score(clip, FilterConfig(aesthetic_min=None))
    assert scores["motion"] is not None and skipped == {}, skipped


@pytest.mark.parametrize("cls, kwargs, field", [
    (FilterConfig, {"sharpness_min": 300.0, "sharpness_max": 200.0}, "sharpness_max"),
    (FilterConfig, {"motion_method": "lucas"}, "motion_method"),
    (FilterConfig, {"black_max": 1.5}, "black_max"),
    (ShotConfig, {"min_duration_s": 5.0, "max_duration_s": 2.0}, "max_duration_s"),
    (ShotConfig, {"content_threshold": 0.0}, "content_threshold"),
    (CurateConfig, {"executor": "spark"}, "executor"),
    (CurateConfig, {"batch_size": 0}, "batch_size"),
])
def test_config_errors_name_the_field(cls, kwargs, field):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{field} = "):
        cls(**kwargs)


def test_paper_defaults():
    f = FilterConfig()
    assert (f.sharpness_min, f.sharpness_max, f.motion_min, f.motion_max, f.aesthetic_min, f.motion_pairs) == \
        (200.0, 2000.0, 1.0, 20.0, 4.5, 3), "defaults must stay the paper's thresholds"
