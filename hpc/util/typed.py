"""Typed dataclasses from YAML files, ``key=value`` overrides and plain dicts: values are parsed by
the DECLARED TYPE of the field they land in, and unknown keys, wrong types and impossible values
become ``ValueError`` naming the field and what is valid.

YAML 1.1 (PyYAML's ``safe_load``) guesses a type from the text alone, so ``1e-3`` was a string,
``no`` a boolean, ``007`` the integer 7 and ``2024-01-01`` a date. Here ``load_yaml`` reads every
unquoted scalar as ``Raw`` (its text, as written) and ``_coerce`` parses a Raw by the field's type:
``1e-3`` for a float field is 0.001, for a str field the string ``"1e-3"``; ``yes`` is true only
for a bool field. Quoted scalars are plain ``str``: always strings. Where no type is declared (a
free ``dict``) a Raw is read by the YAML 1.2 core schema (``resolve_untyped``); an ``Any`` field
keeps its Raw values for the owner's ``check`` to parse with its own dataclass (``model.config``
and the model family's config). A parsed dataclass holds no Raw: ``to_dict`` writes real values.

It lives here rather than in ``hpc.train`` because model families declare their own config
dataclasses and ``hpc.models`` must not import the trainer; ``hpc.train.config`` and
``hpc.ensemble.spec`` reuse it. A dataclass may define ``check(self, where)`` for value
constraints (called after parsing).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class Raw(str):
    """An unquoted scalar as the user wrote it (YAML file or override), not yet given a type."""

    __slots__ = ()


_RAW_TAG = "tag:hpc,2024:raw"
_MISSING = object()  # a parser's "does not read as this type"

# YAML 1.2 core schema (https://yaml.org/spec/1.2.2/#1032-tag-resolution), for untyped values.
_NULL = frozenset({"", "~", "null", "Null", "NULL"})
_CORE_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
# Anchored with \Z because PyYAML's resolvers (_Dumper) use re.match.
_CORE_INT = re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
_CORE_FLOAT = re.compile(r"(?:[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN))\Z")
# Typed fields also take Python's spellings: digit groups (1_000), inf/nan without the dot.
_INT = re.compile(r"[-+]?[0-9]+(_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+")
_DIGITS = r"[0-9]+(_[0-9]+)*"
_FLOAT = re.compile(rf"[-+]?(\.{_DIGITS}|{_DIGITS}(\.({_DIGITS})?)?)([eE][-+]?[0-9]+)?")
_FLOAT_SPECIAL = re.compile(r"([-+]?)\.?(inf|infinity|nan)", re.IGNORECASE)
_BOOL = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


# -- reading and writing YAML ---------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20     # a YAML config/spec file: at most 1 MiB, checked before reading it
MAX_YAML_NODES = 100_000       # nodes of a document with every alias expanded ("billion laughs")


def _expanded_nodes(root) -> int:
    """Nodes of the document with aliases expanded, without expanding them (memoized per node);
    stops counting past MAX_YAML_NODES. A recursive alias counts as too many."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            return MAX_YAML_NODES + 1
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_YAML_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_YAML_NODES:
                    break
        busy.discard(key)
        sizes[key] = total
        return total

    return size(root)


class _Loader(yaml.SafeLoader):
    """SafeLoader that gives every plain (unquoted, untagged) scalar the Raw tag instead of guessing
    its type; quoted and explicitly tagged (``!!str 5``, ``!!float 1``) scalars resolve as usual.
    A document that expands (aliases of anchors) to more than MAX_YAML_NODES nodes is refused
    before anything is constructed."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the document expands (through anchors/aliases) to more than "
                                 f"{MAX_YAML_NODES} nodes: refused")
        return node

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            return "tag:yaml.org,2002:merge" if value == "<<" else _RAW_TAG
        return super().resolve(kind, value, implicit)

    def construct_mapping(self, node, deep=False):
        # Keys are names, never typed values: plain str (a key 'no' or '1' stays that text).
        return {str(k) if isinstance(k, Raw) else k: v
                for k, v in super().construct_mapping(node, deep=deep).items()}


_Loader.add_constructor(_RAW_TAG, lambda loader, node: Raw(loader.construct_scalar(node)))


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings the YAML 1.2 core schema reads as numbers (``1e-3``,
    ``0o7``): PyYAML quotes only what YAML 1.1 would misread, and a dumped config must read back the
    same with ``load_yaml`` (untyped mappings), ``yaml.safe_load`` and other YAML 1.2 readers."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _CORE_FLOAT, list("-+.0123456789"))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:int", _CORE_INT, list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse YAML text; unquoted scalars come back as ``Raw`` (yaml.YAMLError when malformed)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping (empty file: {}); ValueError naming the file."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
                raise ValueError(f"{path}: {path.stat().st_size} bytes; a config file may have at most "
                                 f"{MAX_CONFIG_BYTES} bytes (1 MiB)")
            raw = fh.read(MAX_CONFIG_BYTES + 1)   # a pipe or a growing file: never more than the cap
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path}: more than {MAX_CONFIG_BYTES} bytes; a config file may have at most "
                             f"{MAX_CONFIG_BYTES} bytes (1 MiB)")
        data = load_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if data is None or (isinstance(data, Raw) and data in _NULL):
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of keys")
    return data


def parse_value(text: str) -> Any:
    """An override's value (the text after ``key=``): YAML flow syntax (``[a, b]``, ``{k: v}``,
    quotes) with unquoted scalars as Raw; text YAML cannot parse (``@x``) is Raw as it stands."""
    if text == "":
        return ""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return Raw(text)


def dump_yaml(data: Any) -> str:
    """YAML text of parsed values (no Raw: an unparsed value here is a bug, and PyYAML refuses it)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


# -- parsing Raw text -----------------------------------------------------------------------------

def _parse_int(s: str) -> Any:
    return int(s, 0 if s[:2] in ("0x", "0o") else 10) if _INT.fullmatch(s) else _MISSING


def _parse_float(s: str) -> Any:
    if _FLOAT.fullmatch(s):
        return float(s)
    m = _FLOAT_SPECIAL.fullmatch(s)
    return float(m.group(1) + m.group(2)) if m else _MISSING


def _parse_bool(s: str) -> Any:
    return _BOOL.get(s.lower(), _MISSING)


def resolve_untyped(value: Any) -> Any:
    """``value`` with every Raw read by the YAML 1.2 core schema (null, true/false, ints, floats
    incl. ``1e-3``; anything else stays text), for values no dataclass gives a type."""
    if isinstance(value, Raw):
        s = str(value)
        if s in _NULL:
            return None
        if s in _CORE_BOOL:
            return _CORE_BOOL[s]
        if _CORE_INT.fullmatch(s):
            return int(s, 0 if s[:2] in ("0x", "0o") else 10)
        if _CORE_FLOAT.fullmatch(s):
            return _parse_float(s.lower())
        return s
    if isinstance(value, (list, tuple)):
        return [resolve_untyped(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve_untyped(v) for k, v in value.items()}
    return value


# -- typed parsing --------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _union_order(arg: Any) -> int:
    # null first and str last: `str | None` reads `null` as None, and `dict | str | None` or
    # `bool | Literal[...]` try every other reading before the text itself.
    return 0 if arg is type(None) else 2 if arg is str else 1


def _scalar(value: Any, tp: type, parse, expected: str, where: str) -> Any:
    """A bool/int/float field: Raw text through ``parse``; otherwise the value must already be one."""
    if isinstance(value, Raw):
        parsed = parse(str(value))
        if parsed is not _MISSING:
            return parsed
    elif isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, str) and parse(value) is not _MISSING:
        raise ValueError(f"{where}: expected {expected}, got the quoted string {value!r} "
                         "(quoted values are strings: write it without quotes)")
    raise ValueError(f"{where}: expected {expected}, got {value!r}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value  # kept as given (Raw included): the owner's check() parses it with its own types
    if origin in (Union, types.UnionType):
        args = sorted(typing.get_args(tp), key=_union_order)
        errors = {}
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors[arg] = e
        # `X | None` given a non-null value: X's own error (e.g. the unknown key inside a section)
        # says more than "expected mapping | null".
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            raise errors[rest[0]]
        raise ValueError(f"{where}: {value!r} is not a valid value; expected {_type_name(tp)}")
    if tp is type(None):
        if value is None or (isinstance(value, Raw) and value in _NULL):
            return None
        raise ValueError(f"{where}: expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:  # Raw text matches a choice by its text, read as the choice's type
            try:
                if _coerce(value, type(choice), where) == choice:
                    return choice
            except ValueError:
                pass
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected {_type_name(tp)} (written [a, b]), got {value!r}")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [_coerce(v, args[0], f"{where}[{i}]") if args else resolve_untyped(v)
                 for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return resolve_untyped(dict(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        return _scalar(value, bool, _parse_bool, "true or false (or yes/no, 1/0)", where)
    if tp is int:
        return _scalar(value, int, _parse_int, "an integer", where)
    if tp is float:
        return _scalar(value, float, _parse_float, "a number", where)
    if tp is str:
        if isinstance(value, str):
            return str(value)  # a Raw's text as written: '007', '2024-01-01' and 'no' stay strings
        raise ValueError(f"{where}: expected a string, got {value!r}")
    raise AssertionError(f"unsupported config type {tp!r} at {where}")


# -- dataclasses ----------------------------------------------------------------------------------

def _init_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _section(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _closest(cls: type, key: str, dotted: str | None) -> str | None:
    """The valid key nearest to ``key``: a field of ``cls`` or, failing that, a field of one of its
    sections (``lr`` at the top level -> ``optim.lr``). ``dotted``: the override's key prefix, to
    name the suggestion as the user types it (``optim.lr``); None: a quoted key name (``'lr'``)."""
    names = _init_fields(cls)
    near = difflib.get_close_matches(key, names, n=1)
    if near:
        return f"{dotted}{near[0]}" if dotted is not None else repr(near[0])
    hints = typing.get_type_hints(cls)
    nested = sorted((sub, f"{n}.{sub}") for n in names if (sec := _section(hints[n])) is not None
                    for sub in _init_fields(sec))
    leaves = [leaf for leaf, _ in nested]
    near = [key] if key in leaves else difflib.get_close_matches(key, leaves, n=1)
    paths = [path for leaf, path in nested if near and leaf == near[0]]
    return f"{dotted or ''}{paths[0]}" if paths else None


def _unknown_keys(cls: type, unknown: list[str], where: str, override: str | None = None,
                  dotted: str | None = None) -> ValueError:
    """The one message for an unknown key, from a file (``from_dict``) or an override."""
    s = "s" if len(unknown) > 1 else ""
    msg = f"{where}: unknown key{s} {', '.join(repr(k) for k in unknown)}"
    if override is not None:
        msg += f" in override {override!r}"
    near = [(k, c) for k in unknown if (c := _closest(cls, k, dotted)) is not None]
    if near:
        msg += "; did you mean " + (near[0][1] if len(unknown) == 1 else
                                    ", ".join(f"{c} for {k!r}" for k, c in near)) + "?"
    return ValueError(f"{msg}{' ' if near else '; '}valid keys: {', '.join(sorted(_init_fields(cls)))}")


def check_override_key(cls: type, keys: list[str], override: str, where: str = "config") -> None:
    """Refuse a dotted override key that ``cls`` (or one of its sections) lacks, naming the full
    dotted key the user probably meant. Stops where a free mapping begins (``model.config``: the
    model family's dataclass checks those keys after parsing)."""
    tp: Any = cls
    for i, key in enumerate(keys):
        tp = _section(tp)
        if tp is None:
            return
        if key not in _init_fields(tp):
            prefix = "".join(f"{k}." for k in keys[:i])
            raise _unknown_keys(tp, [key], where + "".join(f".{k}" for k in keys[:i]), override, prefix)
        tp = typing.get_type_hints(tp)[key]


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping, or null for all defaults)."""
    if data is None or (isinstance(data, Raw) and data in _NULL):
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        data = to_dict(data)
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = _init_fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _unknown_keys(cls, unknown, where)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def parsed_mapping(given: dict, obj: Any) -> dict:
    """The keys of ``given`` (the mapping dataclass ``obj`` was parsed from) with their parsed
    values: what an ``Any`` field such as ``model.config`` keeps, dumps and hashes once its owner
    parsed it. An integer written for a float field stays an int, as YAML always read it, so the
    config hash of a run does not change (and `dropout: 0` stays 0 in summary.json)."""
    return {k: _parsed(v, getattr(obj, k)) for k, v in given.items()}


def _parsed(given: Any, parsed: Any) -> Any:
    if isinstance(given, Raw):
        core = resolve_untyped(given)
        return core if type(core) is int and type(parsed) is float and core == parsed else to_dict(parsed)
    if isinstance(given, dict) and dataclasses.is_dataclass(parsed):
        return parsed_mapping(given, parsed)
    if isinstance(given, dict) and isinstance(parsed, dict):
        return {k: _parsed(v, parsed[k]) for k, v in given.items()}
    if isinstance(given, (list, tuple)) and isinstance(parsed, (list, tuple)):
        return [_parsed(g, p) for g, p in zip(given, parsed)]
    return given  # a Python value the parse accepted: kept as given, as before


def to_dict(obj: Any) -> Any:
    """Plain dict of a dataclass (tuples as lists: what YAML and JSON write)."""
    assert not isinstance(obj, Raw), f"unparsed config value {obj!r}"  # parsing removes every Raw
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(cls: type) -> dict[str, str]:
    """Field name -> type description (for help text and error messages)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _type_name(hints[f.name]) for f in dataclasses.fields(cls)}


def require(cond: bool, where: str, msg: str) -> None:
    """A value constraint: raise ValueError naming the field when ``cond`` is false."""
    if not cond:
        raise ValueError(f"{where}: {msg}")
