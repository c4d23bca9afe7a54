"""Hydra composition of the configuration tree (``configs/``) for every Hydra tool.

``compose(overrides, tool)``: ``configs/config.yaml`` with the tool's group (``+profile=default``,
``+dryrun=default``, ``+bench=default``) and the command line's overrides, resolved, then typed and
validated by :func:`flexsp.config.load_config`. A bad override (unknown key, no such group option,
unparsable value) is one :class:`flexsp.errors.UserError` line naming it and what is valid.
"""

from __future__ import annotations

from pathlib import Path

from flexsp.config.tree import TOOL_SECTIONS, RunConfig, load_config
from flexsp.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The Hydra config directory of this checkout."""
TOOL_OUTPUT_DIRS = {"profile": "outputs/profile"}
"""Default output_dir of a tool whose outputs do not belong in the training run directory."""


def tool_overrides(overrides: list[str], tool: str | None) -> list[str]:
    """``overrides`` with the tool's group added (``+<tool>=default`` unless the command line picks
    one) and its default output_dir (unless the command line sets one)."""
    overrides = list(overrides)
    if tool is None:
        return overrides
    picked = [i for i, o in enumerate(overrides) if o.split("=", 1)[0].lstrip("+") == tool]
    for i in picked:
        overrides[i] = "+" + overrides[i].lstrip("+")
    if not picked:
        overrides.insert(0, f"+{tool}=default")
    if tool in TOOL_OUTPUT_DIRS and not any(
        o.split("=", 1)[0].lstrip("+") == "output_dir" for o in overrides
    ):
        overrides.insert(1, f"output_dir={TOOL_OUTPUT_DIRS[tool]}")
    return overrides


def compose_container(overrides: list[str], tool: str | None = None) -> dict:
    """The resolved config as Hydra composes it (a plain mapping: what ``--cfg`` prints);
    UserError with one line for a bad override."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    full = tool_overrides(overrides, tool)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=full)
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(_hydra_message(exc, overrides, tool)) from None


def compose(overrides: list[str], tool: str | None = None) -> RunConfig:
    """The typed, validated tree of ``tool`` (None: flexsp-train) with ``overrides``."""
    return load_config(compose_container(overrides, tool))


def to_yaml(container: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(container))


def _hydra_message(exc, overrides: list[str], tool: str | None) -> str:
    text = " ".join(str(exc).split())
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        group_dir = CONFIG_DIR / key
        if group_dir.is_dir() and f"'{key}/{value}'" in text:
            options = sorted(p.stem for p in group_dir.glob("*.yaml"))
            return f"{key}={value}: no such config; valid options for {key}: {options}"
        if f"'{key}'" in text and "Could not override" in text:
            section, _, leaf = key.rpartition(".")
            if not section and tool in TOOL_SECTIONS and leaf in _section_keys(tool, [], tool):
                example = f"{tool}.{o.lstrip('+~')}"
                return f"unknown config key {key!r}: {tool} settings are under {tool}.*, e.g. {example}"
            valid = _section_keys(section, [x for x in overrides if x != o], tool)
            return (
                f"unknown config key {key!r}; valid keys of {section or 'the config'}: {valid}"
                if valid
                else f"unknown config key {key!r} (--cfg prints the config)"
            )
    return f"bad override: {text}"


def _section_keys(section: str, overrides: list[str], tool: str | None) -> list[str]:
    """The keys of ``section`` in the config composed without the bad override (best effort)."""
    try:
        node = compose_container(overrides, tool)
        for part in filter(None, section.split(".")):
            node = node[part]
        return sorted(node) if isinstance(node, dict) else []
    except (UserError, KeyError, TypeError):
        return []
