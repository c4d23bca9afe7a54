"""The model a run trains, resolved once from the configuration tree, for every tool alike.

``flexsp-train``, ``flexsp-profile`` and ``flexsp-dryrun`` call :func:`model_config_of` on the same
:class:`flexsp.config.RunConfig` section (``model.*`` and ``train.precision``), so the profiler times
exactly the model training builds (a preset with overrides, or a Hugging Face checkpoint's
config.json: the native model, or transformers' modules when it trains HF-native), and the cost
model's shape check compares against that same shape. :func:`profile_command` is the command that
profiles it, named by the shape-mismatch error.
"""

from __future__ import annotations

import shlex
from dataclasses import replace

from flexsp.config import ModelSection, RunConfig, param_dtype, resolve_precision
from flexsp.model import model_config
from flexsp.model.hf import _hf_dtype, _load_config_dict, checkpoint_dir, config_from_hf, native_gap
from flexsp.model.hf_native import hf_native_config


def hf_native_reason(model: ModelSection) -> str | None:
    """Why the run trains HF-native (transformers' modules, flexsp.model.hf_native):
    model.hf_native=true, or the native model does not cover model.hf_checkpoint (its reason);
    None: the native model."""
    if not model.hf_checkpoint:
        return None
    if model.hf_native:
        return "model.hf_native=true"
    gap = native_gap(checkpoint_dir(model.hf_checkpoint))
    return None if gap is None else f"the native model does not cover it ({gap.split(': ', 1)[-1]})"


def model_config_of(cfg: RunConfig, vocab_size: int | None = None):
    """The model config to train (preset + overrides, or a Hugging Face checkpoint's config: a
    ModelConfig, or an HFNativeConfig when it trains HF-native), with parameters in the dtype the
    precision keeps them in; and the resolved precision (train.precision, auto resolved)."""
    over = dict(cfg.model.overrides)
    over.pop("vocab_size", None)
    hf_native = False
    if cfg.model.hf_checkpoint:
        path = checkpoint_dir(cfg.model.hf_checkpoint)
        hf_native = hf_native_reason(cfg.model) is not None
        if hf_native:
            over.setdefault("dtype", _hf_dtype(_load_config_dict(path)[0]))
            mcfg = hf_native_config(path, **over)
        else:
            mcfg = replace(config_from_hf(path), **over)
    else:
        mcfg = model_config(cfg.model.preset, **over)
    precision = resolve_precision(cfg.train.precision, mcfg.dtype, cfg.parallel.engine)
    if vocab_size is not None and not hf_native:  # HF-native: the checkpoint's vocabulary, always
        mcfg = replace(mcfg, vocab_size=int(vocab_size))
    return replace(mcfg, dtype=param_dtype(precision)), precision


def planning_shape(mcfg):
    """The ModelConfig the cost model and its estimate see (an HF-native model's LLaMA-equivalent)."""
    return mcfg.planning_shape() if getattr(mcfg, "hf_native", False) else mcfg


def model_overrides_args(cfg: RunConfig) -> list[str]:
    """The command-line overrides that define the model of ``cfg`` (what training builds)."""
    m = cfg.model
    args = [f"model.hf_checkpoint={m.hf_checkpoint}"] if m.hf_checkpoint else [f"model={m.preset}"]
    if m.hf_native:
        args.append("model.hf_native=true")
    for key, value in m.overrides.items():
        if key != "vocab_size":
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args.append(f"model.{key}={text}")
    if cfg.train.precision != "auto":
        args.append(f"train.precision={cfg.train.precision}")
    if cfg.parallel.engine != "fsdp2":
        args.append(f"parallel.engine={cfg.parallel.engine}")
    return args


def profile_command(cfg: RunConfig, world_size: int) -> tuple[str, str]:
    """(the ``flexsp-profile`` command that profiles the model ``cfg`` trains on ``world_size`` ranks,
    the cost-model file it writes)."""
    out = cfg.output_dir / "profile"
    ranks = max(1, min(world_size, cfg.parallel.devices_per_node or world_size))  # one node's devices
    args = ["flexsp-profile", *model_overrides_args(cfg), f"profile.world_size={ranks}", f"output_dir={out}"]
    return " ".join(shlex.quote(a) for a in args), str(out / "profile.json")
