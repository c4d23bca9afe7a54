"""Run ``flexsp-profile``: spawn (or join) the ranks, collect, write the outputs."""

from __future__ import annotations

import datetime as _dt

from flexsp.config import RunConfig
from flexsp.log import get_logger
from flexsp.profile.config import from_flat, profiled_model
from flexsp.profile.launch import run_ranks
from flexsp.profile.measure import rank_body
from flexsp.profile.report import summary_lines, write_outputs

log = get_logger(__name__)


def profile(cfg: RunConfig | dict, cmd: str = "") -> dict | None:
    """Run the profile of ``cfg`` (a RunConfig with a ``profile`` section; a flat dict of earlier
    versions is read by :func:`flexsp.profile.config.from_flat`); on rank 0 (or the spawning
    process) write the outputs and return ``{"raw": ..., "paths": ...}``; other torchrun ranks
    return None."""
    if isinstance(cfg, dict):
        cfg = from_flat(cfg)
    prof = cfg.profile
    full, _, _ = profiled_model(cfg)  # UserErrors of the model and the depth before any rank starts
    prof.depths(full.layers)
    results = run_ranks(rank_body, prof.world_size, cfg, prof.threads_per_rank, prof.timeout_s)
    raw = results[0]
    if raw is None:
        return None
    raw["date"] = _dt.datetime.now().isoformat(timespec="seconds")
    raw["command"] = cmd
    paths = write_outputs(raw, cfg.output_dir, prof.name, prof.plot, cmd)
    print("\n".join(summary_lines(raw, cmd)), flush=True)
    print(f"[flexsp-profile] wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return {"raw": raw, "paths": paths}
