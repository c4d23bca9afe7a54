"""Input checks shared by the command-line tools (``flexsp-plan``, ``flexsp-simulate``).

Each function turns one user input (a lengths file, a cost-model name or file, a cluster size, an
output path, a number) into a value, or raises ``ValueError`` with ONE line naming the input, the
offending value and what is valid. The CLIs print that line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .costmodel import CostModel
from .errors import UserError, check_power_of_two
from .presets import PRESETS, load_preset


def read_lengths(source: str) -> list[int]:
    """Lengths from a text/.npy/JSON file or stdin ("-"); ValueError naming the problem."""
    try:
        if source == "-":
            text = sys.stdin.read()
        elif source.endswith(".npy"):
            if Path(source).is_dir():
                raise IsADirectoryError(source)
            try:
                arr = np.load(source, allow_pickle=False)
            except FileNotFoundError:
                raise
            except (OSError, ValueError) as exc:
                raise UserError(f"{source}: not a readable .npy array ({exc})") from None
            if arr.ndim != 1:
                raise UserError(f"{source}: expected a 1-D array of lengths, got shape {arr.shape}")
            return as_lengths(arr.tolist(), source)
        else:
            text = Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"lengths file {source} does not exist") from None
    except IsADirectoryError:
        raise UserError(
            f"--lengths {source} is a directory; give a file of lengths (or - for stdin)"
        ) from None
    except PermissionError:
        raise UserError(f"lengths file {source} is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise UserError(
            f"{source}: not a text file of lengths (not UTF-8); use text, .npy or a JSON list"
        ) from None
    except OSError as exc:
        raise UserError(f"lengths file {source} cannot be read: {exc.strerror or exc}") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            return as_lengths(json.loads(stripped), source)
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: malformed JSON list ({exc})") from None
    values = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            values.append(int(line))
        except ValueError:
            raise UserError(f"{source}:{lineno}: expected one integer per line, got {line[:40]!r}") from None
    return as_lengths(values, source)


def as_lengths(values, source: str) -> list[int]:
    """A non-empty list of integers (JSON numbers like 12.0 included); ValueError otherwise."""
    if not isinstance(values, list) or not values:
        raise UserError(f"{source}: no sequence lengths found (the batch is empty)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
            raise UserError(f"{source}: entry {i} is {v!r}, not an integer length")
        out.append(int(v))
    return out


def resolve_cost_model(spec: str) -> CostModel:
    """``spec`` is a preset name or a cost-model JSON file; ValueError listing the presets if it
    is neither."""
    if spec in PRESETS:
        return load_preset(spec)
    if os.path.exists(spec) or spec.endswith(".json") or os.sep in spec:
        return CostModel.load(spec)
    raise UserError(
        f"--cost-model {spec!r} is neither a preset nor a file; valid presets: {', '.join(sorted(PRESETS))}"
    )


def resize(cm: CostModel, num_devices: int | None, memory_mb: float | None) -> CostModel:
    """The cost model on another cluster size / memory (None keeps it). A cluster smaller than a
    node becomes one node of that size."""
    if num_devices is None and memory_mb is None:
        return cm
    try:
        if num_devices is not None and num_devices < cm.devices_per_node:
            cm = replace(cm, num_devices=num_devices, devices_per_node=num_devices)
        return cm.with_devices(num_devices, memory_mb)
    except ValueError as exc:
        raise UserError(f"--num-devices {num_devices} / --memory-mb {memory_mb}: {exc}") from None


def check_output_path(option: str, path: str, suffixes: tuple[str, ...] = ()) -> None:
    """Before any work: the output's folder exists and is writable, and the suffix is supported."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise UserError(
            f"{option} {path}: unsupported file type {p.suffix or '(none)'!r}; "
            f"use one of {', '.join(suffixes)}"
        )
    if p.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{option} {path}: not writable")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def power_of_two(text: str) -> int:
    """argparse type: an integer power of two >= 1."""
    try:
        n = int(text)
        return check_power_of_two("value", n)
    except ValueError:
        got = n if text.strip().lstrip("-").isdigit() else repr(text)
        raise argparse.ArgumentTypeError(
            f"expected a power of two >= 1 (1, 2, 4, ..., 1024), got {got}"
        ) from None


def positive(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return x


def int_at_least(low: int):
    """argparse type factory: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse
