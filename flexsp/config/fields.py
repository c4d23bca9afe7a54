"""How the configuration tree checks values: annotations read at run time, one error per bad value.

:func:`typed_section` builds a section dataclass from a mapping (what Hydra composes) after checking
every key against the dataclass's fields and every value against its annotation: ``int``, ``float``
(finite; an int is accepted), ``bool``, ``str``, lists, unions with ``None``, :class:`Choice` enums
(the value must be one of the members: "train.precision='fp16'; valid options: [...]") and nested
section dataclasses (checked the same way, under ``<section>.<field>``). A bad key or value is one
:class:`flexsp.errors.UserError` naming ``<section>.<field>``, the value and what is valid.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Mapping

from flexsp.errors import UserError


class Choice(str, enum.Enum):
    """A config option with a fixed set of values: compares, hashes, formats and serialises as its
    value (``Precision.bf16 == "bf16"``, ``f"{p}"`` -> ``bf16``)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    def __hash__(self) -> int:
        return hash(str(self.value))

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]

    @classmethod
    def parse(cls, field: str, value) -> Choice:
        """The member whose value is ``value``; UserError listing the valid values otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            raise UserError.choice(field, value, cls.values()) from None


def type_name(tp) -> str:
    """How an annotation reads in an error message ("an integer", "a string or null", ...)."""
    names = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if isinstance(tp, type) and issubclass(tp, Choice):
        return f"one of {tp.values()}"
    return names.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def matches_type(tp, value) -> bool:
    """Whether ``value`` (from YAML / the command line) fits annotation ``tp`` (finite floats only)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(a, value) for a in typing.get_args(tp))
    tp = origin or tp
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp in (list, tuple):
        return isinstance(value, (list, tuple))
    if tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type) and issubclass(tp, Choice):
        return isinstance(value, str) and value in tp.values()
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _choice_of(tp):
    """The Choice enum of an annotation ``C`` or ``C | None`` (else None)."""
    for a in (tp, *typing.get_args(tp)):
        if isinstance(a, type) and issubclass(a, Choice):
            return a
    return None


def typed_value(tp, value, field: str):
    """``value`` checked against annotation ``tp`` (ints widened to float, strings of a Choice made
    members, mappings of a section dataclass built); UserError naming ``field`` otherwise."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return value if isinstance(value, tp) else typed_section(tp, value, field)
    choice = _choice_of(tp)
    if choice is not None and value is not None:
        return choice.parse(field, value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a name that YAML read as a number (profile.name=2024)
    if not matches_type(tp, value):
        extra = " (finite)" if tp is float and isinstance(value, float) else ""
        raise UserError(f"{field}={value!r} must be {type_name(tp)}{extra}", field=field)
    if isinstance(value, tuple):
        return list(value)
    return value


def typed_section(cls, data, name: str, skip=()):
    """``cls(**data)`` after checking keys and value types against ``cls``'s annotations; UserError
    naming ``<name>.<field>``, the value and the expected type otherwise."""
    if data is not None and not isinstance(data, Mapping):
        raise UserError(
            f"{name} must be a mapping of {sorted(f.name for f in dataclasses.fields(cls))}, got {data!r}",
            field=name,
        )
    data = dict(data or {})
    valid = {f.name for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(data) - valid)
    if bad:
        raise UserError(
            f"unknown {name} keys {bad}; valid keys: {sorted(valid)}", field=name, options=sorted(valid)
        )
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in skip:
            data[key] = typed_value(hints[key], value, f"{name}.{key}")
    return cls(**data)


def plain(value):
    """A config value as plain YAML/JSON data (Choice -> its value, Path -> str, dataclasses ->
    dicts)."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value


def field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of dataclass ``cls`` (the string right under each field), for
    ``--help`` (Python keeps no attribute docstrings at run time: read from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())
    return docs
