"""Typed assignment of one dotted recipe key onto Bridge's config dataclasses.

:func:`set_key` walks ``model.num_layers`` down to the dataclass field it names, refuses a key
that no dataclass declares, and converts the value to the field's annotation (``5e-3`` as a
string, which PyYAML 1.1 reads, becomes a float; ``bf16`` names a torch dtype), so that the
error names the file and key (``<file>: <key>: expected int, got 'x'``) instead of failing deep
inside Megatron. Used by :mod:`.recipe` for recipe files and command-line overrides.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any

from .errors import RecipeError


class _Mismatch(Exception):
    pass


_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float32": "float32", "fp32": "float32",
           "float16": "float16", "fp16": "float16", "float64": "float64"}


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` converted to annotation ``tp``, or _Mismatch. Unknown annotations pass."""
    import torch

    if tp is Any or isinstance(tp, (str, typing.ForwardRef, typing.TypeVar)):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args:
            return value
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 5e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is torch.dtype:
        if isinstance(value, torch.dtype):
            return value
        if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
            return getattr(torch, _DTYPES[value.removeprefix("torch.")])
        raise _Mismatch
    if origin in (list, tuple, typing.List, typing.Tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            return tuple(value) if (origin or tp) is tuple else list(value)
        raise _Mismatch
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch
    if origin is not None and getattr(origin, "__name__", "") == "Callable" or tp is typing.Callable:
        raise _Mismatch  # functions cannot be written in YAML
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value in (member.name, member.value):
                return member
        raise _Mismatch
    if isinstance(tp, type) and tp.__module__ != "builtins" and not isinstance(value, tp):
        raise _Mismatch
    return value


def _annotation(obj: Any, name: str) -> Any:
    try:
        hints = typing.get_type_hints(type(obj))
    except Exception:  # unresolvable forward references in some Megatron classes
        hints = {f.name: f.type for f in dataclasses.fields(obj)}
    tp = hints.get(name, Any)
    if isinstance(tp, str):  # unresolved: fall back to the current value's type
        current = getattr(obj, name, None)
        tp = type(current) if current is not None else Any
    return tp


def _settable(obj: Any, name: str) -> bool:
    if name in {f.name for f in dataclasses.fields(obj)}:
        return True
    prop = getattr(type(obj), name, None)
    return isinstance(prop, property) and prop.fset is not None


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return str(tp).replace("typing.", "") if typing.get_origin(tp) else getattr(tp, "__name__", str(tp))


def _declared_default(obj: Any, name: str) -> Any:
    """The default a dataclass declares for field ``name`` (``dataclasses.MISSING`` if none)."""
    return next((f.default for f in dataclasses.fields(obj) if f.name == name), dataclasses.MISSING)


def set_key(cfg: Any, key: str, value: Any, source: str) -> None:
    """Set dotted ``key`` (``section.field[.field]``) of ``cfg`` to ``value``, checked.
    ``source`` names where the value came from (a file, or ``override 'k=v'``)."""
    parts = key.split(".")
    obj, path = cfg, []
    for i, part in enumerate(parts):
        path.append(part)
        dotted = ".".join(path)
        if part == "_target_":
            raise RecipeError(f"{source}: {dotted}: _target_ is not supported; the classes are fixed "
                              "(a Qwen3-style GPT provider, SSOOptimizerConfig, GPTDatasetConfig)")
        if not dataclasses.is_dataclass(obj) or not _settable(obj, part):
            what = type(obj).__name__
            raise RecipeError(f"{source}: unknown key '{dotted}' ({what} has no field '{part}')")
        current = getattr(obj, part)
        last = i == len(parts) - 1
        if not last:
            if current is None or not dataclasses.is_dataclass(current):
                raise RecipeError(f"{source}: '{dotted}' is not a section; cannot set '{key}'")
            obj = current
            continue
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            for sub, sub_value in value.items():
                set_key(cfg, f"{key}.{sub}", sub_value, source)
            return
        if dataclasses.is_dataclass(current):
            raise RecipeError(f"{source}: '{key}' is a section; give it a mapping, not {value!r}")
        tp = _annotation(obj, part)
        try:
            try:
                value = _coerce(value, tp)
            except _Mismatch:
                # a few Megatron annotations are wrong: Qwen3's ``init_method_std: int = 0.02`` (the type
                # of the class's own default value is accepted too) and megatron-core 0.19's tokenizer
                # ``vocab_size: int = None`` (Bridge 0.6; null is accepted where the declared default is None)
                if value is None and _declared_default(obj, part) is None:
                    pass
                elif current is None or type(current) not in (int, float, str, bool):
                    raise
                else:
                    value = _coerce(value, type(current))
        except _Mismatch:
            raise RecipeError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r} "
                              f"({type(value).__name__})") from None
        setattr(obj, part, value)
