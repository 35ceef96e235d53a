"""One typed options model per command, built from flags and files by one mechanism.

Every command declares a pydantic model (:class:`CommandOptions`); its fields *are* the
command's flags (``--max_new_tokens`` and ``--max-new-tokens``) and, for the noising commands,
the keys of the YAML config. :func:`add_flags` turns a model into argparse flags and
:func:`parse_flags` turns what was typed back into field values, by the field's type:

- a string option takes the string as typed (``--system_prompt "a, b"`` stays ``"a, b"``);
- a list option takes one value or several separated by commas (``--noise_norms 4`` is
  ``[4.0]``; ``[0, 4]`` in YAML syntax works too); duplicates are rejected;
- a yes/no option is a switch (``--skip-existing``) that also takes ``true``/``false``;
- numbers are checked by the model (``--batch_size x`` is a one-line error).

The resolved model is what the command runs with, and what it writes next to its outputs.
"""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from residlab.errors import UsageError

__all__ = [
    "DTYPE_ALIASES",
    "CommandOptions",
    "DType",
    "StorageDType",
    "add_flags",
    "explain",
    "flag_values",
    "normalize_dtype",
    "option",
    "validate",
]

# The names people type for each dtype; "auto" keeps the checkpoint's own dtype.
DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "auto": "auto",
}


def normalize_dtype(value: Any) -> Any:
    """``bfloat16`` -> ``bf16``, ``half`` -> ``fp16``, ... (other values are left for the
    ``Literal`` check to reject with the list of choices)."""
    if isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        return DTYPE_ALIASES.get(key, value)
    return value


DType = Annotated[Literal["bf16", "fp16", "fp32", "auto"], BeforeValidator(normalize_dtype)]
# Storage of saved tensors: a concrete dtype (no "auto").
StorageDType = Annotated[Literal["bf16", "fp16", "fp32"], BeforeValidator(normalize_dtype)]


def option(default: Any = None, help: str = "", *, flags: tuple[str, ...] = (),
           positional: bool = False, cli: bool = True, **kwargs: Any) -> Any:
    """A field with command-line metadata: extra flag spellings, positional, or file-only."""
    extra = {"flags": list(flags), "positional": positional, "cli": cli}
    return Field(default, description=help, json_schema_extra=extra, **kwargs)


class CommandOptions(BaseModel):
    """Base of every command's options: unknown keys are errors, lists hold no duplicates."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Commands that also read a YAML config (the noising runner) name its model here; its keys
    # become flags too, and ``from_flags`` merges file and flags into one validated object.
    settings_model: ClassVar[type[BaseModel] | None] = None

    @classmethod
    def from_flags(cls, namespace: argparse.Namespace):
        """The options as typed on the command line, validated."""
        return validate(cls, flag_values(cls, namespace))

    def record(self) -> dict[str, Any]:
        """The resolved options as JSON-able data, for the files written next to outputs."""
        return self.model_dump(mode="json", exclude_none=False)

    @model_validator(mode="after")
    def _no_duplicates(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, list):
                seen: list = []
                for item in value:
                    if item in seen:
                        raise ValueError(f"{name} lists {item!r} twice; give each value once")
                    seen.append(item)
        return self


# --- from a model to flags -------------------------------------------------------------------

def _kind(annotation: Any) -> str:
    """``bool``, ``list`` or ``scalar`` for a field annotation (Optional and Annotated seen
    through)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _kind(get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        kinds = {_kind(arg) for arg in get_args(annotation) if arg is not type(None)}
        return kinds.pop() if len(kinds) == 1 else "scalar"
    if annotation is bool:
        return "bool"
    if origin in (list, tuple, set) or annotation in (list, tuple, set):
        return "list"
    return "scalar"


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return (f"{text} (required)" if text else "required").replace("%", "%%")
    default = field.get_default(call_default_factory=True)
    if default not in (None, False, "", []) and "default" not in text:
        text = f"{text} (default: {default})" if text else f"default: {default}"
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *,
              group_title: str | None = None) -> None:
    """One flag per field of ``model`` (``--a_b`` and ``--a-b``); values stay strings here and
    are converted by :func:`flag_values` so that one mechanism serves flags and files."""
    target = parser.add_argument_group(group_title) if group_title else parser
    for name, field in model.model_fields.items():
        extra = _extra(field)
        if not extra.get("cli", True):
            continue
        if extra.get("positional"):
            target.add_argument(name, nargs=None if field.is_required() else "?",
                                help=_help(field))
            continue
        spellings = [f"--{name}", f"--{name.replace('_', '-')}", *extra.get("flags", [])]
        flags = sorted(dict.fromkeys(spellings), key=len)
        if _kind(field.annotation) == "bool":
            target.add_argument(*flags, dest=name, nargs="?", const="true", default=None,
                                metavar="BOOL", help=_help(field))
        else:
            target.add_argument(*flags, dest=name, default=None,
                                metavar="LIST" if _kind(field.annotation) == "list" else "V",
                                help=_help(field))


def _list_value(text: str) -> list[Any]:
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            value = yaml.safe_load(stripped)
        except yaml.YAMLError:
            raise UsageError(f"cannot read the list {text!r}; write e.g. 0,4,16") from None
        return value if isinstance(value, list) else [value]
    return [part.strip() for part in stripped.split(",") if part.strip()]


def _bool_value(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise UsageError(f"--{name} takes true or false, not {text!r}")


def flag_values(model: type[BaseModel], namespace: argparse.Namespace | Mapping[str, Any]
                ) -> dict[str, Any]:
    """The fields given on the command line, converted by the field's kind."""
    given = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    values: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        raw = given.get(name)
        if raw is None:
            continue
        kind = _kind(field.annotation)
        if kind == "list" and isinstance(raw, str):
            values[name] = _list_value(raw)
        elif kind == "bool" and isinstance(raw, str):
            values[name] = _bool_value(name, raw)
        else:
            values[name] = raw
    return values


# --- validation with one-line messages -------------------------------------------------------

def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """The model class inside an annotation (``Variant``, ``dict[str, Variant]``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _section_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys valid where an unknown key sits: a typo inside ``model_variants.base`` gets
    the keys of a variant, not those of the top level."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:  # a dict key or list index: still the same kind of section
            continue
        current = _inner_model(field.annotation) or current
    return list(current.model_fields)


def explain(error: ValidationError, model: type[BaseModel], *, what: str = "config key") -> str:
    """One line for the first problem; an unknown key gets the closest valid key of its own
    section (a typo usually explains the "required" error next to it: reported first)."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    where = ".".join(str(part) for part in loc)
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _section_fields(model, loc), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {what} {where!r}{hint}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "literal_error" or first["type"].endswith("_parsing"):
        message = f"{message}, not {first.get('input')!r}"
    if what == "option" and loc:  # flags are spelled as typed: --max-new-tokens
        flag = f"--{str(loc[0]).replace('_', '-')}"
        return f"{flag} is required" if first["type"] == "missing" else f"{flag}: {message}"
    return f"{what} {where!r}: {message}" if where else f"{message}"


def validate(model: type[BaseModel], values: Mapping[str, Any], *, what: str = "option"):
    """``model(**values)`` with a :class:`UsageError` of one line on failure."""
    try:
        return model(**values)
    except ValidationError as error:
        raise UsageError(explain(error, model, what=what)) from None
