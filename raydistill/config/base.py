"""The config machinery every command shares: strict models, one-line errors, YAML files and ``--set``.

Every model forbids unknown keys, so a typo in a config file is an error that names the key
instead of a setting silently ignored. Sections (``sections.py``) are mixins: a job config is
the union of the sections it needs, and :meth:`Strict.section` hands any one of them to a
worker or a hash as it is, so no setting is ever copied by hand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from raydistill.errors import ConfigError

__all__ = ["CountOrAuto", "Strict", "WorkerSettings", "build_config", "format_validation_error", "load_config",
           "parse_override"]

S = TypeVar("S", bound="Strict")
M = TypeVar("M", bound=BaseModel)


def _count_or_auto(v: Any) -> Any:
    """A whole number >= 1 (not a bool) or 'auto': counts that the cluster can also decide."""
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"must be a whole number >= 1 or 'auto', got {v!r}")


CountOrAuto = Annotated[int | Literal["auto"], BeforeValidator(_count_or_auto)]


class Strict(BaseModel):
    """A config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def section(self, cls: type[S], **extra: Any) -> S:
        """The ``cls`` section of this config (every field of ``cls`` this config has), plus ``extra``.

        Job configs inherit their sections, so this is how a driver hands a worker, a plan hash
        or a manifest exactly the settings one section declares, without naming any of them.
        """
        mine = self.model_dump(include=set(cls.model_fields) & set(type(self).model_fields))
        return cls.model_validate({**mine, **extra})


class WorkerSettings(Strict):
    """What a driver ships to its workers: invalid values fail as one ConfigError line, also outside a CLI
    (benchmarks and tests build these directly)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="wrap")
    @classmethod
    def _one_line(cls, data: Any, handler):
        try:
            return handler(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"for {cls.__name__}")) from None


def format_validation_error(err: ValidationError, where: str) -> str:
    """Turn pydantic's multi-line report into one line naming each bad field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        else:
            parts.append(f"'{loc}': {e['msg']}")
    return f"invalid config {where}: " + "; ".join(parts)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is read as YAML so numbers, bools and lists work, and a value
    YAML cannot read (``*.jsonl``, ``a: b: c``, ``[1,``) is taken as the plain string it is."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. --set k=32)")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override '{item}' needs a key before '=' (e.g. --set k=32 or --set corpus.source=DIR)")
    if raw == "":
        return path, ""
    try:
        return path, yaml.safe_load(raw)
    except yaml.YAMLError:
        return path, raw


def build_config(model: type[M], data: dict[str, Any], where: str, overrides: list[str] = ()) -> M:
    """``model`` from ``data`` with ``--set`` overrides applied; every problem is one ConfigError line."""
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{key}' is not a section")
        node[path[-1]] = value
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] = ()) -> M:
    """Load a YAML config file into ``model``; every problem becomes one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return build_config(model, data, f"in {path}", overrides)
