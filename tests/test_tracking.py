"""flexsp.tracking: TensorBoard / W&B (offline) scalars and images, plan pictures at the right steps."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from flexsp.tracking import TAGS, TRACKERS, Tracker, plan_scalars, tag_of
from solver.plan import GroupPlan, MicroBatchPlan, Plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_plan(scale: float = 1.0) -> Plan:
    """4 devices, 2 micro-batches: (SP2 + SP1 + SP1) then (SP4)."""
    mb0 = MicroBatchPlan(
        groups=(
            GroupPlan(
                sp=2,
                ranks=(0, 1),
                seq_ids=(0, 1),
                attention="ulysses",
                tokens=3000,
                predicted_ms=80.0 * scale,
            ),
            GroupPlan(
                sp=1, ranks=(2,), seq_ids=(2,), attention="local", tokens=900, predicted_ms=60.0 * scale
            ),
            GroupPlan(
                sp=1, ranks=(3,), seq_ids=(3, 4), attention="local", tokens=1000, predicted_ms=100.0 * scale
            ),
        ),
        predicted_ms=100.0 * scale,
    )
    mb1 = MicroBatchPlan(
        groups=(
            GroupPlan(
                sp=4,
                ranks=(0, 1, 2, 3),
                seq_ids=(5,),
                attention="ring",
                tokens=8000,
                predicted_ms=50.0 * scale,
            ),
        ),
        predicted_ms=50.0 * scale,
    )
    return Plan(
        num_devices=4,
        micro_batches=(mb0, mb1),
        predicted_ms=150.0 * scale,
        solve_seconds=0.012,
        lower_bound_ms=120.0 * scale,
        method="flexsp",
        status="feasible",
        num_sequences=6,
    )


def step_scalars(step: int) -> dict:
    """What the trainer passes, including non-numeric fields of a metrics.jsonl record."""
    return {
        "loss": 5.0 - step,
        "lr": 1e-3 * (step + 1),
        "grad_norm": 0.5 + step,
        "tokens_per_s": 1000.0 + step,
        "predicted_ms": 150.0,
        "measured_ms": 165.0 + step,
        "planner_ms": 12.0,
        "plan_wait_ms": 0.5,
        "late_plans": 0,
        "memory_mb": 321.0,
        "plan": "2 mb: 1x2 + 2x1 | 1x4",
        "doc_ids": [1, 2, 3],
    }


def is_png(path: Path) -> bool:
    import matplotlib.image

    if path.read_bytes()[:8] != PNG_MAGIC:
        return False
    img = matplotlib.image.imread(str(path))
    return img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_plan_scalars_counts_groups_per_degree():
    s = plan_scalars(make_plan())
    assert s["plan/micro_batches"] == 2 and s["plan/groups"] == 4
    assert (s["plan/groups_sp1"], s["plan/groups_sp2"], s["plan/groups_sp4"]) == (2, 1, 1)
    assert "plan/groups_sp8" not in s  # degrees up to num_devices only, always the same set
    assert s["plan/max_sp"] == 4 and s["plan/sequences"] == 6 and s["plan/tokens"] == 12900
    assert s["plan/predicted_ms"] == 150.0 and s["plan/solve_ms"] == pytest.approx(12.0)
    # busy device-ms: 2*80 + 60 + 100 + 4*50 = 520 of 4 * 150 = 600
    assert s["plan/idle_frac"] == pytest.approx(1 - 520 / 600)
    assert s["plan/lower_bound_ms"] == 120.0 and s["plan/gap"] == pytest.approx(0.25)
    assert all(isinstance(v, float) for v in s.values())
    single = Plan(
        num_devices=1, micro_batches=(MicroBatchPlan(groups=(GroupPlan(1, (0,), (0,)),)),), predicted_ms=0.0
    )
    s1 = plan_scalars(single)
    assert s1["plan/groups_sp1"] == 1 and "plan/idle_frac" not in s1 and "plan/gap" not in s1


def test_tag_names():
    assert tag_of("loss") == "train/loss" and tag_of("tokens_per_s") == "perf/tokens_per_s"
    assert tag_of("planner_ms") == "plan/solve_ms" and tag_of("predicted_ms") == "plan/predicted_ms"
    assert tag_of("custom/x") == "custom/x" and tag_of("foo") == "train/foo"
    assert all("/" in t for t in TAGS.values())


def test_tensorboard_scalars_and_image(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(
        "tensorboard",
        tmp_path,
        run_name="tb",
        config={"train": {"steps": 3}, "out": tmp_path},
        plot_plan_every=2,
    ) as tr:
        for step in range(3):
            tr.log_step(step, step_scalars(step), plan=make_plan())
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["step_000000.png", "step_000002.png"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/measured_ms",
        "perf/memory_mb",
        "perf/prediction_error",
        "plan/predicted_ms",
        "plan/solve_ms",
        "plan/wait_ms",
        "plan/late_plans",
        "plan/micro_batches",
        "plan/groups_sp1",
        "plan/groups_sp2",
        "plan/groups_sp4",
    ):
        assert tag in tags, (tag, tags)
    assert not any(t.endswith(("/plan", "/doc_ids")) for t in tags)
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.value for e in loss] == pytest.approx([5.0, 4.0, 3.0])
    assert [e.value for e in ea.Scalars("perf/tokens_per_s")] == pytest.approx([1000.0, 1001.0, 1002.0])
    assert [e.value for e in ea.Scalars("plan/groups_sp1")] == [2.0, 2.0, 2.0]
    errors = [e.value for e in ea.Scalars("perf/prediction_error")]  # measured / predicted - 1
    assert errors == pytest.approx([165 / 150 - 1, 166 / 150 - 1, 167 / 150 - 1])
    assert ea.Tags()["images"] == ["plan/timeline"]
    images = ea.Images("plan/timeline")
    assert [e.step for e in images] == [0, 2]
    assert (
        images[0].encoded_image_string[:8] == PNG_MAGIC and images[0].width > 100 and images[0].height > 100
    )
    assert "config" in " ".join(ea.Tags()["tensors"])


# -- W&B offline -----------------------------------------------------------------------------------


def wandb_records(path: Path):
    """Records of an offline run's ``run-*.wandb`` file (LevelDB log format: a 7-byte W&B header,
    then 32 KiB blocks of chunks with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, buf, block = 7, b"", 32768
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def wandb_history(run_dir: Path) -> list[dict]:
    (path,) = run_dir.glob("run-*.wandb")
    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in rec.history.item:  # a logged dict (wandb.Image) comes flattened: nested_key
                *parents, leaf = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if parents:
                    row.setdefault("/".join(parents), {})[leaf] = value
                else:
                    row[leaf] = value
            rows.append(row)
    return rows


def test_wandb_offline_history_and_image(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with Tracker(
        "wandb",
        tmp_path,
        run_name="offline-test",
        config={"train": {"steps": 3}},
        plot_plan_every=2,
        wandb_project="flexsp-test",
    ) as tr:
        assert tr._run.settings.mode == "offline"
        for step in range(3):
            tr.log_step(step, step_scalars(step), plan=make_plan())
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    rows = wandb_history(run_dir)
    assert [r["_step"] for r in rows] == [0, 1, 2]
    assert [r["train/loss"] for r in rows] == [5.0, 4.0, 3.0]
    assert [r["perf/tokens_per_s"] for r in rows] == [1000.0, 1001.0, 1002.0]
    assert all(r["plan/groups_sp2"] == 1.0 and r["plan/groups_sp1"] == 2.0 for r in rows)
    assert [("plan/timeline" in r) for r in rows] == [True, False, True]
    image = rows[0]["plan/timeline"]
    assert image["_type"] == "image-file"
    assert is_png(run_dir / "files" / image["path"])
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == ["step_000000.png", "step_000002.png"]


# -- plan pictures, kind none ----------------------------------------------------------------------


def test_none_kind_saves_pictures_at_exact_steps(tmp_path):
    tr = Tracker("none", tmp_path, run_name="n", config={}, plot_plan_every=3)
    for step in range(8):
        tr.log_step(step, step_scalars(step), plan=make_plan(1 + step / 10))
    tr.close()
    tr.close()  # idempotent
    names = sorted(p.name for p in (tmp_path / "plans").iterdir())
    assert names == ["step_000000.png", "step_000003.png", "step_000006.png"]
    assert all(is_png(tmp_path / "plans" / n) for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plans"]  # no tracker files
    with pytest.raises(RuntimeError, match="after close"):
        tr.log_step(8, {"loss": 1.0})

    # a resumed run: the first plan it sees gets a picture, then every step % N == 0
    out = tmp_path / "resumed"
    with Tracker("none", out, run_name="r", config={}, plot_plan_every=3) as tr:
        tr.log_step(4, {"loss": 1.0})  # no plan: no picture, does not count as the first plan
        for step in range(4, 10):
            tr.log_step(step, {"loss": 1.0}, plan=make_plan())
    assert sorted(p.name for p in (out / "plans").iterdir()) == [
        "step_000004.png",
        "step_000006.png",
        "step_000009.png",
    ]

    off = tmp_path / "off"
    with Tracker("none", off, run_name="o", config={}) as tr:
        tr.log_step(0, {"loss": 1.0}, plan=make_plan())
    assert not off.exists()


def test_failed_picture_warns_once_and_training_goes_on(tmp_path, monkeypatch, capsys):
    import solver.plot

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(solver.plot, "plot_plan", broken)
    with Tracker("tensorboard", tmp_path, run_name="f", config={}, plot_plan_every=1) as tr:
        tr.log_step(0, {"loss": 2.0}, plan=make_plan())
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "plan picture for step 0 failed" in err[0] and "no display" in err[0]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("train/loss")] == [2.0] and ea.Tags()["images"] == []


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_kind(tmp_path):
    with pytest.raises(ValueError) as info:
        Tracker("mlflow", tmp_path, run_name="x", config={})
    msg = str(info.value)
    assert "train.logger" in msg and "mlflow" in msg and all(k in msg for k in TRACKERS)
    with pytest.raises(ValueError, match="plot_plan_every"):
        Tracker("none", tmp_path, run_name="x", config={}, plot_plan_every=-1)


def test_missing_packages_name_the_pip_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match="pip install wandb"):
        Tracker("wandb", tmp_path, run_name="x", config={})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="pip install tensorboard"):
        Tracker("tensorboard", tmp_path, run_name="x", config={})
    assert not (tmp_path / "tensorboard").exists()
