"""Command line of ``flexsp-profile``: ``key=value`` overrides of ``configs/profile.yaml``.

Not Hydra: the profile's config is one flat dataclass (:class:`ProfileConfig`), ``model`` is a plain
string (a preset name), and ``--help`` lists exactly its fields. Values are YAML
(``compute_shapes=[[1024],[512,512]]``, ``model_overrides={layers: 4}``, ``backend=null``); dotted
keys set one entry of a mapping (``model_overrides.activation_checkpointing=true``).

Every user error is one line ``flexsp-profile: error: ...`` on stderr naming the field and what is
valid, exit status 2, no traceback; under torchrun only rank 0 prints it (every rank exits 2).
"""
from __future__ import annotations

import ast
import inspect
import os
import sys
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path

from flexsp.profile.config import ProfileConfig

PROG = "flexsp-profile"
YAML = Path(__file__).resolve().parents[2] / "configs" / "profile.yaml"


STRING_FIELDS = ("name", "output_dir", "model", "precision", "engine", "validate_distribution", "backend")
NULLABLE = ("backend",)


class UsageError(ValueError):
    """A user error: reported as one line, exit status 2."""


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def error(msg: str) -> int:
    if _rank0():
        line = " ".join(str(msg).split())
        print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)
    return 2


def field_docs() -> dict[str, str]:
    """The attribute docstrings of ProfileConfig (the string right after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ProfileConfig)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs


def _default(f):
    if f.default is not MISSING:
        return f.default
    return f.default_factory()


def help_text() -> str:
    import json
    docs = field_docs()
    lines = [f"usage: {PROG} [-h] [key=value ...]", "",
             "Time real micro-batches of the training code path on this machine and write a calibrated",
             "cost model (<output_dir>/<name>.json) plus a report. Spawns world_size local ranks, or runs",
             "as one rank of a torchrun world (torchrun --nproc_per_node N -m flexsp.profile ...).",
             "Values are YAML (lists: compute_shapes=[[1024],[512,512]]; mappings: model_overrides={layers: 4}",
             "or model_overrides.layers=4; null).", "", f"defaults: {YAML if YAML.is_file() else 'built in'}",
             "", "fields:"]
    for f in fields(ProfileConfig):
        d = _default(f)
        shown = json.dumps(d) if not isinstance(d, str) else d
        if len(shown) > 60:
            shown = shown[:57] + "..."
        lines.append(f"  {f.name}={shown}")
        lines += textwrap.wrap(docs.get(f.name, ""), 96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines) + "\n"


def load_defaults() -> dict:
    """configs/profile.yaml when the checkout has it, else the dataclass defaults."""
    import yaml
    if not YAML.is_file():
        return {f.name: _default(f) for f in fields(ProfileConfig)}
    try:
        data = yaml.safe_load(YAML.read_text())
    except (OSError, yaml.YAMLError) as exc:  # a broken yaml is the user's too
        raise UsageError(f"{YAML} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{YAML} must hold a mapping of ProfileConfig fields")
    return data


def parse(argv: list[str]) -> ProfileConfig:
    """``key=value`` arguments over the defaults -> a validated ProfileConfig (UsageError otherwise)."""
    import yaml
    valid = [f.name for f in fields(ProfileConfig)]
    data = load_defaults()
    for arg in argv:
        key, eq, text = arg.partition("=")
        key = key.lstrip("+")
        if not eq or not key:
            raise UsageError(f"argument {arg!r} is not key=value; fields: {', '.join(valid)} ({PROG} --help)")
        top, _, sub = key.partition(".")
        if top not in valid:
            raise UsageError(f"unknown field {top!r} in {arg!r}; valid fields: {', '.join(valid)}")
        if not sub and top in STRING_FIELDS:  # a name stays a name (model=7b, name=2024)
            value = None if top in NULLABLE and text.lower() in ("null", "none", "~") else text
        else:
            try:
                value = yaml.safe_load(text) if text else ""
            except yaml.YAMLError as exc:
                raise UsageError(f"{key}: cannot parse value {text!r} as YAML "
                                 f"({' '.join(str(exc).split())[:120]})") from None
        if sub:
            cur = data.get(top)
            if not isinstance(cur, dict):
                raise UsageError(f"{key}: {top} is not a mapping, set it as {top}=VALUE")
            cur = dict(cur)
            node = cur
            parts = sub.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
                if not isinstance(node, dict):
                    raise UsageError(f"{key}: {p} is not a mapping")
            node[parts[-1]] = value
            data[top] = cur
        else:
            data[top] = value
    try:
        return ProfileConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def check(cfg: ProfileConfig) -> None:
    """Everything checkable before any rank starts: the model preset and overrides, the depth, the
    shapes, the output directory. UsageError naming the field."""
    try:
        full, _ = cfg.model_config()
        cfg.depths(full.layers)
        cfg.shapes(full)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if _rank0():
        from flexsp.config import check_output_dir
        try:
            check_output_dir(Path(cfg.output_dir))
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def _rank_value_error(exc) -> str | None:
    """The message of a ValueError a rank raised (the last line of its traceback), else None."""
    text = str(exc).rstrip().splitlines()
    last = text[-1] if text else ""
    for prefix in ("ValueError: ", "UsageError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        if _rank0():
            sys.stdout.write(help_text())
        return 0
    try:
        cfg = parse(argv)
        check(cfg)
    except UsageError as exc:
        return error(str(exc))
    from flexsp.profile import profile
    from flexsp.spawn import RankError
    try:
        profile(cfg, " ".join([PROG, *argv]))
    except RankError as exc:
        msg = _rank_value_error(exc)
        if msg is None:
            raise
        return error(msg)
    except KeyboardInterrupt:
        return 130
    return 0
