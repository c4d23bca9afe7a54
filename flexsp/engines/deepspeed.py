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
- **Precision** (``train.precision``): ``fp32`` (no bf16 section: the fp32 master partitions equal
  the parameters); ``bf16`` = DeepSpeed's ``bf16`` section (bf16 parameters for compute, fp32
  master partitions and AdamW states in the optimizer) with ``communication_data_type: fp32``, so
  gradients are reduced in fp32; ``bf16-pure`` is not offered on this engine.
- **Built partitioned**: the model is constructed under ``deepspeed.zero.Init``, so every
  parameter is partitioned as soon as its module is built (one parameter at a time is ever whole),
  then each rank fills only its own flat partition (``param.ds_tensor``: elements
  ``[rank * part, (rank + 1) * part)`` of the flattened parameter) from the weight source, before
  ``deepspeed.initialize`` copies them into the fp32 master partitions.
- **Communication**: ``overlap_comm`` on and DeepSpeed's default persistence thresholds (small
  parameters such as norms stay unpartitioned); ``parallel.deepspeed_persistence_threshold=0``
  partitions every parameter (the tiny CPU test models would otherwise keep all of them whole and
  test nothing).
- **Lockstep:** ZeRO-3 gathers each module's parameters on the world group in forward and
  reduce-scatters gradients after every backward; the executor's zero-weight passes keep every rank
  at one forward/backward per micro-batch (see flexsp.executor). The LM head weight is used by the
  root module's forward, not by ``lm_head.forward``, so it is registered as an external parameter
  of the root module.

``module`` is the DeepSpeed engine itself (callable like the model): DeepSpeed's forward prologue
is what lets ZeRO-3 fetch parameters touched outside their own module.

Checkpoints: DeepSpeed's own ``save_checkpoint`` / ``load_checkpoint`` under
``<checkpoint>/deepspeed`` (every rank writes its parameter/optimizer partition), which holds model,
fp32 master weights, AdamW moments and the LR scheduler. Resuming needs the same world size: a
checkpoint of another world size is refused with the conversion to run (DeepSpeed's universal
checkpoint, or parallel.engine=fsdp2 whose DCP checkpoints reshard).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from flexsp.engines.common import build_optimizer, build_scheduler
from flexsp.engines.fsdp2 import parallelize_config
from flexsp.errors import UserError
from flexsp.parallelize import parallelize

CKPT_SUBDIR = "deepspeed"
CKPT_TAG = "engine"


def ds_config(cfg, world_size: int, persistence_threshold: int | None = None) -> dict:
    """The DeepSpeed config of this engine (see the module docstring for every choice)."""
    zero = {"stage": 3, "reduce_scatter": True, "overlap_comm": True, "contiguous_gradients": True}
    if persistence_threshold is not None:
        zero.update(
            stage3_param_persistence_threshold=int(persistence_threshold),
            stage3_model_persistence_threshold=int(persistence_threshold),
        )
    out = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(cfg.grad_clip),
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        out["bf16"] = {"enabled": True}
        out["communication_data_type"] = "fp32"
    elif cfg.precision != "fp32":
        raise UserError(
            f"train.precision={cfg.precision!r} is not offered with parallel.engine=deepspeed; "
            f"valid options: ['fp32', 'bf16']"
        )
    return out


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, make_model, weights, cfg, parallel_cfg, world_size: int, device: torch.device):
        try:
            import deepspeed
            from deepspeed.accelerator import get_accelerator
        except ImportError as exc:
            raise UserError(
                f"parallel.engine='deepspeed' needs DeepSpeed (pip install -e .[dist]); import failed: {exc}"
            ) from exc
        acc = get_accelerator().device_name()
        if acc != device.type:
            raise UserError(
                f"DeepSpeed selected its '{acc}' accelerator but the model is on {device.type}; "
                f"set DS_ACCELERATOR={device.type}"
            )
        self.cfg = cfg
        self.world_size = world_size
        # DeepSpeed's comm layer still calls the torch 2.13-deprecated collective names, once per
        # call site and rank: noise, not a problem of the run
        warnings.filterwarnings(
            "ignore",
            message=r"`torch\.distributed\.(all_gather_into_tensor|"
            r"reduce_scatter_tensor)` is deprecated",
            category=FutureWarning,
        )
        # reuses the process group flexsp.distributed created (backend chosen there)
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        config = ds_config(cfg, world_size, getattr(parallel_cfg, "deepspeed_persistence_threshold", None))
        # dtype=None: zero.Init then takes it from the config (bf16 section -> bf16, none -> fp32). An
        # explicit dtype hits DeepSpeed 0.19's `dtype or fp16 if fp16_supported() else bf16 if
        # is_bf16_supported else fp32` (precedence: on a CPU without mkldnn fp16 that is bf16, always)
        with deepspeed.zero.Init(config_dict_or_path=config, dtype=None, remote_device=device.type):
            model = make_model(device)
        parallelize(model, None, parallelize_config(model, cfg))  # checkpointing, compile (ZeRO-3 shards)
        fill_partitions(model, weights)
        if model.lm_head.weight is None:  # tied: the head's forward uses the embedding's weight
            deepspeed.zero.register_external_parameter(model.lm_head, model.embed.weight)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=list(model.parameters()),
            optimizer=lambda params: build_optimizer(params, cfg),
            lr_scheduler=lambda opt: build_scheduler(opt, cfg),
            config=config,
            dist_init_required=False,
        )
        self.model = model
        self.module = self.engine
        # the torch AdamW that ZeRO-3 steps on its fp32 partitions (holds lr)
        self._basic = self.engine.basic_optimizer

    @property
    def lr(self) -> float:
        return self._basic.param_groups[0]["lr"]

    def begin_micro_batch(self, last: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        # x world: ZeRO-3's reduce-scatter averages, we want the sum (exact for a power-of-two world)
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self):
        self.engine.step()  # boundary: clip (global norm), AdamW, LR scheduler, zero grads
        norm = self.engine.get_global_grad_norm()
        return norm.detach() if torch.is_tensor(norm) else torch.tensor(float(norm))

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
            raise UserError(
                f"{directory} has no DeepSpeed engine state ({path / CKPT_TAG} missing): was it "
                f"written by another engine (parallel.engine)?"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path), tag=CKPT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise UserError(f"DeepSpeed could not load the checkpoint in {path}")


@torch.no_grad()
def fill_partitions(model, weights) -> None:
    """Fill every ZeRO-3 partition (``param.ds_tensor``, this rank's slice of the flattened,
    alignment-padded parameter) with exactly those elements of the full parameter; persistent
    (unpartitioned) parameters are filled whole."""
    weights.check(model)
    for name, p in model.named_parameters():
        numel, part = int(p.ds_numel), p.ds_tensor
        size = int(part.ds_numel)
        start = size * dist.get_rank(group=p.ds_process_group)
        valid = max(0, min(start + size, numel) - start)
        if valid:
            weights.fill_(part.narrow(0, 0, valid), name, numel, start)
        if valid < size:  # alignment padding past the parameter's end
            part.narrow(0, valid, size - valid).zero_()
        if p.data.numel() == numel:  # persistent (small) parameters are also kept whole
            weights.fill_(p.data, name, numel, 0)
