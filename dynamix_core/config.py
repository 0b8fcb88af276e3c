"""Typed configuration: dataclass trees loaded from YAML with dotted command-line overrides.

Every component owns a small ``@dataclass(kw_only=True)`` config next to the code it builds.
A field's ``metadata={"help": ...}`` is its one-line description (it doubles as CLI help).
Cross-field checks live in ``__post_init__`` and raise :class:`ConfigError` naming the field.

    cfg = load_config(TrainConfig, "recipes/dynamix_demo.yaml", ["run.max_steps=500"])

Unknown keys are rejected with the list of valid ones and the closest real keys; values are
type-checked and coerced (``int`` from ``"3"``, tuples from lists), so a typo never silently falls
back to a default. An error names where the bad value came from: the ``--set`` override that gave
it, else the recipe file.

String values (of a recipe and of ``--set`` overrides alike) may name environment variables:
``${NAME}`` or ``${NAME:-default}`` (the default when NAME is unset or empty), replaced when the
config is built (:func:`from_dict`, so :func:`load_config` and every other loader), after the
overrides are applied: an override replaces a value before its variables are looked up. Production
recipes put their paths under ``${DYNAMIX_STORAGE_URI}``, the deployment's storage root. Only
``${...}`` is special: a lone ``$`` stays as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent. ``key`` is the
    dotted key at fault when one is (``run.max_steps``), so the error can name who set it."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key


#: ``${NAME}`` or ``${NAME:-default}``
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
#: where a variable comes from, for the error when it is missing
ENV_HINTS = {"DYNAMIX_STORAGE_URI": "the Helm chart sets it from storage.uri on every Ray pod"}


def expand_env(node: Any, where: str = "") -> Any:
    """``node`` with ``${NAME}`` / ``${NAME:-default}`` in every string (recursively in mappings and
    lists) replaced from ``os.environ``; an unset or empty variable without a default raises a
    :class:`ConfigError` naming the field (``where``, e.g. ``data.multi[0]``) and the fix."""
    if isinstance(node, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(expand_env(v, f"{where}[{i}]") for i, v in enumerate(node))
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, default = match.groups()
        value = os.environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        origin = f" ({ENV_HINTS[name]})" if name in ENV_HINTS else ""
        raise ConfigError(f"{where or 'value'}: ${{{name}}} is unset or empty; set {name}{origin}, "
                          f"or give a default as ${{{name}:-DEFAULT}}, or edit the path/value", key=where or None)

    return _ENV_REF.sub(substitute, node)


def field(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          min: float | None = None):
    """A dataclass field with a one-line ``help`` (shown by ``--help`` and in config dumps) and, for a
    number, its smallest valid value ``min`` (checked when the config is loaded, naming the key)."""
    kw: dict[str, Any] = {"metadata": {"help": help} if min is None else {"help": help, "min": min}}
    if default_factory is not dataclasses.MISSING:
        kw["default_factory"] = default_factory
    elif default is not dataclasses.MISSING:
        kw["default"] = default
    return dataclasses.field(**kw)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, where): _coerce(v, vtp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a plain mapping, rejecting unknown keys; ``${NAME}`` references
    in its strings are expanded first (:func:`expand_env`)."""
    return _build(cls, expand_env(data, prefix), prefix)


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = prefix or cls.__name__
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}",
                          key=f"{prefix}.{unknown[0]}" if prefix else str(unknown[0]))
    kwargs = {}
    for name, value in data.items():
        where = f"{prefix}.{name}" if prefix else name
        try:
            kwargs[name] = _coerce(value, hints[name], where)
        except ConfigError as exc:
            if exc.key is None:  # the innermost field names the key
                exc.key = where
            raise
        _check_min(fields[name], kwargs[name], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _check_min(f: dataclasses.Field, value: Any, where: str) -> None:
    low = f.metadata.get("min")
    if low is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
        raise ConfigError(f"{where}: {value} must be >= {low:g}", key=where)


def to_dict(cfg: Any) -> Any:
    """Plain (YAML/JSON-serialisable) form of a config tree."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def close_keys(cls: type, key: str, limit: int = 3) -> list[str]:
    """The real dotted keys of ``cls`` closest to ``key``: the most similar spelling, then the keys of
    the same name in other sections (``loss_mode`` -> ``centroids.loss_mode``)."""
    keys = [k for k, _, _ in field_help(cls)]
    last = key.rsplit(".", 1)[-1]
    similar = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last and k != key]
    return list(dict.fromkeys(similar + same_name))[:limit]


def _did_you_mean(keys: list[str]) -> str:
    return f"did you mean {' or '.join(keys)}? " if keys else ""


def _example(cls: type, data: dict[str, Any], key: str) -> str:
    """``KEY=VALUE`` for a real key of ``cls`` (``key`` itself when it is one, else the closest one,
    else the first), with the value ``data`` gives it or its default: an override that works."""
    rows = {k: default for k, _, default in field_help(cls)}
    name = key if key in rows else next(iter(close_keys(cls, key, 1) or rows))
    node: Any = data
    for part in name.split("."):
        node = node.get(part, dataclasses.MISSING) if isinstance(node, dict) else dataclasses.MISSING
    value = rows[name] if node is dataclasses.MISSING else node
    return f"{name}={_flow(to_dict(value))}"


def apply_override(data: dict[str, Any], override: str, cls: type | None = None, source: str = "--set") -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3``, ``[1,2]``).
    Errors start with ``source`` and the override (``--set run.max_step=5: ...``) and, given ``cls``,
    name the closest real keys."""
    where_from = f"{source} {override}"
    if "=" not in override:
        example = f", e.g. {source} {_example(cls, data, override.strip())}" if cls is not None else ""
        raise ConfigError(f"{where_from}: expected KEY=VALUE{example}")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{where_from}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where_from}: the value is not valid YAML ({problem}); quote a string that holds "
                          f"YAML punctuation, e.g. {key}='\"...\"'", key=key.strip()) from None
    node = data
    node_cls = cls
    for depth, part in enumerate(parts):
        if node_cls is not None:
            names = {f.name for f in dataclasses.fields(node_cls)}
            if part not in names:
                where = ".".join(parts[:depth]) or node_cls.__name__
                raise ConfigError(f"{where_from}: {where} has no key {part!r}; "
                                  f"{_did_you_mean(close_keys(cls, key.strip()))}valid keys are {sorted(names)}")
            node_cls = _section_class(typing.get_type_hints(node_cls)[part])
        if depth == len(parts) - 1:
            node[part] = value
        else:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load ``cls`` from a YAML file (optional) plus dotted overrides, validated and typed."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = load_yaml_file(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    given: dict[str, str] = {}  # key -> the override that set it last
    for ov in overrides:
        apply_override(data, ov, cls)
        given[ov.split("=", 1)[0].strip()] = ov
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        culprit = _override_of(exc.key, given)
        if culprit is not None:
            raise ConfigError(f"--set {culprit}: {exc}", key=exc.key) from None
        if path is not None:
            raise ConfigError(f"{path}: {exc}", key=exc.key) from None
        raise


def load_yaml_file(path: str | Path) -> Any:
    """The YAML document of ``path`` (None read as ``{}``); a file that does not parse is a
    :class:`ConfigError` in one line naming the file, the line and column, and the problem."""
    text = Path(path).read_text()
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem}); fix the file there") from None


def _override_of(key: str | None, given: dict[str, str]) -> str | None:
    """The override behind the value at ``key`` (``data.multi[0]`` is set by ``data.multi=...`` and by
    ``data=...``), or None when the value came from the file."""
    while key:
        if key in given:
            return given[key]
        key = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", key) if re.search(r"[.\[]", key) else ""
    return None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _section_class(tp: Any) -> type | None:
    """The dataclass of a field typed ``SomeConfig`` or ``SomeConfig | None``, else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def field_help(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """Flattened ``(dotted.key, help, default)`` rows of a config tree, for ``--help`` output.
    Optional sections (``SomeConfig | None``) are listed with their keys."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        section = _section_class(hints[f.name])
        if section is not None:
            rows.extend(field_help(section, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>"
        )
        rows.append((key, f.metadata.get("help", ""), default))
    return rows


def format_field_help(cls: type, section: str = "") -> str:
    """The keys of ``cls`` under ``section`` (a dotted prefix; "" = all), one per line with its default
    and help; a :class:`ConfigError` listing the sections when ``section`` matches no key."""
    rows = [r for r in field_help(cls) if not section or r[0] == section or r[0].startswith(section + ".")]
    if not rows:
        sections = sorted({key.split(".")[0] for key, _, _ in field_help(cls)})
        raise ConfigError(f"no config key under {section!r}; sections are {sections}")
    width = max(len(key) for key, _, _ in rows)
    return "\n".join(f"{key:<{width}}  {_flow(to_dict(default))}  # {help}" for key, help, default in rows)


def _flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
    return text[:-3].strip() if text.endswith("...") else text


def dump_yaml_with_help(cfg: Any, indent: int = 0) -> str:
    """``cfg`` as YAML with each key's help as a comment beside it; loads back to ``to_dict(cfg)``."""
    lines, pad = [], " " * indent
    for f in dataclasses.fields(cfg):
        value, help = getattr(cfg, f.name), f.metadata.get("help", "")
        comment = f"  # {help}" if help else ""
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:{comment}")
            lines.append(dump_yaml_with_help(value, indent + 2))
        else:
            lines.append(f"{pad}{f.name}: {_flow(to_dict(value))}{comment}")
    return "\n".join(lines)
