"""Sharded checkpoints (torch.distributed.checkpoint) across world sizes, and their integrity checks.

- 4 gloo ranks train 4 steps (FSDP2, checkpoint every 2 steps); the step-2 checkpoint then resumes
  on 2 ranks and on 1 rank: steps 3 and 4 give the losses of the uninterrupted 4-rank run, and the
  final parameters equal it (DCP reshards the 4-way shards into 2-way and 1-way ones on load);
- no checkpoint file holds more than its rank's share: each rank's ``__<r>_0.distcp`` is about 1/4
  of the model + optimizer bytes (FSDP2 shards every tensor along dim 0; replicated scalars such
  as Adam's step counters are written once);
- async_save writes the same checkpoint in the background (resume from it gives the same losses);
- a missing or truncated shard file, a missing .metadata or trainer.pt: one clear error naming the
  file.

Tolerance (fp32): 2 and 1 ranks run other plans than 4 (other SP groups, summation orders), so
losses differ by rounding only: rtol 1e-5 / atol 1e-6, as in test_train.py; parameters as there
(every element within lr/100, relative Frobenius difference < 1e-4).
"""

import shutil

import pytest
from dist_harness import run_distributed
from train_cases import base_overrides, compose, tiny_cost_model

pytestmark = pytest.mark.slow

DATA = ("data=synthetic", "data.num_docs=64", "data.corpus.max_doc_tokens=60")


def _np(state):
    return None if state is None else {k: v.numpy().copy() for k, v in state.items()}


def _train(rank, world_size, cfgs):
    from flexsp.train import run

    out = {}
    for name, cfg in cfgs.items():
        s = run(cfg, return_state=True)
        out[name] = {
            "losses": s["losses"],
            "start": s["start_step"],
            "state": _np(s["state_dict"]) if rank == 0 else None,
        }
    return out


def _cfg(tmp_path, name, cm, extra=()):
    return compose(
        base_overrides(
            tmp_path / name,
            cm,
            steps=4,
            data=DATA,
            extra=["train.checkpoint_every=2", "train.keep_checkpoints=5", *extra],
        )
    )


def test_checkpoint_of_4_ranks_resumes_on_2_and_1(tmp_path):
    import torch

    cm = tiny_cost_model(tmp_path / "cm.json", capacity=64)
    full = _cfg(tmp_path, "full", cm)
    asynch = _cfg(tmp_path, "async", cm, ["train.async_checkpoint=true"])
    four = run_distributed(_train, 4, args=({"full": full, "async": asynch},), timeout=240)
    ckpt = tmp_path / "full" / "checkpoints" / "step_000002"
    async_ckpt = tmp_path / "async" / "checkpoints" / "step_000002"
    assert (async_ckpt / "dcp" / ".metadata").is_file()

    # every rank wrote its own share, and only that
    files = sorted((ckpt / "dcp").glob("__*_0.distcp"))
    assert [f.name for f in files] == [f"__{r}_0.distcp" for r in range(4)]
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    for f, size in zip(files, sizes):
        assert size <= 0.30 * total, (f.name, size, total)  # share 1/4 + replicated scalars on rank 0

    resume = lambda name, src: compose(
        base_overrides(
            tmp_path / name,
            cm,
            steps=4,
            data=DATA,  # noqa: E731
            extra=[f"train.resume={src}"],
        )
    )
    two = run_distributed(
        _train,
        2,
        args=({"two": resume("two", ckpt), "two_async": resume("two_async", async_ckpt)},),
        timeout=240,
    )
    one = run_distributed(_train, 1, args=({"one": resume("one", ckpt)},), timeout=240)

    ref = four[0]["full"]
    assert four[0]["async"]["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    for name, got in (("two", two[0]["two"]), ("two_async", two[0]["two_async"]), ("one", one[0]["one"])):
        assert got["start"] == 2 and sorted(got["losses"]) == [2, 3], (name, got["losses"])
        torch.testing.assert_close(
            torch.tensor([got["losses"][s] for s in (2, 3)]),
            torch.tensor([ref["losses"][s] for s in (2, 3)]),
            rtol=1e-5,
            atol=1e-6,
            msg=name,
        )
        for k, v in ref["state"].items():
            a, b = torch.from_numpy(got["state"][k]), torch.from_numpy(v)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name}: {k}")
            assert float((a - b).norm() / b.norm()) < 1e-4, (name, k)

    # integrity: each broken copy is one clear error naming the file
    from flexsp.checkpoint import verify_checkpoint

    verify_checkpoint(ckpt)

    def broken(tag, edit):
        d = tmp_path / f"broken_{tag}"
        shutil.copytree(ckpt, d)
        target = edit(d)
        with pytest.raises(ValueError) as err:
            verify_checkpoint(d)
        assert str(target) in str(err.value), str(err.value)
        return str(err.value)

    def truncate(d):
        f = d / "dcp" / "__1_0.distcp"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return f

    def remove(path):
        def edit(d):
            (d / path).unlink()
            return d / path

        return edit

    assert "truncated" in broken("trunc", truncate)
    assert "missing" in broken("shard", remove("dcp/__3_0.distcp"))
    assert "missing" in broken("meta", remove("dcp/.metadata"))
    assert "trainer.pt" in broken("trainer", remove("trainer.pt"))


class _DeepSpeedLike:
    """Stands for the DeepSpeed engine's checkpoint interface (save/load of its own format); only
    the refusal paths are exercised: they must raise before DeepSpeed is asked to load."""

    def load(self, directory):
        raise AssertionError("load must not be reached")


class _FSDP2Like(_DeepSpeedLike):
    def state_dict(self):
        raise AssertionError("state_dict must not be reached")


def test_checkpoint_engine_and_world_size_mismatches_are_clear(tmp_path):
    import torch

    from flexsp.checkpoint import load_checkpoint

    ds = tmp_path / "ds" / "step_000002"
    (ds / "deepspeed" / "engine").mkdir(parents=True)
    torch.save({"step": 2, "world_size": 4, "engine": "deepspeed"}, ds / "trainer.pt")
    with pytest.raises(ValueError) as err:
        load_checkpoint(ds, _DeepSpeedLike(), world_size=2)
    msg = str(err.value)
    assert "DeepSpeed ZeRO-3 checkpoint of 4 ranks and this run has 2" in msg and "ds_to_universal" in msg, (
        msg
    )
    with pytest.raises(ValueError, match="written with parallel.engine=deepspeed"):
        load_checkpoint(ds, _FSDP2Like(), world_size=4)
    fsdp = tmp_path / "fsdp" / "step_000002"
    (fsdp / "dcp").mkdir(parents=True)
    torch.save({"step": 2, "world_size": 4, "engine": "fsdp2"}, fsdp / "trainer.pt")
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"w": torch.zeros(3)}}, checkpoint_id=str(fsdp / "dcp"), no_dist=True)
    with pytest.raises(ValueError, match="written with parallel.engine=fsdp2"):
        load_checkpoint(fsdp, _DeepSpeedLike(), world_size=4)
    (fsdp / "trainer.pt").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="trainer.pt is corrupt"):
        load_checkpoint(fsdp, _FSDP2Like(), world_size=4)
