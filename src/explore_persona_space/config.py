"""The one config system: a frozen dataclass per experiment, overridden by ``--set`` and ``--seed``.

Every script keeps its numbers in one frozen ``Scale`` dataclass (full / smoke /
test instances). ``--set key=value`` changes one field of the chosen instance:

* values are parsed by the field's **annotation**, not by its current value, so a
  ``float`` field takes ``2.5`` even when its default is written ``20``;
* dotted keys reach nested dataclasses (``--set train.learning_rate=3e-5``);
* a field annotated ``X | None`` takes ``none``; a ``tuple[str, ...]`` takes a
  comma-separated list; a ``Literal`` takes one of its values;
* unknown keys and unparsable values raise :class:`ConfigError` naming the key,
  the expected type and the valid keys (the CLI turns it into exit status 2).

Seeds: the top-level ``seed`` field is the only seed a user sets (``--seed``);
every other seed of a run is derived from it by the script, so a nested
``...seed`` key is refused rather than silently overwritten later.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal, Union, get_args, get_origin

from explore_persona_space.errors import InputError


class ConfigError(InputError):
    """A ``--set`` or ``--seed`` that does not fit the experiment's config."""


def settable_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key ``--set`` accepts for ``cfg`` (nested dataclasses flattened)."""
    keys: list[str] = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            keys += settable_keys(value, name + ".")
        elif not (prefix and f.name == "seed") and _parsable(hints[f.name]):
            keys.append(name)
    return keys


def apply_overrides(cfg: Any, items: Iterable[str]) -> Any:
    """``KEY=VALUE`` strings applied in order onto a frozen dataclass (a later one wins on one key)."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip())
    return cfg


def with_seed(cfg: Any, seed: int | None) -> Any:
    """``--seed``: the config with its top-level ``seed`` replaced (the one seed every other derives from)."""
    if seed is None:
        return cfg
    if "seed" not in {f.name for f in dataclasses.fields(cfg)}:
        raise ConfigError(f"{type(cfg).__name__} has no 'seed' field for --seed")
    return dataclasses.replace(cfg, seed=int(seed))


def _set(cfg: Any, path: Sequence[str], raw: str, full_key: str, prefix: str = "") -> Any:
    names = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in names:
        valid = ", ".join(settable_keys(cfg, prefix))
        raise ConfigError(f"--set: unknown key {full_key!r}; valid keys: {valid}")
    current = getattr(cfg, head)
    nested = dataclasses.is_dataclass(current) and not isinstance(current, type)
    if len(path) > 1:
        if not nested:
            raise ConfigError(f"--set: {prefix + head!r} has no fields (in {full_key!r})")
        if path[1:] == ["seed"]:
            raise ConfigError(
                f"--set {full_key}: nested seeds derive from the top-level seed; use --seed or --set seed=N"
            )
        return dataclasses.replace(cfg, **{head: _set(current, path[1:], raw, full_key, f"{prefix}{head}.")})
    if nested:
        sub = ", ".join(settable_keys(current, f"{prefix}{head}."))
        raise ConfigError(f"--set: {full_key!r} is a group; set one of its fields: {sub}")
    hint = typing.get_type_hints(type(cfg))[head]
    if not _parsable(hint):
        raise ConfigError(f"--set: {full_key!r} cannot be set from the command line (type {hint!r})")
    try:
        value = parse_value(hint, raw)
    except (TypeError, ValueError):
        raise ConfigError(f"--set {full_key}: {raw!r} is not a valid {type_name(hint)}") from None
    try:
        return dataclasses.replace(cfg, **{head: value})
    except ValueError as exc:  # the dataclass's own validation (__post_init__)
        raise ConfigError(f"--set {full_key}={raw}: {exc}") from None


def _parsable(hint: Any) -> bool:
    try:
        type_name(hint)
    except TypeError:
        return False
    return True


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def type_name(hint: Any) -> str:
    """How a field's type reads in an error message; TypeError for types ``--set`` cannot parse."""
    if hint in (bool, int, float, str):
        return hint.__name__
    if _is_union(hint):
        return " | ".join("None" if a is type(None) else type_name(a) for a in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(hint))
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"comma-separated {type_name(args[0])} list"
        return "comma-separated (" + ", ".join(type_name(a) for a in args) + ")"
    raise TypeError(f"--set cannot parse a field of type {hint!r}")


def parse_value(hint: Any, raw: str) -> Any:
    """``raw`` as a value of the annotation ``hint``; ValueError when it is not one."""
    if hint in _SCALARS:
        return _SCALARS[hint](raw)
    if _is_union(hint):
        return _parse_union(get_args(hint), raw)
    if get_origin(hint) is Literal:
        for option in get_args(hint):
            if str(option) == raw:
                return option
        raise ValueError(raw)
    if get_origin(hint) is tuple:
        return _parse_tuple(get_args(hint), raw)
    raise TypeError(f"--set cannot parse a field of type {hint!r}")


def _parse_bool(raw: str) -> bool:
    low = raw.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(raw)
    return low in ("true", "1", "yes")


_SCALARS: dict[Any, Any] = {bool: _parse_bool, int: int, float: float, str: str}


def _parse_union(args: tuple[Any, ...], raw: str) -> Any:
    if type(None) in args and raw.lower() in ("none", "null"):
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return parse_value(arg, raw)
        except (TypeError, ValueError):
            continue
    raise ValueError(raw)


def _parse_tuple(args: tuple[Any, ...], raw: str) -> tuple[Any, ...]:
    parts = [p.strip() for p in raw.split(",")] if raw.strip() else []
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(parse_value(args[0], p) for p in parts)
    if len(parts) != len(args):
        raise ValueError(raw)
    return tuple(parse_value(a, p) for a, p in zip(args, parts, strict=True))
