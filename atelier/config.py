"""Typed configs: defaults < YAML file < command-line overrides, unknown keys rejected.

Every unit of work (indexing, a training stage, the router) has one pydantic model whose
fields carry help text. `load_config` reads a YAML file into it and applies overrides
given as dotted keys (`fusion.alpha=0.3`), so there is one source of defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from atelier.errors import AtelierError

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise AtelierError(f"config override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(cls: type[C], path: Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build `cls` from an optional YAML file plus dotted-key overrides (None values ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise AtelierError(f"config file {path} not found; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise AtelierError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise AtelierError(f"config file {path} must hold a mapping of keys to values")
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, key, value)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()
        )
        where = f" in {path}" if path else ""
        raise AtelierError(f"invalid {cls.__name__}{where}: {problems}") from None
