"""Command line of ``flexsp-profile``: Hydra overrides of the training tree plus ``profile.*``.

    flexsp-profile [overrides ...]          # e.g. model.hf_checkpoint=DIR profile.world_size=4
    flexsp-profile --help | --cfg [overrides]

The tree is the one ``flexsp-train`` composes (``configs/config.yaml``): ``model=...`` /
``model.*`` (``model.hf_checkpoint=DIR`` included), ``train.precision``, ``parallel.engine``,
``parallel.backend``, ``parallel.devices_per_node`` and ``output_dir`` say what is profiled and
where the files go, exactly as they say what training builds; the ``profile`` section
(``configs/profile/default.yaml``, :class:`flexsp.config.ProfileConfig`) says how.

Every user error is one line ``flexsp-profile: error: ...`` on stderr naming the field and what is
valid, exit status 2, no traceback; under torchrun only rank 0 prints it (every rank exits 2).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from dataclasses import MISSING, fields

from flexsp.config import ProfileConfig, RunConfig, check_output_dir
from flexsp.config.compose import compose, compose_container, to_yaml
from flexsp.config.fields import field_docs
from flexsp.errors import UserError, print_error
from flexsp.log import setup_logging
from flexsp.profile.config import profiled_model
from flexsp.profile.runner import profile

PROG = "flexsp-profile"


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def help_text() -> str:
    docs = field_docs(ProfileConfig)
    lines = [
        f"usage: {PROG} [-h] [--cfg] [override ...]",
        "",
        "Time real micro-batches of the training code path on this machine and write a calibrated",
        "cost model (<output_dir>/<profile.name>.json) plus a report. Spawns profile.world_size local",
        "ranks, or runs as one rank of a torchrun world (torchrun --nproc_per_node N -m flexsp.profile ...).",
        "The model is the training tree's: model=PRESET, model.<field>=..., model.hf_checkpoint=DIR,",
        "train.precision, parallel.engine / backend / devices_per_node (see flexsp-train --help);",
        "output_dir (default outputs/profile) holds the files.",
        "",
        "profile.* fields:",
    ]
    for f in fields(ProfileConfig):
        d = f.default if f.default is not MISSING else f.default_factory()
        shown = json.dumps(d) if not isinstance(d, str) else d
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"  profile.{f.name}={shown}")
        lines += textwrap.wrap(docs.get(f.name, ""), 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def check(cfg: RunConfig) -> None:
    """Everything checkable before any rank starts: the model (preset, overrides or checkpoint), the
    depth, the shapes, the output directory; UserError naming the field."""
    full, _, _ = profiled_model(cfg)
    cfg.profile.depths(full.layers)
    cfg.profile.shapes(full)
    if _rank0():
        check_output_dir(cfg.output_dir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    setup_logging()
    if any(a in ("-h", "--help") for a in argv):
        if _rank0():
            sys.stdout.write(help_text())
        return 0
    overrides = [a for a in argv if a != "--cfg"]
    try:
        bad = [a for a in overrides if a.startswith("-")]
        if bad:
            raise UserError(
                f"unknown option {bad[0]!r}; options: --help, --cfg; everything else is a "
                f"Hydra override (key=value, e.g. profile.world_size=4)"
            )
        if "--cfg" in argv:
            print(to_yaml(compose_container(overrides, "profile")))
            return 0
        cfg = compose(overrides, "profile")
        check(cfg)
        profile(cfg, " ".join([PROG, *argv]))
    except UserError as exc:
        return print_error(PROG, exc) if _rank0() else 2
    except KeyboardInterrupt:
        return 130
    return 0
