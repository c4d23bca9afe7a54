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
    fit = fit_compute(
        [(L, _time(L, 3e-5, 0.11, 17.0, s=0.45) * (1 + 0.03 * rng.standard_normal())) for L in shapes]
    )
    assert fit.per_seq == pytest.approx(0.45, rel=0.5)
    assert all(v > 0 for v in fit.stderr.values())


def _synthetic_raw(optimizer_ms=40.0):
    a1, a2, s, b = 3e-5, 0.11, 0.45, 17.0
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    return {
        "world_size": 2,
        "device": "cpu",
        "backend": "gloo",
        "model": "tiny",
        "threads_per_rank": 1,
        "model_config": {
            "vocab_size": 512,
            "hidden": 64,
            "layers": 2,
            "heads": 4,
            "kv_heads": 2,
            "intermediate": 192,
            "dtype": "float32",
        },
        "num_params": 160000,
        "cpu_count": 2,
        "repeats": 3,
        "loadavg_start": [1.0, 1.0, 1.0],
        "loadavg_end": [1.5, 1.0, 1.0],
        "loadavg_per_pass": [[1.2, 1, 1], [1.4, 1, 1]],
        "compute": [(L, _time(L, a1, a2, b, s=s)) for L in shapes],
        "comm": {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, s=s, c=0.01)) for L in SHAPES[:4]]},
        "links": {},
        "optimizer_ms": optimizer_ms,
        "optimizer_spread_ms": [optimizer_ms, 41.0, 45.0],
        "activation": {"method": "synthetic", "points": [], "bytes_per_token": 4096.0},
    }


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
    from flexsp.config import typed_section

    with pytest.raises(ValueError, match="profile.world_size=3 must be a power of two >= 1"):
        ProfileConfig(world_size=3)
    with pytest.raises(ValueError, match="'hybrid'"):
        ProfileConfig(modes=["hybrid"])
    with pytest.raises(ValueError, match="profile.repeats='x' must be an integer"):
        typed_section(ProfileConfig, {"repeats": "x"}, "profile")
    with pytest.raises(ValueError, match="unknown profile keys \\['bogus'\\]"):
        typed_section(ProfileConfig, {"bogus": 1}, "profile")


def test_yaml_matches_dataclass():
    """configs/profile/default.yaml holds exactly the dataclass's fields with its defaults."""
    from dataclasses import MISSING, fields

    import yaml

    from flexsp.config.compose import CONFIG_DIR

    data = yaml.safe_load((CONFIG_DIR / "profile" / "default.yaml").read_text())
    want = {
        f.name: (f.default if f.default is not MISSING else f.default_factory())
        for f in fields(ProfileConfig)
    }
    assert data == want
    pc = ProfileConfig(**data)
    assert pc.profile_layers == 2 and pc.max_len == 0 and pc.compute_shapes is None


@pytest.mark.slow
def test_end_to_end_profile_two_ranks_two_depths_with_checkpointing(tmp_path):
    """One spawn of 2 gloo ranks: a 4-layer tiny model with activation checkpointing, timed on 1- and
    2-layer builds through the training engine (sharded, no unsharded copy), both SP modes,
    validation; the written cost model is the FULL model's (shape, AC, activations scaled)."""
    from flexsp.config.compose import compose
    from flexsp.planning import load_cost_model
    from flexsp.profile import profile
    from flexsp.profile.build import volumes_mb_per_token
    from solver.plan import Plan

    cfg = compose(
        [
            "model.layers=4",
            "model.activation_checkpointing=true",
            f"output_dir={tmp_path}",
            "profile.name=e2e",
            "profile.world_size=2",
            "profile.repeats=1",
            "profile.progress=false",
            "profile.profile_layers=2",
            "profile.max_len=128",
            "profile.compute_shapes=[[32],[64],[128],[32,32,64],[16,16,16,16,16,16,16,16]]",
            "profile.comm_shapes=[[64],[32,96]]",
            "profile.link_mb=[0.01,0.1]",
            "profile.validate_batches=1",
            "profile.validate_tokens=256",
            "profile.validate_max_len=128",
            "profile.timeout_s=150",
            "profile.num_devices=4",
        ],
        "profile",
    )
    res = profile(cfg)
    paths = res["paths"]
    for key in ("cost_model", "report", "summary", "plot"):
        assert paths[key].is_file(), key
    cm = CostModel.load(paths["cost_model"])
    assert (cm.layers, cm.hidden, cm.heads, cm.kv_heads, cm.activation_checkpointing) == (4, 64, 4, 2, True)
    cm.check_model_shape(4, 64, 4, 2)
    with pytest.raises(ValueError, match="layers=4 but the model has layers=2"):
        cm.check_model_shape(layers=2)
    assert cm.num_devices == 4 and "written for 4 devices (profiled on 2)" in cm.source  # validation: 2 ranks
    assert set(cm.bandwidth_gbps) == {2} and set(cm.p2p_bandwidth_gbps) == {2}
    assert cm.act_mb_per_token > 0 and "flexsp-profile" in cm.source and "scaled to 4 layers" in cm.source
    assert cm.step_overhead_ms > 0 and cm.per_sequence_ms >= 0
    report = json.loads(paths["report"].read_text())
    assert report["profile_depths"] == [1, 2] and report["model_config"]["layers"] == 4
    assert {r[2] for r in report["compute"]} == {1, 2}
    assert {r[2] for rows in report["comm"].values() for r in rows} == {2}
    act = report["activation"]
    # CPU estimate under AC: a block keeps only its input (hidden x 4 bytes per token per layer)
    assert act["per_layer_bytes_per_token"] == pytest.approx(64 * 4)
    assert cm.act_mb_per_token * 2**20 == pytest.approx(act["fixed_bytes_per_token"] + 4 * 64 * 4)
    assert cm.a2a_mb_per_token == pytest.approx(volumes_mb_per_token(report["model_config"])[0])
    plan = plan_batch([100, 30, 20, 5], cm, time_limit=0.5)
    assert plan.num_devices == 4 and plan.predicted_ms > 0
    assert load_cost_model(str(paths["cost_model"]), 8).num_devices == 8  # training reads it too
    assert report["validation_depth"] == 2
    assert all(Plan.from_dict(p).num_devices == 2 for h in report["heldout"] for p in h["plans"].values())
    kinds = {r["kind"] for r in report["validation"]}
    assert kinds == {"micro-batch", "step"}
    assert all(len(r["all_ms"]) == 1 for r in report["validation"])  # repeats=1: one interleaved run each
    assert report["loadavg_start"] and report["loadavg_end"] and len(report["loadavg_per_pass"]) == 1
    text = paths["summary"].read_text()
    assert "Validation" in text and "Timed on 1- and 2-layer builds" in text


def test_joint_fit_recovers_compute_and_comm_terms():
    from flexsp.profile.fit import fit_joint

    a1, a2, s, b, c = 3e-5, 0.11, 0.45, 17.0, 0.02
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32]
    comp, comm = fit_joint(
        [(L, _time(L, a1, a2, b, s=s)) for L in shapes],
        {"ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c, s=s)) for L in SHAPES[:5]]},
    )
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
    comm = {
        "ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c_u, s=s) + lat_u) for L in comm_shapes],
        "ring:2": [(L, _time(L, a1, a2, b, sp=2, c=c_r, s=s) + lat_r) for L in comm_shapes],
    }
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
        assert cm.group_time_ms(L, 2, "ulysses") == pytest.approx(
            _time(L, a1, a2, b, sp=2, c=c_u, s=s) + lat_u, rel=1e-6
        )
        assert cm.group_time_ms(L, 2, "ring") == pytest.approx(
            _time(L, a1, a2, b, sp=2, c=c_r, s=s) + lat_r, rel=1e-6
        )
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
    comm = {
        "ulysses:2": [(L, _time(L, a1, a2, b, sp=2, c=c, s=s + extra) + lat) for L in comm_shapes],
        "ring:2": [(L, _time(L, a1, a2, b, sp=2, c=c_r, s=s + extra_r) + lat_r) for L in comm_shapes],
    }
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
            _time(L, a1, a2, b, sp=2, c=c, s=s + extra) + lat, rel=1e-6
        )
        assert cm.group_time_ms(L, 2, "ring") == pytest.approx(
            _time(L, a1, a2, b, sp=2, c=c_r, s=s + extra_r) + lat_r, rel=1e-6
        )
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


# -- depth scaling, activation checkpointing, generated shapes -----------------------------------------
PER_LAYER = dict(a1=3e-6, a2=0.01, s=0.05, b=2.0)
FIXED = dict(a2=0.03, s=0.1, b=9.0)


def _depth_time(L, n, sp=1, c=0.0, lat=0.0, doc=0.0):
    L = np.asarray(L, dtype=float)
    p, f = PER_LAYER, FIXED
    return (
        n
        * (
            (p["a1"] * (L * L).sum() + p["a2"] * L.sum()) / sp
            + p["s"] * L.size
            + p["b"]
            + c * L.sum()
            + lat
            + doc * L.size
        )
        + f["a2"] * L.sum() / sp
        + f["s"] * L.size
        + f["b"]
    )


def _depth_raw():
    from flexsp.model import model_config

    full = model_config("7b", kv_heads=8, max_position_embeddings=131072)
    shapes = SHAPES + [[16] * 64, [512] + [16] * 32, [8192], [4096, 4096]]
    comm_shapes = [[64], [128], [16] * 8, [32] * 8, [512], [1024], [2048], [256] * 4, [1024] + [32] * 16]
    one, two = (model_config("7b", kv_heads=8, layers=n).num_params() for n in (1, 2))
    raw = _synthetic_raw()
    raw.update(
        model_config={
            "vocab_size": full.vocab_size,
            "hidden": 4096,
            "layers": 32,
            "heads": 32,
            "kv_heads": 8,
            "intermediate": 11008,
            "dtype": "float32",
            "head_size": 128,
            "activation_checkpointing": True,
            "precision": "bf16",
            "compute_dtype": "bfloat16",
        },
        profile_depths=[1, 2],
        num_params=full.num_params(),
        params_per_layer=two - one,
        params_fixed=2 * one - two,
        compute=[(L, _depth_time(L, n), n) for n in (1, 2) for L in shapes],
        comm={
            "ulysses:2": [(L, _depth_time(L, 2, 2, c=0.004, lat=3.0, doc=0.2), 2) for L in comm_shapes],
            "ring:2": [(L, _depth_time(L, 2, 2, c=0.009, lat=1.0, doc=0.05), 2) for L in comm_shapes],
        },
        optimizer=[(1, one, 5.0 + 1e-8 * one), (2, two, 5.0 + 1e-8 * two)],
        activation={
            "method": "synthetic",
            "points": {},
            "per_layer_bytes_per_token": 8192.0,
            "fixed_bytes_per_token": 50000.0,
            "bytes_per_token": 50000.0 + 2 * 8192,
            "depth": 2,
        },
    )
    return raw


def test_two_depth_fit_scales_to_the_full_model(tmp_path):
    """Shapes timed on 1- and 2-layer builds: the per-layer and fixed parts are recovered, the written
    cost model is the 32-layer model's (a1 = 32 a1', a2 = 32 a2' + fixed, communication x 32, optimizer
    linear in parameters, activations fixed + 32 x per layer) and records the full model's shape;
    priced at depth 2 it reproduces the timings it was fitted on."""
    from flexsp.profile.build import build_cost_model, volumes_mb_per_token
    from flexsp.profile.fit import fit_depth
    from flexsp.profile.report import write_outputs

    raw = _depth_raw()
    fit = fit_depth(raw["compute"], raw["comm"], key_docs=True)
    assert fit.layer_terms() == pytest.approx({"a1": 3e-6, "a2": 0.01, "per_seq": 0.05, "b": 2.0}, rel=1e-6)
    assert fit.fixed_terms() == pytest.approx({"a2": 0.03, "per_seq": 0.1, "b": 9.0}, rel=1e-6)
    cfg = ProfileConfig(name="deep", capacity_tokens=65536)
    cm = build_cost_model(cfg, raw)
    assert (cm.layers, cm.hidden, cm.heads, cm.kv_heads, cm.activation_checkpointing) == (
        32,
        4096,
        32,
        8,
        True,
    )
    assert cm.a1 == pytest.approx(32 * 3e-6, rel=1e-6)
    assert cm.a2 == pytest.approx(32 * 0.01 + 0.03, rel=1e-6)
    assert cm.per_sequence_ms == pytest.approx(32 * 0.05 + 0.1, rel=1e-6)
    assert cm.b == pytest.approx(32 * 2.0 + 9.0, rel=1e-6)
    for L in ([128], [65536], [32768, 16384, 512, 512], [1024] * 16):
        assert cm.group_time_ms(L, 1) == pytest.approx(_depth_time(L, 32), rel=1e-6)
        assert cm.group_time_ms(L, 2, "ulysses") == pytest.approx(
            _depth_time(L, 32, 2, c=0.004, lat=3.0, doc=0.2), rel=1e-6
        )
        assert cm.group_time_ms(L, 2, "ring") == pytest.approx(
            _depth_time(L, 32, 2, c=0.009, lat=1.0, doc=0.05), rel=1e-6
        )
    assert cm.step_overhead_ms == pytest.approx(5.0 + 1e-8 * raw["num_params"], rel=1e-6)
    assert cm.params_gi == pytest.approx(raw["num_params"] / 2**30)
    assert cm.act_mb_per_token == pytest.approx((50000.0 + 32 * 8192) / 2**20)
    assert cm.a2a_mb_per_token == pytest.approx(volumes_mb_per_token(raw["model_config"])[0])
    cm.check_model_shape(32, 4096, 32, 8)
    with pytest.raises(ValueError, match="layers=32 but the model has layers=2"):
        cm.check_model_shape(2, 4096, 32, 8)
    # the model at a timed depth (validation): reproduces what was measured there
    cm2 = build_cost_model(cfg, raw, depth=2)
    assert cm2.layers == 2
    for L, ms, n in raw["compute"]:
        if n == 2:
            assert cm2.group_time_ms(L, 1) == pytest.approx(ms, rel=1e-6)
    assert cm2.bandwidth_gbps == pytest.approx(cm.bandwidth_gbps)  # effective bandwidth: depth-free
    assert raw["fit"]["depth"] == 32 and raw["fit"]["profile_depths"] == [1, 2]
    raw["cost_model"], raw["validation"] = cm.to_dict(), []
    paths = write_outputs(raw, tmp_path, "deep", make_plot=True)
    loaded = CostModel.load(paths["cost_model"])
    assert loaded == cm and loaded.layers == 32
    text = paths["summary"].read_text()
    assert "Timed on 1- and 2-layer builds" in text and "layers=32, hidden=4096, heads=32, kv_heads=8" in text
    # noisy optimizer timings of two close depths never extrapolate beyond proportional scaling
    (_, p1, _), (_, p2, _) = raw["optimizer"]
    raw["optimizer"] = [(1, p1, 100.0), (2, p2, 160.0)]
    from flexsp.profile.build import optimizer_ms_at

    ms, how = optimizer_ms_at(raw, 32)
    assert ms == pytest.approx(160.0 * raw["num_params"] / p2) and "clamped" in how
    raw["optimizer"] = [(1, p1, 100.0), (2, p2, 90.0)]
    assert optimizer_ms_at(raw, 32)[0] == pytest.approx(90.0)
    # one depth cannot be scaled
    one = fit_depth([(L, ms, n) for L, ms, n in raw["compute"] if n == 2], {})
    with pytest.raises(ValueError, match="one depth"):
        one.compute_at(32)


def test_checkpointing_doubles_the_forward_collectives_in_the_volumes():
    from flexsp.profile.build import volumes_mb_per_token

    mc = {
        "hidden": 4096,
        "heads": 32,
        "kv_heads": 8,
        "layers": 32,
        "dtype": "float32",
        "compute_dtype": "bfloat16",
        "head_size": 128,
    }
    a2a, ring = volumes_mb_per_token(mc)
    a2a_ac, ring_ac = volumes_mb_per_token({**mc, "activation_checkpointing": True})
    q, kv = 32 * 128, 8 * 128
    assert a2a == pytest.approx(2 * 32 * 2 * (2 * q + 2 * kv) / 2**20)  # bf16, fwd + bwd
    assert a2a_ac / a2a == pytest.approx(1.5)  # forward all-to-alls twice (forward + recompute) + backward
    assert ring_ac / ring == pytest.approx(8 / 6)  # k, v forward twice + k, v, dk, dv backward
    assert volumes_mb_per_token(mc, 2)[0] == pytest.approx(a2a / 16)


def test_generated_shapes_reach_the_context_length():
    """Default shapes come from max_len (0: the model's max_position_embeddings): a single document
    of max_len, equal splits (same tokens, 1/k of the squares: a1 identifiable), long-tailed mixes,
    many short documents; none over max_len tokens."""
    from flexsp.profile.config import default_comm_shapes, default_compute_shapes

    for M in (128, 2048, 131072):
        comp, comm = default_compute_shapes(M), default_comm_shapes(M)
        assert [M] in comp and [M] in comm and len(comp) >= 10 and len(comm) >= 8
        assert all(sum(s) <= M for s in comp + comm) and all(min(s) >= 2 for s in comp + comm)
        tok = {sum(s) for s in comp}
        ratios = [sum(x * x for x in s) / sum(s) ** 2 for s in comp if sum(s) == M]
        assert max(ratios) == 1.0 and min(ratios) <= (0.125 if M < 1024 else 1 / 32) and len(tok) >= 5
        assert any(len(s) >= 16 for s in comp) and any(len(set(s)) > 2 for s in comp)
    from flexsp.config.compose import compose
    from flexsp.profile.config import profiled_model

    full, precision, _ = profiled_model(compose(["model=1b", "output_dir=/tmp/x"], "profile"))
    cfg = ProfileConfig()
    assert precision == "bf16" and full.dtype == "float32" and full.activation_checkpointing
    assert cfg.resolved_max_len(full) == 131072 and max(map(sum, cfg.shapes(full)[0])) == 131072
    assert cfg.depths(full.layers) == [1, 2] and ProfileConfig(profile_layers=0).depths(16) == [16]
    assert ProfileConfig(profile_layers=40).depths(16) == [16] and ProfileConfig(profile_layers=8).depths(
        16
    ) == [4, 8]
    with pytest.raises(ValueError, match="profile.profile_layers=1 cannot separate"):
        ProfileConfig(profile_layers=1).depths(16)
    assert ProfileConfig(max_len=512).validation_lengths(full, 2) == (512, 1024)


def test_gpu_profile_config_is_long_and_bounded():
    """benchmarks/gpu_profile.py (GPU only, never run here): its configuration is valid, profiles a
    few layers of an 8B shape with documents up to 128K, and fits its own time budget."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from flexsp.profile.config import from_flat, profiled_model

    run = from_flat(mod.config(False, Path("/tmp/x"), "gpu", 330.0))
    cfg = run.profile
    full, precision, _ = profiled_model(run)
    assert full.layers == 32 and full.hidden == 4096 and full.kv_heads == 8 and full.activation_checkpointing
    assert precision == "bf16" and cfg.depths(full.layers) == [1, 2] and cfg.timeout_s <= 330
    comp, _ = cfg.shapes(full)
    assert max(map(sum, comp)) == 131072 and [131072] in comp and len(comp) <= 12
    assert cfg.repeats <= 2 and cfg.validate_batches <= 1 and cfg.num_devices == 8
    smoke = from_flat(mod.config(True, Path("/tmp/x"), "s", 60.0)).profile
    assert smoke.world_size == 1 and smoke.max_len <= 512


# -- the command line: one-line errors, exit 2, a preset name for model, --help of the profile ---------
_DRIVER = r"""
import contextlib, io, json, os, sys
from flexsp.profile.cli import main
out = []
for env, argv in json.loads(sys.argv[1]):
    os.environ.update(env)
    err, so = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException as e:
            rc = "raised " + repr(e)
    for k in env:
        os.environ.pop(k)
    out.append([rc, err.getvalue(), so.getvalue()])
print("RESULT" + json.dumps(out))
"""


def test_cli_user_errors_are_one_line_with_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("")
    out = str(tmp_path / "out")
    cases = [
        (
            ["model=nope"],
            "model=nope: no such config; valid options for model: ['13b', '1b', '30b', '70b', '7b', "
            "'small', 'tiny']",
        ),
        (
            ["model.preset=nope"],
            "unknown model preset 'nope'; valid options: ['13b', '1b', '30b', '70b', '7b', 'small', 'tiny']",
        ),
        (["profile.world_size=3"], "profile.world_size=3 must be a power of two >= 1"),
        (
            ["world_size=3"],
            "unknown config key 'world_size': profile settings are under profile.*, "
            "e.g. profile.world_size=3",
        ),
        (["profile.bogus=1"], "unknown config key 'profile.bogus'; valid keys of profile: ["),
        (["profile.repeats=abc"], "profile.repeats='abc' must be an integer"),
        (["model.layerz=2"], "unknown config key 'model.layerz'; valid keys of model: ["),
        (["model.heads=3"], "heads"),
        (["profile.profile_layers=1", "model.layers=4"], "profile.profile_layers=1 cannot separate"),
        (
            ["profile.compute_shapes=[[1]]"],
            "profile.compute_shapes must be null or lists of integer document lengths >= 2",
        ),
        (["profile.max_len=4"], "profile.max_len=4 must be 0 (the model's max_position_embeddings) or >= 16"),
        (["oops"], "bad override"),
        (["profile.compute_shapes=[[1,"], "bad override"),
        (
            ["train.precision=fp16"],
            "train.precision='fp16'; valid options: ['auto', 'fp32', 'bf16', 'bf16-pure']",
        ),
        (["parallel.engine=megatron"], "parallel.engine='megatron'; valid options: ['fsdp2', 'deepspeed']"),
        (
            ["profile.modes=[hybrid]"],
            "profile.modes=['hybrid'] are not profiled; valid options: ['ulysses', 'ring']",
        ),
        ([f"output_dir={blocker}/sub"], f"output_dir={blocker}/sub cannot be created or written"),
        (["model.hf_checkpoint=/nonexistent/qwen"], "model.hf_checkpoint=/nonexistent/qwen does not exist"),
    ]
    runs = [
        [{}, argv + ([f"output_dir={out}"] if not any(a.startswith("output_dir") for a in argv) else [])]
        for argv, _ in cases
    ]
    runs.append(
        [{"RANK": "1", "WORLD_SIZE": "2"}, ["profile.world_size=3"]]
    )  # torchrun rank 1: silent, exit 2
    runs.append([{}, ["model=small", "--help"]])
    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(runs)], capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.split("RESULT", 1)[1])
    for (argv, want), (rc, err, _) in zip(cases, got):
        assert rc == 2, (argv, rc, err)
        assert err.count("\n") == 1 and err.startswith("flexsp-profile: error: "), (argv, err)
        assert want in err, (argv, err)
        assert "Traceback" not in err
    rc, err, so = got[len(cases)]
    assert rc == 2 and err == ""
    rc, err, so = got[len(cases) + 1]
    assert rc == 0 and err == "" and so.startswith("usage: flexsp-profile")
    for name in (
        "profile.profile_layers=2",
        "profile.max_len=0",
        "profile.num_devices=0",
        "profile.world_size=2",
    ):
        assert f"  {name}" in so, name
    assert "model.hf_checkpoint=DIR" in so
    # the real entry point, a separate process: same line, exit status 2
    proc = subprocess.run(
        [sys.executable, "-m", "flexsp.profile", "model=small", "profile.world_size=3"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert proc.stderr == "flexsp-profile: error: profile.world_size=3 must be a power of two >= 1\n"


def test_cli_model_comes_from_the_training_tree(tmp_path):
    """The profiled model is the training tree's: a preset group with model.* overrides,
    train.precision; the profile section holds the rest."""
    from flexsp.config.compose import compose
    from flexsp.profile.cli import check
    from flexsp.profile.config import profiled_model

    cfg = compose(
        [
            "model=small",
            f"output_dir={tmp_path}",
            "model.activation_checkpointing=true",
            "profile.compute_shapes=[[64],[128],[32,32]]",
            "parallel.backend=null",
            "profile.name=2024",
        ],
        "profile",
    )
    assert cfg.model.preset == "small" and cfg.model.overrides == {"activation_checkpointing": True}
    assert cfg.profile.compute_shapes == [[64], [128], [32, 32]] and cfg.parallel.backend is None
    assert cfg.profile.name == "2024"
    check(cfg)
    full, _, _ = profiled_model(cfg)
    assert full.layers == 4 and full.activation_checkpointing and cfg.profile.depths(full.layers) == [1, 2]
    assert compose(["model=7b", f"output_dir={tmp_path}"], "profile").model.preset == "7b"
