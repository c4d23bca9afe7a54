"""FSDP2 engine: ``fully_shard`` on every transformer block and on the root, over a 1-D mesh of all
ranks. Gradients are reduce-scattered after every backward (every micro-batch) and summed
(``set_gradient_divide_factor(1.0)``); see flexsp.executor for why all ranks stay in lockstep."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from flexsp.engines import build_optimizer, build_scheduler


class FSDP2Engine:
    name = "fsdp2"

    def __init__(self, model, cfg, world_size: int, device: torch.device):
        self.cfg = cfg
        mesh = init_device_mesh(device.type, (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        # Sum over ranks, never average (each rank's loss is already / global targets). Sum-only
        # reductions plus a divide factor of 1: gloo has no PREMUL_SUM/AVG reduce-scatter.
        for m in [*model.blocks, model]:
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self.module = model
        self.optimizer = build_optimizer(model.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    # -- checkpoints: full (unsharded) state on rank 0, loaded by every rank ----------------------
    _OPTS = dict(full_state_dict=True, cpu_offload=True)

    def full_state_dict(self) -> dict:
        return get_model_state_dict(self.module, options=StateDictOptions(**self._OPTS))

    def save(self, directory: Path) -> None:
        model_sd = get_model_state_dict(self.module, options=StateDictOptions(**self._OPTS))
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=StateDictOptions(**self._OPTS))
        if dist.get_rank() == 0:
            torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict()},
                       directory / "engine.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "engine.pt", map_location="cpu", weights_only=False)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state["model"], options=opts)
        set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"], options=opts)
        self.scheduler.load_state_dict(state["scheduler"])
