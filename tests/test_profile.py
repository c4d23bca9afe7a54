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


def _time(L, a1, a2, b, sp=1, c=0.0, s=0.0):
    L = np.asarray(L, dtype=float)
    return (a1 * (L * L).sum() + a2 * L.sum()) / sp + b + c * L.sum() + s * L.size


def test_fit_recovers_known_coefficients():
    a1, a2, b = 3e-5, 0.11, 17.0
    fit = fit_compute([(L, _time(L, a1, a2, b)) for L in SHAPES])
    assert fit.a1 == pytest.approx(a1, rel=1e-6)
    assert fit.a2 == pytest.approx(a2, rel=1e-6)
    assert fit.b == pytest.approx(b, rel=1e-6)
    assert fit.max_abs_rel < 1e-6


def test_fit_recovers_per_sequence_ms():
    a1, a2, s, b = 3e-5, 0.11, 0.45, 17.0
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    samples = [(L, _time(L, a1, a2, b, s=s)) for L in shapes]
    fit = fit_compute(samples)
    assert fit.per_seq == pytest.approx(s, rel=1e-6)
    assert (fit.a1, fit.a2, fit.b) == pytest.approx((a1, a2, b), rel=1e-6)
    assert fit.max_abs_rel < 1e-6
    assert set(fit.stderr) == {"a1", "a2", "per_seq", "b"} and fit.stderr["per_seq"] < 1e-6
    # the paper's three-term form cannot express it: a visible misfit, per_seq pinned at 0
    old = fit_compute(samples, per_sequence=False)
    assert old.per_seq == 0.0 and old.max_abs_rel > 0.05
    # a group's document term is paid on every rank: not divided by the degree
    comp_c, errs = fit_comm_per_token([(L, _time(L, a1, a2, b, sp=2, s=s)) for L in shapes], fit, 2)
    assert comp_c == pytest.approx(0.0, abs=1e-9) and max(map(abs, errs)) < 1e-6


def test_noisy_per_sequence_fit_reports_its_uncertainty():
    rng = np.random.default_rng(1)
    shapes = (SHAPES + [[16] * 64, [512] + [16] * 32]) * 2
    fit = fit_compute([(L, _time(L, 3e-5, 0.11, 17.0, s=0.45) * (1 + 0.03 * rng.standard_normal())) for L in shapes])
    assert fit.per_seq == pytest.approx(0.45, rel=0.5)
    assert all(v > 0 for v in fit.stderr.values())


def _synthetic_raw(optimizer_ms=40.0):
    a1, a2, s, b = 3e-5, 0.11, 0.45, 17.0
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    return {"world_size": 2, "device": "cpu", "backend": "gloo", "model": "tiny", "threads_per_rank": 1,
            "model_config": {"vocab_size": 512, "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
                             "intermediate": 192, "dtype": "float32"},
            "num_params": 160000, "cpu_count": 2, "repeats": 3, "loadavg_start": [1.0, 1.0, 1.0],
            "loadavg_end": [1.5, 1.0, 1.0], "loadavg_per_pass": [[1.2, 1, 1], [1.4, 1, 1]],
            "compute": [(L, _time(L, a1, a2, b, s=s)) for L in shapes],
            "comm": {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, s=s, c=0.01)) for L in SHAPES[:4]]},
            "links": {}, "optimizer_ms": optimizer_ms, "optimizer_spread_ms": [optimizer_ms, 41.0, 45.0],
            "activation": {"method": "synthetic", "points": [], "bytes_per_token": 4096.0}}


def test_written_cost_model_has_per_sequence_and_step_overhead(tmp_path):
    from flexsp.profile.build import build_cost_model
    from flexsp.profile.report import write_outputs
    from solver.build import price_plan

    raw = _synthetic_raw(optimizer_ms=40.0)
    cfg = ProfileConfig(name="synth", capacity_tokens=1024)
    cm = build_cost_model(cfg, raw)
    raw["cost_model"] = cm.to_dict()
    raw["validation"] = []
    paths = write_outputs(raw, tmp_path, "synth", make_plot=False)
    data = json.loads(paths["cost_model"].read_text())
    assert data["step_overhead_ms"] == pytest.approx(40.0)
    assert data["per_sequence_ms"] == pytest.approx(0.45, rel=1e-6)
    loaded = CostModel.load(paths["cost_model"])
    assert loaded.capacity_tokens == 1024
    plan = plan_batch([900, 100, 30, 20, 5], loaded, time_limit=0.5)
    assert plan.predicted_ms == pytest.approx(price_plan(plan, [900, 100, 30, 20, 5], loaded))
    assert plan.predicted_ms > 40.0
    text = paths["summary"].read_text()
    assert "per_sequence_ms = 0.4500" in text and "step_overhead_ms = 40.00" in text
    assert "load average" in text.lower()


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
    assert cm.step_overhead_ms > 0 and cm.per_sequence_ms >= 0
    plan = plan_batch([100, 30, 20, 5], cm, time_limit=0.5)
    assert plan.num_devices == 2 and plan.predicted_ms > 0
    assert load_cost_model(str(paths["cost_model"]), 4).num_devices == 4  # training reads it too
    report = json.loads(paths["report"].read_text())
    kinds = {r["kind"] for r in report["validation"]}
    assert kinds == {"micro-batch", "step"}
    assert all(len(r["all_ms"]) == 1 for r in report["validation"])  # repeats=1: one interleaved run each
    assert report["loadavg_start"] and report["loadavg_end"] and len(report["loadavg_per_pass"]) == 1
    assert "Validation" in paths["summary"].read_text()


def test_joint_fit_recovers_compute_and_comm_terms():
    from flexsp.profile.fit import fit_joint
    a1, a2, s, b, c = 3e-5, 0.11, 0.45, 17.0, 0.02
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    comp, comm = fit_joint([(L, _time(L, a1, a2, b, s=s)) for L in shapes],
                           {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c, s=s)) for L in SHAPES[:5]]})
    assert (comp.a1, comp.a2, comp.per_seq, comp.b) == pytest.approx((a1, a2, s, b), rel=1e-6)
    assert comm["ulysses:2"]["ms_per_token"] == pytest.approx(c, rel=1e-6)
    assert max(map(abs, comm["ulysses:2"]["rel_errors"])) < 1e-6


def test_joint_fit_recovers_group_latency_per_degree(tmp_path):
    """A fixed latency per group of degree d (CostModel.group_latency_ms) and the per-token cost are
    told apart by small and large groups; the written CostModel carries the latency of the mode its
    plans use (the cheapest per token), and its predictions reproduce the synthetic timings."""
    from flexsp.profile.build import build_cost_model
    from flexsp.profile.fit import fit_joint
    from flexsp.profile.report import write_outputs
    a1, a2, s, b = 3e-5, 0.11, 0.45, 17.0
    c_u, lat_u, c_r, lat_r = 0.014, 16.0, 0.04, 9.0
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    comm_shapes = [[64], [128], [16] * 8, [512], [1024], [2048], [256] * 4]
    compute = [(L, _time(L, a1, a2, b, s=s)) for L in shapes]
    comm = {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c_u, s=s) + lat_u) for L in comm_shapes],
            "ring:2": [(L, _time(L, a1, a2, b, sp=2, c=c_r, s=s) + lat_r) for L in comm_shapes]}
    comp, got = fit_joint(compute, comm)
    assert (comp.a1, comp.a2, comp.per_seq, comp.b) == pytest.approx((a1, a2, s, b), rel=1e-6)
    assert got["ulysses:2"]["ms_per_token"] == pytest.approx(c_u, rel=1e-6)
    assert got["ulysses:2"]["latency_ms"] == pytest.approx(lat_u, rel=1e-6)
    assert got["ring:2"]["latency_ms"] == pytest.approx(lat_r, rel=1e-6)
    assert got["ulysses:2"]["latency_stderr"] < 1e-6
    assert max(map(abs, got["ulysses:2"]["rel_errors"])) < 1e-6
    # without the latency column the per-token cost absorbs it: a visible misfit on small groups
    _, old = fit_joint(compute, comm, group_latency=False)
    assert old["ulysses:2"]["latency_ms"] == 0.0 and max(map(abs, old["ulysses:2"]["rel_errors"])) > 0.1
    # noisy timings: close, with a non-zero error bar
    rng = np.random.default_rng(3)
    noisy = {k: [(L, ms * (1 + 0.02 * rng.standard_normal())) for L, ms in v * 2] for k, v in comm.items()}
    _, n = fit_joint([(L, ms * (1 + 0.02 * rng.standard_normal())) for L, ms in compute * 2], noisy)
    assert n["ulysses:2"]["latency_ms"] == pytest.approx(lat_u, rel=0.5)
    assert n["ulysses:2"]["latency_stderr"] > 0
    # a key whose shapes all have one token count cannot separate the two terms
    with pytest.raises(ValueError, match="at least 2 token counts"):
        fit_joint(compute, {"ulysses:2": [([512], 100.0), ([256, 256], 110.0)]})
    # into the CostModel file: every mode's latency keyed "mode:degree" (hybrid at degree 2 = Ulysses)
    raw = _synthetic_raw()
    raw["compute"], raw["comm"] = compute, comm
    cm = build_cost_model(ProfileConfig(name="lat", capacity_tokens=1024), raw)
    want = {"ulysses:2": lat_u, "ring:2": lat_r, "hybrid:2": lat_u}
    assert cm.group_latency_ms == pytest.approx(want, rel=1e-6)
    assert raw["fit"]["comm"]["ring:2"]["latency_ms"] == pytest.approx(lat_r, rel=1e-6)
    for L in comm_shapes:  # each mode priced with its own terms
        assert cm.group_time_ms(L, 2, "ulysses") == pytest.approx(_time(L, a1, a2, b, sp=2, c=c_u, s=s) + lat_u,
                                                                   rel=1e-6)
        assert cm.group_time_ms(L, 2, "ring") == pytest.approx(_time(L, a1, a2, b, sp=2, c=c_r, s=s) + lat_r,
                                                                rel=1e-6)
    raw["cost_model"], raw["validation"] = cm.to_dict(), []
    paths = write_outputs(raw, tmp_path, "lat", make_plot=False)
    written = json.loads(paths["cost_model"].read_text())
    assert set(written["group_latency_ms"]) == set(want)  # mode-keyed entries in the file itself
    loaded = CostModel.load(paths["cost_model"])
    assert loaded.group_latency_ms == pytest.approx(want, rel=1e-6)
    assert loaded == cm
    assert "ulysses:2: 16.000" in paths["summary"].read_text()


def test_extra_per_document_cost_of_sp_groups_is_fitted_per_mode(tmp_path):
    """A document dearer in a degree-2 group than at degree 1 is fitted per mode:degree, written to
    CostModel.per_sequence_comm_ms (keyed "mode:degree", with its error bar in the report) and
    priced only for groups of that mode; the file loads back as the same CostModel."""
    from flexsp.profile.build import build_cost_model
    from flexsp.profile.fit import fit_joint
    from flexsp.profile.report import summary_lines, write_outputs
    a1, a2, s, b, c, lat, extra = 3e-5, 0.11, 0.45, 17.0, 0.005, 8.0, 0.8
    c_r, lat_r, extra_r = 0.02, 5.0, 0.2
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    comm_shapes = [[64], [128], [16] * 8, [32] * 8, [512], [1024], [2048], [256] * 4, [1024] + [32] * 16]
    compute = [(L, _time(L, a1, a2, b, s=s)) for L in shapes]
    comm = {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c, s=s + extra) + lat) for L in comm_shapes],
            "ring:2": [(L, _time(L, a1, a2, b, sp=2, c=c_r, s=s + extra_r) + lat_r) for L in comm_shapes]}
    _, got = fit_joint(compute, comm, key_docs=True)
    u = got["ulysses:2"]
    assert (u["extra_doc_ms"], u["ms_per_token"], u["latency_ms"]) == pytest.approx((extra, c, lat), rel=1e-6)
    raw = _synthetic_raw()
    raw["compute"], raw["comm"] = compute, comm
    cm = build_cost_model(ProfileConfig(name="doc", capacity_tokens=1024), raw)
    assert cm.per_sequence_ms == pytest.approx(s, rel=1e-6)
    want = {"ulysses:2": extra, "ring:2": extra_r, "hybrid:2": extra}
    assert cm.per_sequence_comm_ms == pytest.approx(want, rel=1e-6)
    assert raw["fit"]["comm"]["ulysses:2"]["per_sequence_comm_ms"] == pytest.approx(extra, rel=1e-6)
    for L in comm_shapes:
        assert cm.group_time_ms(L, 2, "ulysses") == pytest.approx(
            _time(L, a1, a2, b, sp=2, c=c, s=s + extra) + lat, rel=1e-6)
        assert cm.group_time_ms(L, 2, "ring") == pytest.approx(
            _time(L, a1, a2, b, sp=2, c=c_r, s=s + extra_r) + lat_r, rel=1e-6)
    assert cm.group_time_ms([100] * 4, 1) == pytest.approx(_time([100] * 4, a1, a2, b, s=s), rel=1e-6)
    raw["cost_model"], raw["validation"] = cm.to_dict(), []
    assert any("extra ms per document" in ln for ln in summary_lines(raw))
    paths = write_outputs(raw, tmp_path, "doc", make_plot=False)
    written = json.loads(paths["cost_model"].read_text())
    assert set(written["per_sequence_comm_ms"]) == set(want)
    assert CostModel.load(paths["cost_model"]) == cm
    # off: the paper-like form, no per-document communication term
    raw2 = _synthetic_raw()
    raw2["compute"], raw2["comm"] = compute, comm
    cm2 = build_cost_model(ProfileConfig(name="doc", capacity_tokens=1024, fit_per_sequence_comm=False), raw2)
    assert cm2.per_sequence_comm_ms == {}
