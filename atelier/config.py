"""Typed configs: defaults < YAML file < command-line overrides, unknown keys rejected.

Every unit of work (indexing, a training stage, the router) has one pydantic model whose
fields carry help text. `load_config` reads a YAML file into it and applies overrides
given as dotted keys (`fusion.alpha=0.3`), so there is one source of defaults.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from atelier.errors import AtelierError

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for configs: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def retire_key(data: Any, key: str, why: str, into: str | None = None) -> Any:
    """An older config's `key`, for a `mode="before"` validator: dropped with a warning saying `why`, or with
    `into` moved into that section (where a value already set there wins). Configs that lack it pass unchanged."""
    if not isinstance(data, dict) or key not in data:
        return data
    logging.getLogger(__name__).warning(why)
    rest = {k: v for k, v in data.items() if k != key}
    return rest if into is None else {**rest, into: {key: data[key], **dict(data.get(into) or {})}}


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


# ----------------------------------------------------------------------------- the CLI, derived from the config


def config_field(cls: type[BaseModel], dotted: str) -> tuple[FieldInfo, Any]:
    """The field `dotted` ("fusion.alpha") of `cls` and its default value, as the sections' own defaults set it
    (None below a section that defaults to None, such as `teacher.name`)."""
    model: type[BaseModel] | None = cls
    value: Any = PydanticUndefined  # the default of the field walked so far, when its section gave one
    info = None
    for key in dotted.split("."):
        if model is None or key not in model.model_fields:
            raise KeyError(f"{cls.__name__} has no field {dotted!r}")
        info = model.model_fields[key]
        if isinstance(value, BaseModel):
            value = getattr(value, key)
        elif value is not None:
            value = _default(info)
        model = _model_of(info.annotation)
    assert info is not None
    if not info.description:
        raise ValueError(f"{cls.__name__}.{dotted} has no description: give it Field(description=...)")
    return info, value


def _default(info: FieldInfo) -> Any:
    """A field's default; undefined when it has none or building it fails (a malformed $ELASTICSEARCH_URL:
    the command that uses it says so, `atelier --help` must not)."""
    try:
        return info.get_default(call_default_factory=True)
    except (ValidationError, ValueError):
        return PydanticUndefined


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config class an annotation holds (`X`, `X | None`), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _choices(annotation: Any) -> list[str]:
    """The allowed values of an Enum or Literal annotation (also inside `| None` or a list); else []."""
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return [str(member.value) for member in annotation]
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    return next((found for arg in get_args(annotation) if (found := _choices(arg))), [])


def shown_value(value: Any) -> str:
    """A config value as the command line writes it: enums by value, lists comma-separated, None as none."""
    if value is None:
        return "none"
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, list | tuple):
        return ",".join(shown_value(v) for v in value)
    return str(value)


def config_option(cls: type[BaseModel], dotted: str, *names: str) -> Any:
    """A `typer.Option` for the config field `dotted` of `cls`, as instructlab's ConfigOption does.

    Its help is the field's description with the field's default and config key; its values are
    checked against the field's own type and constraints (comma-separated for a list), so a bad
    value names the flag. Its own default is None — an option left out changes nothing — so the
    precedence stays: defaults < --config FILE < command-line options (`load_config` ignores Nones).
    """
    import typer
    from pydantic import TypeAdapter
    from rich.markup import escape

    info, default = config_field(cls, dotted)
    choices = _choices(info.annotation)
    shown = "/" in names[0] and isinstance(default, bool)
    default_text = names[0].split("/")[0 if default else 1].lstrip("-") if shown else shown_value(default)
    help_text = escape(f"{info.description} [default: {default_text}; config: {dotted}]")
    if info.annotation is bool or get_args(info.annotation) == (bool, type(None)):
        return typer.Option(None, *names, help=help_text, show_default=False)
    adapter = TypeAdapter(Annotated[info.annotation, info])
    is_list = get_origin(info.annotation) is list

    def parse(text: str) -> Any:
        value: Any = [part.strip() for part in text.split(",") if part.strip()] if is_list else text
        try:
            return adapter.validate_python(value, strict=False)
        except ValidationError as exc:
            raise typer.BadParameter("; ".join(err["msg"] for err in exc.errors())) from None

    metavar = "|".join(choices) or _metavar(info.annotation)
    metavar = f"{metavar},..." if is_list else metavar
    return typer.Option(None, *names, help=help_text, show_default=False, parser=parse, metavar=metavar)


def _metavar(annotation: Any) -> str:
    kinds = {int: "INTEGER", float: "FLOAT", Path: "PATH"}
    return next((kinds[arg] for arg in (annotation, *get_args(annotation)) if arg in kinds), "TEXT")


def config_file_option(cls: type[BaseModel], shown_as: str | None = None) -> Any:
    """The `--config FILE` option of a command whose settings are a `cls`."""
    import typer

    example = f" (`atelier config show {shown_as}` prints every field)" if shown_as else ""
    return typer.Option(
        None,
        "--config",
        help=f"YAML file with a {cls.__name__}{example}; command-line options override it.",
        show_default=False,
    )


# ----------------------------------------------------------------------------- the config, written out


def config_yaml(config: BaseModel, header: str = "") -> str:
    """`config` as YAML that `load_config` reads back: each field's description as a comment above
    it, sections as nested mappings.

    A field whose default comes from the environment (`json_schema_extra={"env": NAME}`) is written
    commented out, so that a copy of the file does not pin it, and a secret is never written; the
    fields a class lists in `derived_fields` follow another field and are left out.
    """
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    _emit(config, lines, 0, "", set(getattr(type(config), "derived_fields", ())))
    return "\n".join(lines) + "\n"


def _emit(model: BaseModel, lines: list[str], indent: int, path: str, skip: set[str]) -> None:
    import textwrap

    pad = " " * indent
    for name, info in type(model).model_fields.items():
        if f"{path}{name}" in skip:
            continue
        if indent == 0 and lines:
            lines.append("")
        lines.extend(
            f"{pad}# {text}"
            for text in textwrap.wrap(info.description or "", width=110 - indent, break_on_hyphens=False)
        )
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{pad}{name}:")
            _emit(value, lines, indent + 2, f"{path}{name}.", skip)
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        rendered = _yaml_value(None if isinstance(value, SecretStr) else value, pad)
        if extra.get("env"):
            lines.append(f"{pad}# {name}: {rendered}  (from ${extra['env']} when it is set)")
        else:
            lines.append(f"{pad}{name}:{'' if rendered.startswith(chr(10)) else ' '}{rendered}")


def _yaml_value(value: Any, pad: str) -> str:
    """One value in YAML flow style; a long list as a block of items below its key."""
    import yaml
    from pydantic_core import to_jsonable_python

    def flow(item: Any) -> str:
        text = yaml.safe_dump(to_jsonable_python(item), default_flow_style=True, width=10**9, allow_unicode=True)
        return text.strip().removesuffix("\n...")

    rendered = flow(value)
    if isinstance(value, list | tuple) and len(rendered) > 80:
        return "".join(f"\n{pad}  - {flow(item)}" for item in value)
    return rendered
