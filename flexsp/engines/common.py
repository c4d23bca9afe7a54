"""What every engine shares: weight sources, AdamW and its schedule."""

from __future__ import annotations

import math

import torch

from flexsp.model.init import fill_elements_


class RandomWeights:
    """The seeded init of flexsp.model.init, for any element range of any parameter."""

    def __init__(self, seed: int, init_std: float, layers: int):
        self.seed, self.init_std, self.layers = int(seed), float(init_std), int(layers)

    def check(self, module) -> None:
        pass

    def fill_(self, dest: torch.Tensor, name: str, numel: int, start: int) -> None:
        fill_elements_(dest, name, numel, start, self.seed, self.init_std, self.layers)


class HFWeights:
    """Element ranges read lazily from a Hugging Face checkpoint (flexsp.model.hf.HFCheckpointReader)."""

    def __init__(self, reader):
        self.reader = reader

    def check(self, module) -> None:
        """Every parameter of ``module`` present with its shape, no checkpoint key left over (one
        error listing them all), before anything is filled."""
        self.reader.check(module)

    @torch.no_grad()
    def fill_(self, dest: torch.Tensor, name: str, numel: int, start: int) -> None:
        vals = self.reader.read_elements(name, start, start + dest.numel())
        dest.copy_(vals.reshape(dest.shape).to(device=dest.device, dtype=dest.dtype))


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warmup to 1 over ``warmup_steps``, then cosine decay to ``min_ratio`` at ``total_steps``."""

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """AdamW from a TrainConfig (lr, betas, eps, weight_decay)."""
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def build_scheduler(optimizer, cfg):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
