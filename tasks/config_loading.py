"""Reading a run config: YAML, its scale overlay, `--set` overrides, and validation by the
schema its `graph:` names (`tasks.config`), every error one line naming the key and where
it was set (the file, or the `--set` that set it)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from tasks.config import SCALES, ConfigError, RunConfig, schemas

def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"{origin}: {dotted!r} is not a key; expected e.g. train.steps")
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def _unwrap(annotation) -> tuple[Any, dict[str, type]]:
    """A field's model class (through Optional, list and Annotated), or the members of a
    discriminated union by tag."""
    while get_origin(annotation) in (Annotated, list, Union):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Union and len(args) > 1:
            return None, {tag: m for m in args for tag in get_args(m.model_fields["scheduler"].annotation)}
        annotation = args[0]
    return annotation, {}


def _walk(schema: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """The config class that owns the last key of an error's `loc`, and the location as the
    user wrote it (pydantic inserts a union member's tag, e.g. path.vp.beta_min)."""
    owner, where, i = schema, [], 0
    while i < len(loc):
        part = loc[i]
        where.append(str(part))
        i += 1
        if isinstance(part, int) or owner is None:
            continue
        field = owner.model_fields.get(part)
        if field is None:
            break
        current, tags = _unwrap(field.annotation)
        if tags and i < len(loc) and loc[i] in tags:
            current, i = tags[loc[i]], i + 1
        owner = current if isinstance(current, type) and issubclass(current, BaseModel) else None
    return owner, where


def _format_error(err: ValidationError, schema: type[BaseModel]) -> str:
    first = err.errors()[0]
    owner, parts = _walk(schema, tuple(first["loc"]))
    where = ".".join(parts) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        valid = f"; valid keys: {', '.join(owner.model_fields)}" if owner else ""
        return f"{where}: unknown key{valid}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    if first["type"] == "union_tag_invalid":
        tags = first["ctx"]["expected_tags"]
        return f"{where}.{first['ctx']['discriminator'].strip(chr(39))}: got {first['ctx']['tag']!r}; expected one of {tags}"
    if first["type"].startswith("value_error"):
        if where == "config" or re.match(rf"{re.escape(where)}[.:]", msg):
            return msg  # the message names its full key already
        if re.match(r"[\w.]+: ", msg):
            return f"{where}.{msg}"  # it names a key under `where`
        return f"{where}: {msg}"
    return f"{where}: got {first['input']!r}; {msg[0].lower()}{msg[1:]}"


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def find_config(graph: str, name: str) -> Path | None:
    """A config by path, or by name under configs/ (with or without `.yaml`, or the graph's folder)."""
    for path in (Path(name), CONFIGS / name, CONFIGS / f"{name}.yaml", CONFIGS / graph / f"{name}.yaml"):
        if path.is_file():
            return path
    return None


def load_config(path: str | Path, scale: str = "cpu", overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply the scale overlay then `--set` overrides, validate with the
    schema of its graph."""
    path = Path(path)
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    tree = copy.deepcopy(raw)
    scales = tree.pop("scales", {}) or {}
    if not isinstance(scales, dict) or not all(isinstance(v, dict) or v is None for v in scales.values()):
        raise ConfigError(f"{path}: scales: expected a mapping of scale name -> {{dotted.key: value}}")
    unknown = set(scales) - set(SCALES)
    if unknown:
        raise ConfigError(f"{path}: scales.{sorted(unknown)[0]}: unknown scale; expected one of {', '.join(SCALES)}")
    for key, value in (scales.get(scale) or {}).items():
        _set_dotted(tree, str(key), value, f"{path}: scales.{scale}")
    apply_overrides(tree, overrides)
    return validate(tree, str(path), overrides)


def apply_overrides(tree: dict, overrides: list[str]) -> None:
    """Apply `--set key.sub=value` items to a config tree, in order."""
    for item in overrides:
        _set_dotted(tree, *parse_override(item), origin=f"--set {item!r}")


def validate(tree: dict, origin: str, overrides: list[str] = (), family: str | None = None) -> RunConfig:
    """Validate a config tree with the schema its `graph:` names; errors name `origin` (the
    file), or the `--set` that set the offending key. A stage's config (`RunConfig.stage`) is
    validated with the `family` of the model it trains: its sampler grid runs on that model."""
    known = schemas()
    graph = tree.get("graph")
    if graph not in known:
        what = "required key is missing" if graph is None else f"got {graph!r}"
        raise ConfigError(f"{origin}: graph: {what}; expected one of {', '.join(sorted(known))}")
    schema = known[graph]
    try:
        return schema.model_validate(tree, context={"family": family})
    except ValidationError as e:
        raise blame(_format_error(e, schema), origin, overrides) from None


def blame(message: str, origin: str, overrides: Sequence[str] = ()) -> ConfigError:
    """A one-line error about the key `message` starts with, naming where that key was set: the
    last `--set` of it (or of a section holding it, or of a key inside it), else `origin`."""
    key = message.split(":")[0]

    def sets_it(item: str) -> bool:
        dotted = item.split("=", 1)[0].strip()
        return bool(dotted) and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."))

    blamed = [item for item in overrides if sets_it(item)]
    return ConfigError(f"--set {blamed[-1]!r}: {message}" if blamed else f"{origin}: {message}")
