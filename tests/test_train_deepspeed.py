"""DeepSpeed ZeRO-3 engine (``parallel.engine=deepspeed``) on 4 gloo ranks, one spawn for all cases:

- trainer: 3 steps of adaptive FlexSP training (plans mixing SP degrees 1, 2 and 4, forced by a
  cost model with 32 tokens per rank) give the same per-step losses, pre-clip gradient norms and
  final parameters as 1-process training on the same batches (``train_cases.reference_training``);
- fixed plans: the executor + ZeRO-3 engine driven directly with hand-made plans that the planner
  may or may not produce (its solve is time-boxed): 3, 2 and 1 micro-batches per step, idle ranks
  (zero-weight passes) in half of the micro-batches, degrees 1, 2, 4, ulysses and ring attention,
  gradient buckets smaller than a weight matrix with DeepSpeed's cross-rank sanity checks on
  (see _small_buckets); same losses, gradient norms and parameters as the reference;
- resume: restarting from the step-2 DeepSpeed checkpoint reproduces step 3 and the final
  parameters of the uninterrupted run;
- a checkpoint without DeepSpeed state (e.g. written by FSDP2) is rejected with a clear error.

Tolerance (fp32 everywhere): the distributed run sums the same per-token losses and gradients in
another order (per-group shards, ring/Ulysses attention, ZeRO-3's reduce-scatter), so it differs
from the reference by rounding only.

- Losses: measured within ~5e-7 absolute; asserted rtol 1e-5 / atol 1e-6.
- Pre-clip gradient norms: measured within ~1e-6 relative; asserted rtol 1e-5 (atol 2e-6 for the
  6-decimal value in metrics.jsonl). Adam and clipping hide a wrong global gradient scale (e.g.
  averaging instead of summing over ranks, or a 1/micro-batches factor) from the parameters; the
  norm does not.
- Parameters after 3 AdamW steps (lr 1e-2, eps 1e-6): 99.9% of the elements within 1e-6, but Adam
  divides each gradient element by its running RMS, so an element whose gradient cancels to about
  eps turns a rounding difference into a parameter difference of up to ~lr * dg / eps. Measured
  with the fixed plans: embed.weight[45, 13] (gradient 1.5e-7 at step 2, its row's largest 5e-3)
  differs by 4.2e-5, lm_head.weight[91, 13] by 1.2e-5; FSDP2 on the same plans differs from the
  reference at the same elements by 3.4e-5 and 1.0e-5, so this is the SP layout's rounding, not the
  engine. Asserted: every element within rtol 1e-4 / atol 1e-4 (lr / 100) and every tensor's
  relative Frobenius difference below 1e-4 (measured at most 1.4e-5). A wrong loss scale or a lost
  micro-batch moves most elements by ~lr (1e-2), two orders of magnitude beyond.
- Resume vs uninterrupted: rtol 1e-6 / atol 1e-7 (DeepSpeed restores the exact fp32 partitions,
  AdamW moments and scheduler; the resumed step runs the same plan code on the same data).
"""

import importlib.util
import json
import os
import shutil
from dataclasses import replace

import pytest
from dist_harness import run_distributed
from train_cases import REPO, base_overrides, compose, reference_training, tiny_cost_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (pip install -e .[dist])",
    ),
]

WORLD = 4
# every parameter partitioned: with DeepSpeed's default threshold the tiny model would stay whole
DS = ["parallel.engine=deepspeed", "parallel.deepspeed_persistence_threshold=0"]


def _np(state):
    """Tensors -> numpy (torch tensors sent through the harness queue die with the child)."""
    return None if state is None else {k: v.numpy().copy() for k, v in state.items()}


def _fixed_plans(n_docs: list[int]):
    """Hand-made plans for 3 steps of ``n_docs[s]`` documents each: every document exactly once."""
    from solver.plan import GroupPlan, MicroBatchPlan, Plan

    def g(sp, block, ids, attention=None):
        ranks = tuple(range(block * sp, (block + 1) * sp))
        return GroupPlan(sp, ranks, tuple(ids), attention or ("local" if sp == 1 else "ulysses"))

    def plan(*mbs):
        return Plan(WORLD, tuple(MicroBatchPlan(tuple(m)) for m in mbs), 0.0, method="fixed")

    a, b, c = n_docs
    assert min(n_docs) >= 6, n_docs
    return [
        # 3 micro-batches: all 4 ranks in one group | 2 + 1 + 1 | one rank busy, 3 idle
        plan([g(4, 0, [0, 1])], [g(2, 0, [2]), g(1, 2, [3]), g(1, 3, [4])], [g(1, 1, range(5, a))]),
        # 2 micro-batches: ranks 2-3 only (ring) | ranks 0 and 3, ranks 1-2 idle
        plan([g(2, 1, [0, 1, 2], "ring")], [g(1, 0, [3, 4]), g(1, 3, range(5, b))]),
        # 1 micro-batch: everything on all 4 ranks (ring)
        plan([g(4, 0, range(c), "ring")]),
    ]


def _small_buckets(ds_config):
    """ZeRO-3 reduce-scatters the gradients of a bucket of parameters, sorted by id, whenever the
    bucket is full; which parameters share a flush follows the order their gradient hooks fire, so
    ranks running different attention graphs (local, Ulysses, ring, zero-weight pass) must fire
    them in the same order. A bucket smaller than one weight matrix makes nearly every parameter
    its own flush, and DeepSpeed's sanity checks assert all ranks reduce the same parameters."""

    def config(cfg, world_size, persistence_threshold=None):
        d = ds_config(cfg, world_size, persistence_threshold)
        d["zero_optimization"].update(reduce_bucket_size=3000, enable_sanity_checks=True)
        return d

    return config


def _fixed_plan_run(cfg, steps, engine_name="deepspeed"):
    """The trainer's pieces without its planner: model, DeepSpeed engine, executor, fixed plans."""
    import torch
    import torch.distributed as dist

    import flexsp.engines.deepspeed as ds_engine
    from flexsp.data import GlobalBatchSampler, build_source
    from flexsp.engines import RandomWeights, build_engine
    from flexsp.executor import StepExecutor
    from flexsp.model import Transformer, model_config
    from flexsp.topology import SPTopology

    c = cfg
    rank, world = dist.get_rank(), dist.get_world_size()
    source = build_source(c.data)
    sampler = GlobalBatchSampler(source.lengths, c.data.sampler)
    batches = [next(sampler) for _ in range(steps)]
    over = dict(c.model.overrides)
    vocab = over.pop("vocab_size", None) or source.vocab_size
    mcfg = model_config(c.model.preset, vocab_size=int(vocab), **over)
    train = replace(c.train, precision="fp32")
    weights = RandomWeights(train.seed, mcfg.init_std, mcfg.layers)
    original = ds_engine.ds_config
    ds_engine.ds_config = _small_buckets(original)
    try:
        engine = build_engine(
            engine_name,
            lambda device: Transformer(mcfg, device=device),
            weights,
            train,
            c.parallel,
            world,
            torch.device("cpu"),
        )
    finally:
        ds_engine.ds_config = original
    zero = engine.engine.optimizer
    assert zero.enable_sanity_checks and zero.reduce_bucket_size == 3000
    executor = StepExecutor(
        engine, source, SPTopology(world, world).build(), rank, torch.device("cpu"), mcfg.heads
    )
    losses, norms, idle = [], [], 0
    for plan, batch in zip(_fixed_plans([len(b.doc_ids) for b in batches]), batches):
        res = executor.run(plan, batch)
        norms.append(float(engine.step()))
        stats = torch.stack([res.loss_sum.double(), torch.tensor(float(res.targets), dtype=torch.float64)])
        dist.all_reduce(stats)
        losses.append(float(stats[0] / stats[1]))
        idle += res.idle_passes
    state = engine.full_state_dict()  # collective
    return {"losses": losses, "norms": norms, "idle_passes": idle, "state": _np(state) if rank == 0 else None}


def _body(rank, world_size, cfgs, fake_ckpt):
    import torch.distributed as dist

    from flexsp.train import run

    out = {}
    s = run(cfgs["adaptive"], return_state=True)
    out["adaptive"] = {"losses": s["losses"], "state": _np(s["state_dict"]) if rank == 0 else None}
    s = run(cfgs["resume"], return_state=True)
    out["resume"] = {
        "losses": s["losses"],
        "start": s["start_step"],
        "state": _np(s["state_dict"]) if rank == 0 else None,
    }
    out["fixed"] = _fixed_plan_run(cfgs["adaptive"], 3)
    # a checkpoint with trainer state but no DeepSpeed engine state
    if rank == 0:
        shutil.copy(
            os.path.join(cfgs["adaptive"].output_dir, "checkpoints", "step_000002", "trainer.pt"),
            os.path.join(fake_ckpt, "trainer.pt"),
        )
    dist.barrier()
    try:
        run(cfgs["foreign"])
        out["foreign"] = "no error raised"
    except ValueError as exc:
        msg = str(exc)
        out["foreign"] = f"ok: {msg}" if "no DeepSpeed engine state" in msg else f"wrong message: {msg}"
    return out


def _reference(cfg, steps):
    """reference_training plus the pre-clip gradient norm of every step."""
    import torch

    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recording(*a, **kw):
        n = clip(*a, **kw)
        norms.append(float(n))
        return n

    torch.nn.utils.clip_grad_norm_ = recording
    try:
        losses, state = reference_training(cfg, steps)
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    return losses, norms, state


def test_deepspeed_zero3_4_ranks_matches_single_process(tmp_path):
    import torch

    cm = tiny_cost_model(tmp_path / "cm32.json", capacity=32)
    a_dir = tmp_path / "adaptive"
    fake = tmp_path / "fsdp_like_ckpt"
    fake.mkdir()
    cfgs = {
        "adaptive": compose(
            base_overrides(a_dir, cm, extra=[*DS, "train.checkpoint_every=2", "train.keep_checkpoints=5"])
        ),
        "resume": compose(
            base_overrides(
                tmp_path / "resumed", cm, extra=[*DS, f"train.resume={a_dir}/checkpoints/step_000002"]
            )
        ),
        "foreign": compose(base_overrides(tmp_path / "foreign", cm, extra=[*DS, f"train.resume={fake}"])),
    }
    # the harness runs gloo on CPU, so DeepSpeed must use its cpu accelerator
    env = {
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions")),
    }
    results = run_distributed(_body, world_size=WORLD, args=(cfgs, str(fake)), timeout=240, env=env)
    ref_losses, ref_norms, ref_state = _reference(cfgs["adaptive"], 3)
    tol_loss = dict(rtol=1e-5, atol=1e-6)

    def close_state(got, msg):
        """Parameters equal the reference up to fp32 rounding as amplified by Adam (docstring)."""
        got = {k: torch.from_numpy(v) for k, v in got.items()}
        assert set(got) == set(ref_state), msg
        for k, ref in ref_state.items():
            torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=1e-4, msg=f"{msg}: {k}")
            rel = float((got[k] - ref).norm() / ref.norm())
            assert rel < 1e-4, f"{msg}: {k} differs by {rel:.2e} (relative Frobenius)"
        return got

    r0 = results[0]
    # trainer: the plans really mixed degrees 1, 2 and 4
    metrics = [json.loads(ln) for ln in (a_dir / "metrics.jsonl").read_text().splitlines()]
    joined = " ".join(m["plan"] for m in metrics)
    assert all(f"x{d}" in joined for d in (1, 2, 4)), joined
    assert "engine: deepspeed" in (a_dir / "config.yaml").read_text()
    for rank_out in results:  # every rank reports the same global losses
        got = [rank_out["adaptive"]["losses"][s] for s in range(3)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), **tol_loss)
        torch.testing.assert_close(
            torch.tensor(rank_out["fixed"]["losses"]), torch.tensor(ref_losses), **tol_loss
        )
    torch.testing.assert_close(
        torch.tensor([m["grad_norm"] for m in metrics]), torch.tensor(ref_norms), rtol=1e-5, atol=2e-6
    )
    state = close_state(r0["adaptive"]["state"], "trainer")

    # fixed plans: 3/2/1 micro-batches per step, idle ranks in 3 of the 6 micro-batches
    assert [r["fixed"]["idle_passes"] for r in results] == [2, 2, 2, 1]
    torch.testing.assert_close(
        torch.tensor(r0["fixed"]["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=1e-6
    )
    close_state(r0["fixed"]["state"], "fixed plans")

    # resume from the step-2 checkpoint == the uninterrupted run
    assert r0["resume"]["start"] == 2 and list(r0["resume"]["losses"]) == [2]
    torch.testing.assert_close(
        torch.tensor(r0["resume"]["losses"][2]),
        torch.tensor(r0["adaptive"]["losses"][2]),
        rtol=1e-6,
        atol=1e-7,
    )
    resumed = {k: torch.from_numpy(v) for k, v in r0["resume"]["state"].items()}
    for k, v in state.items():
        torch.testing.assert_close(resumed[k], v, rtol=1e-6, atol=1e-7, msg=k)

    for rank_out in results:
        assert rank_out["foreign"].startswith("ok"), rank_out["foreign"]
