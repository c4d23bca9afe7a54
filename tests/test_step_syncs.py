"""Host syncs of a whole training step: exactly one (the step's statistics).

On CUDA every device-to-host conversion (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``int()``/``float()``/``bool()``/``index`` of a tensor) and every copy from pageable host memory
stalls the host until the device has drained. The step loop is written so that everything the
host needs is known on the host (plan, lengths, layout, counts) and the only conversion is the
``.tolist()`` of the all-reduced loss/targets/tokens/stop/grad-norm vector.

CPU (2 gloo ranks, FSDP2, plans mixing SP degrees 1 and 2, i.e. local and sharded attention, idle
passes): every such conversion made by the main thread while it runs a training step (planner
handoff, executor with its input pipeline, forward, backward, optimizer, statistics, logging) is
counted; the background input thread prepares host data and is not a device sync. Asserted: one
per step. (Measured on the same run at ad0268b, before the sync-free pipeline: 8, 24 and 20 on
steps 1-3, on both ranks.)

CUDA (``@pytest.mark.gpu``): a 1-rank NCCL training run whose middle steps (not the first, with its
one-time kernel probes, nor the last, which writes the final checkpoint) run under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call. The one
allowed read (``flexsp.hostcopy.read_to_host``) waits on an event, which that mode does not flag.
"""

from __future__ import annotations

import threading
import traceback

import pytest
import torch
from dist_harness import run_distributed
from train_cases import base_overrides, compose, tiny_cost_model

CONVERSIONS = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


class SyncCounter:
    """Counts tensor-to-host conversions made by the main thread while ``active``."""

    def __init__(self):
        self.active, self.calls, self.main = False, [], threading.main_thread()
        self._saved = {}

    def __enter__(self):
        for name in CONVERSIONS:
            orig = getattr(torch.Tensor, name)
            self._saved[name] = orig

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                if self.active and threading.current_thread() is self.main:
                    frame = traceback.extract_stack(limit=2)[0]  # the caller
                    # AdamW's step counters are CPU scalars on every device (non-capturable
                    # AdamW keeps ``state["step"]`` on the host): reading them is no sync
                    host_counter = "/torch/optim/" in frame.filename and t.dim() == 0
                    # the plan handoff: an object broadcast on the topology's gloo host group, whose
                    # tensors are CPU tensors on every device
                    host_object = (
                        frame.filename.endswith("distributed_c10d.py")
                        and ("object" in frame.name)
                        and t.device.type == "cpu"
                    )
                    if not (host_counter or host_object):
                        self.calls.append(f"{_name} at {frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._saved.items():
            setattr(torch.Tensor, name, orig)


def _count_body(rank, world_size, cfg):
    import flexsp.train as T

    counter = SyncCounter()
    per_step, original = [], T._one_step

    def counted_step(st, step, *args, **kwargs):
        counter.calls, counter.active = [], True
        try:
            return original(st, step, *args, **kwargs)
        finally:
            counter.active = False
            per_step.append(list(counter.calls))

    T._one_step = counted_step
    try:
        with counter:
            summary = T.run(cfg)
    finally:
        T._one_step = original
    return {"per_step": per_step, "late": summary["late_plans"]}


@pytest.mark.slow
def test_training_step_makes_exactly_one_host_sync(tmp_path):
    cm = tiny_cost_model(tmp_path / "cm.json", capacity=64)
    cfg = compose(base_overrides(tmp_path / "run", cm, steps=4))
    results = run_distributed(_count_body, 2, args=(cfg,), timeout=240)
    for rank, res in enumerate(results):
        # the last step also writes the final checkpoint (DCP reads its shards back): not a training step
        for step, calls in enumerate(res["per_step"][:-1]):
            assert len(calls) == 1, (rank, step, calls)
            assert calls[0].startswith("tolist at hostcopy.py"), calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_runs_under_sync_debug_error(tmp_path):
    import flexsp.train as T

    cfg = {
        "model": {"preset": "tiny", "hf_checkpoint": None},
        "parallel": {"mode": "adaptive", "engine": "fsdp2"},
        "data": {
            "source": "synthetic",
            "num_docs": 64,
            "synthetic_vocab_size": 512,
            "corpus": {"max_doc_tokens": 1024},
            "sampler": {"global_batch_tokens": 8192},
        },
        "solver": {"cost_model": "auto", "time_limit": 0.5},
        "train": {
            "steps": 4,
            "global_batch": 8,
            "precision": "bf16",
            "checkpoint_every": 0,
            "progress": False,
        },
        "output_dir": str(tmp_path / "run"),
    }
    original = T._one_step

    def strict_step(st, step, *args, **kwargs):
        if step in (st.start, 3):  # first step: kernel probes, allocator warm-up; last: the final checkpoint
            return original(st, step, *args, **kwargs)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(st, step, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    T._one_step = strict_step
    try:
        summary = T.run(cfg)
    finally:
        T._one_step = original
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    assert summary["last_step"] == 4
