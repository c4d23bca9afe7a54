"""flexsp-profile: the fits recover known coefficients from synthetic timings; the written file
loads as a CostModel the planner accepts; bad config values raise with the offending value; a
tiny end-to-end profile on 2 gloo ranks writes every output (bounded, no timed assertions)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from flexsp.profile.config import ProfileConfig
from flexsp.profile.fit import fit_comm_per_token, fit_compute, fit_link
from solver.costmodel import CostModel
from solver.planner import plan_batch

SHAPES = [[128], [256], [512], [1024], [2048], [64] * 8, [32] * 32, [512, 256, 128], [1024, 1024]]


def _time(L, a1, a2, b, sp=1, c=0.0):
    L = np.asarray(L, dtype=float)
    return (a1 * (L * L).sum() + a2 * L.sum()) / sp + b + c * L.sum()


def test_fit_recovers_known_coefficients():
    a1, a2, b = 3e-5, 0.11, 17.0
    fit = fit_compute([(L, _time(L, a1, a2, b)) for L in SHAPES])
    assert fit.a1 == pytest.approx(a1, rel=1e-6)
    assert fit.a2 == pytest.approx(a2, rel=1e-6)
    assert fit.b == pytest.approx(b, rel=1e-6)
    assert fit.max_abs_rel < 1e-6


def test_fit_with_noise_stays_close_and_non_negative():
    rng = np.random.default_rng(0)
    a1, a2, b = 3e-5, 0.11, 17.0
    fit = fit_compute([(L, _time(L, a1, a2, b) * (1 + 0.02 * rng.standard_normal())) for L in SHAPES * 3])
    assert min(fit.a1, fit.a2, fit.b) >= 0
    assert fit.a1 == pytest.approx(a1, rel=0.15) and fit.a2 == pytest.approx(a2, rel=0.15)
    assert fit.median_abs_rel < 0.05


def test_comm_and_link_fits():
    a1, a2, b, c = 3e-5, 0.11, 17.0, 0.02
    comp = fit_compute([(L, _time(L, a1, a2, b)) for L in SHAPES])
    got, errs = fit_comm_per_token([(L, _time(L, a1, a2, b, sp=4, c=c)) for L in SHAPES], comp, 4)
    assert got == pytest.approx(c, rel=1e-6) and max(map(abs, errs)) < 1e-6
    lat, bw = fit_link([1e5, 1e6, 8e6], [0.5 + s / 1e6 / 2.0 for s in (1e5, 1e6, 8e6)])
    assert lat == pytest.approx(0.5, rel=1e-6) and bw == pytest.approx(2.0, rel=1e-6)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="at least 3"):
        fit_compute([([10], 1.0)])
    with pytest.raises(ValueError, match="-1"):
        fit_compute([([10], 1.0), ([20], -1.0), ([30], 2.0)])
    with pytest.raises(ValueError, match="degrees >= 2, got 1"):
        fit_comm_per_token([([10], 1.0)], fit_compute([(L, _time(L, 1e-5, 0.1, 1)) for L in SHAPES]), 1)
    with pytest.raises(ValueError, match="power of two >= 1, got 3"):
        ProfileConfig(world_size=3)
    with pytest.raises(ValueError, match="'hybrid'"):
        ProfileConfig(modes=["hybrid"])
    with pytest.raises(ValueError, match="unknown profile config keys \\['bogus'\\]"):
        ProfileConfig.from_dict({"bogus": 1})


def test_hydra_config_matches_dataclass():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        cfg = compose(config_name="profile", overrides=["world_size=4"])
    pc = ProfileConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert pc.world_size == 4 and pc.model == "tiny"


@pytest.mark.slow
def test_end_to_end_profile_two_ranks(tmp_path):
    from flexsp.planning import load_cost_model
    from flexsp.profile import profile

    cfg = ProfileConfig(name="e2e", output_dir=str(tmp_path), world_size=2, repeats=1, progress=False,
                        compute_shapes=[[32], [64], [128], [32, 32, 64]], comm_shapes=[[64], [32, 96]],
                        link_mb=[0.01, 0.1], validate_batches=1, validate_tokens=256, validate_max_len=128,
                        timeout_s=120)
    res = profile(cfg)
    paths = res["paths"]
    for key in ("cost_model", "report", "summary", "plot"):
        assert paths[key].is_file(), key
    cm = CostModel.load(paths["cost_model"])
    assert cm.num_devices == 2 and cm.heads == 4 and cm.kv_heads == 2
    assert set(cm.bandwidth_gbps) == {2} and set(cm.p2p_bandwidth_gbps) == {2}
    assert cm.act_mb_per_token > 0 and "flexsp-profile" in cm.source
    plan = plan_batch([100, 30, 20, 5], cm, time_limit=0.5)
    assert plan.num_devices == 2 and plan.predicted_ms > 0
    assert load_cost_model(str(paths["cost_model"]), 4).num_devices == 4  # training reads it too
    report = json.loads(paths["report"].read_text())
    kinds = {r["kind"] for r in report["validation"]}
    assert kinds == {"micro-batch", "step"}
    assert "Validation" in paths["summary"].read_text()
