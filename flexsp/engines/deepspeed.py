"""DeepSpeed ZeRO-3 engine: parameters, gradients and AdamW states partitioned over ALL ranks (the
world data-parallel group), with the same per-step semantics as the FSDP2 engine.

How the FSDP2 semantics are obtained from DeepSpeed (0.19.x, read from its source and tested):

- **Sum, not average, over ranks.** ZeRO-3 always averages: its reduce-scatter
  (``reduce_scatter_coalesced``) divides every gradient by the world size before reducing, and
  ``gradient_predivide_factor`` / ``prescale_gradients`` cannot turn that off (ZeRO-3 with
  reduce-scatter asserts ``gradient_predivide_factor == 1`` and ``postscale_gradients``). So
  ``backward`` multiplies the loss by the world size: each rank's gradient is ``world * g_r``,
  DeepSpeed divides by ``world`` and sums, giving ``sum_r g_r``. For a power-of-two world both the
  multiply and the divide are exact in floating point, so this is the plain sum bit for bit
  (otherwise it differs by rounding only).
- **No 1/gradient-accumulation-steps.** The number of micro-batches changes every step, so the
  config has ``gradient_accumulation_steps = 1`` and ``managed_gradient_accumulation = false``:
  every ``backward`` accumulates into the partitioned gradient buffers (ZeRO-3 reduce-scatters
  after every backward, as FSDP2 does) and our ``step()`` is the accumulation boundary, whatever the
  number of backwards before it. ``backward(..., scale_wrt_gas=False)`` as well, so no 1/gas ever.
- **Same optimizer and schedule.** ``build_optimizer`` / ``build_scheduler`` (AdamW, warmup +
  cosine LambdaLR) are handed to DeepSpeed as factories; ZeRO-3 runs that AdamW on its flat fp32
  partitions (element-wise, so identical to the unpartitioned update). Clipping is DeepSpeed's
  ``gradient_clipping`` on the global norm of the summed gradients (same formula as
  ``clip_grad_norm_``: scale by ``max / (norm + 1e-6)`` when that is < 1).
- **fp32** (no fp16/bf16 section): the fp32 master partitions equal the parameters.
- **Every parameter partitioned** (``stage3_param_persistence_threshold = 0``): the tiny CPU models
  would otherwise keep all parameters unpartitioned and test nothing.
- **Lockstep:** ZeRO-3 gathers each module's parameters on the world group in forward and
  reduce-scatters gradients after every backward; the executor's zero-weight passes keep every rank
  at one forward/backward per micro-batch (see flexsp.executor). The LM head weight is used by the
  root module's forward, not by ``lm_head.forward``, so it is registered as an external parameter
  of the root module.

``module`` is the DeepSpeed engine itself (callable like the model): DeepSpeed's forward prologue
is what lets ZeRO-3 fetch parameters touched outside their own module.

Checkpoints: DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` under
``<checkpoint>/deepspeed`` (every rank writes its parameter/optimizer partition; resuming needs
the same world size), which holds model, fp32 master weights, AdamW moments and the LR scheduler.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from flexsp.engines import build_optimizer, build_scheduler

CKPT_SUBDIR = "deepspeed"
CKPT_TAG = "engine"


def ds_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config of this engine (see the module docstring for every choice)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.grad_clip),
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": 3,
            "reduce_scatter": True,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
        },
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model, cfg, world_size: int, device: torch.device):
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
        except ImportError as exc:
            raise ValueError("parallel.engine='deepspeed' needs DeepSpeed (pip install -e .[dist]); "
                             f"import failed: {exc}") from exc
        acc = get_accelerator().device_name()
        if acc != device.type:
            raise ValueError(f"DeepSpeed selected its '{acc}' accelerator but the model is on {device.type}; "
                             f"set DS_ACCELERATOR={device.type}")
        self.cfg = cfg
        self.world_size = world_size
        # DeepSpeed's comm layer still calls the torch 2.13-deprecated collective names, once per
        # call site and rank: noise, not a problem of the run
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|"
                                r"reduce_scatter_tensor)` is deprecated", category=FutureWarning)
        # reuses the process group flexsp.distributed created (backend chosen there)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=list(model.parameters()),
            optimizer=lambda params: build_optimizer(params, cfg),
            lr_scheduler=lambda opt: build_scheduler(opt, cfg),
            config=ds_config(cfg, world_size),
            dist_init_required=False,
        )
        # used by Transformer.forward (logits / loss), not by lm_head.forward
        deepspeed.zero.register_external_parameter(model, model.output_weight)
        self.model = model
        self.module = self.engine
        # the torch AdamW that ZeRO-3 steps on its fp32 partitions (holds lr)
        self._basic = self.engine.basic_optimizer

    @property
    def lr(self) -> float:
        return self._basic.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        # x world: ZeRO-3's reduce-scatter averages, we want the sum (exact for a power-of-two world)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()          # boundary: clip (global norm), AdamW, LR scheduler, zero grads
        norm = self.engine.get_global_grad_norm()
        return float(norm)

    # -- full parameters (tests, return_state) --------------------------------------------------
    def full_state_dict(self) -> dict:
        """Unsharded fp32 parameters by name (collective: one gather per parameter); every rank
        gets them."""
        import deepspeed
        out = {}
        for name, p in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().clone().cpu()
        for name, b in self.model.named_buffers():
            if name in self.model.state_dict():
                out[name] = b.detach().clone().cpu()
        return out

    # -- checkpoints: DeepSpeed's partitioned format -------------------------------------------
    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(Path(directory) / CKPT_SUBDIR), tag=CKPT_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        path = Path(directory) / CKPT_SUBDIR
        if not (path / CKPT_TAG).is_dir():
            raise ValueError(f"{directory} has no DeepSpeed engine state ({path / CKPT_TAG} missing): was it "
                             f"written by another engine (parallel.engine)?")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=CKPT_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
