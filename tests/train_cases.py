"""Shared helpers for the trainer tests: Hydra-composed configs, a 1-process reference trainer."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launch_env() -> dict:
    """Environment for a subprocess launch of flexsp: this repo importable, one thread per rank, and
    nothing of a process group this test process may have had (RANK, MASTER_* ...)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in (
        "RAY_ADDRESS",
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
    ):
        env.pop(key, None)
    return env


def compose(overrides: list[str]):
    """The typed config (flexsp.config.RunConfig) that `python -m flexsp.train <overrides>` trains."""
    from flexsp.config.compose import compose as compose_tree

    return compose_tree(list(overrides))


def tiny_cost_model(path: Path, capacity: int = 32) -> str:
    """cpu-gloo-tiny with ``capacity`` tokens per rank and costly communication: small documents then need
    SP degree 2 or 4,
    so the planner mixes degrees 1, 2 and 4 on 4 ranks."""
    from dataclasses import replace

    from solver.presets import load_preset

    # SP communication made expensive, so a document only gets a degree > 1 when memory forces it
    replace(
        load_preset("cpu-gloo-tiny"),
        capacity_override=capacity,
        name=f"tiny-cap{capacity}",
        a2a_mb_per_token=1.0,
        ring_mb_per_token=1.0,
    ).save(path)
    return str(path)


SYNTHETIC = ("data=synthetic", "data.num_docs=64", "data.corpus.max_doc_tokens=100")


def base_overrides(out: Path, cost_model: str, steps: int = 3, extra=(), data=SYNTHETIC) -> list[str]:
    return [
        *data,
        f"train.steps={steps}",
        "train.global_batch=8",
        "train.progress=false",
        "train.warmup_steps=1",
        "train.eps=1e-6",
        "train.checkpoint_every=0",
        "train.lr=1e-2",
        f"solver.cost_model={cost_model}",
        "solver.time_limit=0.5",
        "solver.wait_s=5",
        f"output_dir={out}",
        *extra,
    ]


def reference_training(cfg, steps: int, source=None):
    """Single-process, single-device training on the same batches: whole global batch packed into
    one buffer, loss = sum / targets, same init, AdamW, schedule and clipping. Returns
    (losses per step, final state dict). ``source``: the documents (default: built from ``cfg``;
    SFT tests pass the view the trainer fits to the cluster)."""
    import torch

    from flexsp.data import GlobalBatchSampler, build_source, pack_documents
    from flexsp.engines import build_optimizer, build_scheduler
    from flexsp.model import Transformer, model_config, shard_inputs

    source = build_source(cfg.data) if source is None else source
    sampler = GlobalBatchSampler(source.lengths, cfg.data.sampler, targets=source.target_counts)
    over = dict(cfg.model.overrides)
    vocab = over.pop("vocab_size", None) or source.vocab_size
    model = Transformer(model_config(cfg.model.preset, vocab_size=int(vocab), **over))
    model.init_weights(cfg.train.seed)
    opt = build_optimizer(model.parameters(), cfg.train)
    sched = build_scheduler(opt, cfg.train)
    losses = []
    for _ in range(steps):
        batch = next(sampler)
        packed = pack_documents(source, batch.doc_ids)
        inputs = shard_inputs(packed.input_ids, packed.cu_seqlens, labels=packed.labels)
        ls, cnt = inputs.loss(model)
        (ls / cnt).backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ls.detach() / cnt))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
