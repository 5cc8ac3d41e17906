"""The base of every configuration model, and how its validation errors read: one line each.

    raise ValidationError.from_exception_data(title, [line_error(("beta_max",), "must be > beta_min", v)])
    problems = [describe_error(err, Params) for err in e.errors(include_url=False)]   # "dotted.location: message"

Kept apart from scorelab.config so that modules which define their own section (data, nets) can
import it without importing config, which imports them. describe_error follows a pydantic loc through
the model types from `root` (e.g. params.yaml's Params): pydantic's union tags and
schema labels are dropped, an unknown key is answered with the nearest valid one.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import types
import typing
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

MAX_LINE = 1000  # characters of one problem line (scorelab's own run to ~500): a hostile value must not flood a log
MAX_PROBLEMS = 50  # problem lines kept; the rest are counted


class StrictModel(BaseModel):
    """Unknown keys refused, and no number is infinite, NaN, or a YAML boolean read as 1 or 0."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        # pydantic's lax mode turns True into 1, and YAML 1.1 reads yes/no/on/off as booleans: `steps: yes`
        # would train one step. Refused before coercion, field by field (nested models check their own).
        if not isinstance(data, dict):
            return data
        errors = [line_error(loc, "must be a number, not a boolean (YAML reads yes, no, on, off, true and false "
                                  "as booleans)", _at(data, loc))
                  for key, field in cls.model_fields.items() if key in data
                  for loc in _bools_for_numbers(field.annotation, data[key], (key,))]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


def _at(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def _wants_number(tp: Any) -> bool:
    if tp in (int, float):
        return True
    if _is_union(tp):
        members = [_unwrap(a)[0] for a in typing.get_args(tp) if a is not type(None)]
        return bool(members) and all(_wants_number(m) for m in members)
    return False


def _bools_for_numbers(tp: Any, value: Any, loc: tuple) -> list[tuple]:
    """The locations under `loc` where `value` holds a bool that type `tp` would read as a number."""
    tp, _ = _unwrap(tp)
    if isinstance(value, bool):
        return [loc] if _wants_number(tp) else []
    if typing.get_origin(tp) in (list, tuple) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return [hit for i, v in enumerate(value) for hit in _bools_for_numbers(args[0] if args else Any, v, (*loc, i))]
    return []


def cut(text: str, limit: int = MAX_LINE) -> str:
    """text on one line of at most `limit` characters."""
    text = " ".join(text.split()) if "\n" in text or "\r" in text else text
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ConfigError(ValueError):
    """Invalid configuration; `.problems` holds every problem found, each "dotted.location: message"
    (each cut to MAX_LINE characters; past MAX_PROBLEMS, one last line counts the rest)."""

    def __init__(self, problems: list[str], source: str | None = None):
        problems = [cut(p) for p in problems]
        if len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problem(s)"]
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(f"{head}{len(self.problems)} problem(s)\n" + "\n".join(f"  {p}" for p in self.problems))


def line_error(loc: tuple[str | int, ...], message: str, value: Any, kind: str = "coupled_fields") -> InitErrorDetails:
    """One error at `loc` for a validator that checks several fields: raised together in a ValidationError,
    each keeps its own location. kind "described": `message` is complete (describe_error adds no "(got ...)")."""
    return InitErrorDetails(type=PydanticCustomError(kind, "{message}", {"message": message}), loc=loc, input=value)


# A pydantic schema label in a loc, e.g. "function-after[_check(), VPConfig]", "list[int]", "constrained-int".
_LABEL = re.compile(r"^[a-z][a-z-]*(\[.*\])?$")


def _unwrap(tp: Any, disc: str | None = None) -> tuple[Any, str | None]:
    """Strip Annotated and Optional around a type; also return a union discriminator found on the way."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp, *meta = typing.get_args(tp)
            disc = next((m.discriminator for m in meta if getattr(m, "discriminator", None)), disc)
            continue
        if _is_union(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp, disc


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tags(union: Any, field: str) -> dict[Any, type[BaseModel]]:
    """A discriminated union's members by their tag values."""
    tags = {}
    for member in typing.get_args(union):
        member, _ = _unwrap(member)
        if _is_model(member) and field in member.model_fields:
            tags.update(dict.fromkeys(typing.get_args(member.model_fields[field].annotation), member))
    return tags


def _walk(loc: tuple, root: type[BaseModel]) -> tuple[list[str], Any]:
    """Follow a pydantic loc through the type tree from `root`: the human path (union tags and schema labels
    dropped, dict keys and list indices kept) and the type found at its end (None if lost)."""
    parts: list[str] = []
    tp: Any = root
    disc: str | None = None
    for item in loc:
        tp, disc = _unwrap(tp, disc)
        origin = typing.get_origin(tp)
        if item == "[key]":  # the error is about the dict key just passed
            continue
        if origin is dict:
            parts.append(str(item))
            tp, disc = typing.get_args(tp)[1], None
        elif origin is list and isinstance(item, int):
            parts.append(str(item))
            tp, disc = typing.get_args(tp)[0], None
        elif _is_union(tp) and disc and item in _tags(tp, disc):
            tp, disc = _tags(tp, disc)[item], None  # pydantic's union tag, not a key the user wrote
        elif _is_model(tp) and item in tp.model_fields:
            parts.append(str(item))
            field = tp.model_fields[item]
            tp, disc = field.annotation, field.discriminator
        elif isinstance(item, str) and _LABEL.match(item) and ("[" in item or "-" in item):
            continue
        else:
            parts.append(str(item))
            tp, disc = None, None
    return parts, (_unwrap(tp)[0] if tp is not None else None)


def _suggest(word: Any, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(word), valid, n=1)
    return f"did you mean {close[0]!r}? " if close else ""


# reprlib bounds the depth and the items shown at each level, so a value that YAML aliases blew up to
# millions of nodes is shown in microseconds: repr() would first build all of it.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, 60, 40, 60
_REPR.maxtuple = _REPR.maxlist = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 4


def show(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: a bounded repr, at most `limit` characters."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# pydantic error type -> (its ctx key, the operator to show)
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def describe_error(err: dict, root: type[BaseModel]) -> str:
    """One line "dotted.location: message" for one pydantic error of the model `root` (e.g. config.Params)."""
    kind, loc, ctx, value = err["type"], tuple(err["loc"]), err.get("ctx") or {}, err.get("input")
    got = f" (got {show(value)})"

    if kind == "extra_forbidden":
        parts, owner = _walk(loc[:-1], root)
        key = loc[-1]
        where = ".".join([*parts, str(key)])
        if not _is_model(owner):
            return f"{where}: unknown key {show(key)}"
        valid = sorted(owner.model_fields)
        return f"{where}: unknown key {show(key)}; {_suggest(key, valid)}valid keys: {', '.join(valid)}"

    parts, tp = _walk(loc, root)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        field = ctx.get("discriminator", "type").strip("'")
        where = ".".join([*parts, field])
        valid = sorted(_tags(tp, field)) if _is_union(tp) else []
        if kind == "union_tag_not_found":
            return f"{where}: missing required key" + (f"; valid {field}s: {', '.join(valid)}" if valid else "")
        tag = ctx.get("tag")
        return f"{where}: unknown {field} {show(tag)}; {_suggest(tag, valid)}valid {field}s: {', '.join(valid)}"

    where = ".".join(parts) or "top level"
    if loc and loc[-1] == "[key]":  # a dict key, i.e. a variant name
        where = ".".join([*parts[:-1], cut(str(loc[-2]), 60)]) if len(loc) > 1 else where
        rule = (f"must match {ctx['pattern']}" if kind == "string_pattern_mismatch" else
                f"must be at most {ctx['max_length']} characters" if kind == "string_too_long" else pydantic_message(err))
        return f"{where}: invalid name {show(loc[-2])}; {rule}"
    if kind == "missing":
        return f"{where}: missing required key"
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx[key]
        return f"{where}: must be {op} {bound if isinstance(bound, int) else format(bound, 'g')}{got}"
    if kind == "too_short":
        return f"{where}: must have at least {ctx['min_length']} item(s){got}"
    if kind == "literal_error":
        valid = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        hint = _suggest(value, valid) if isinstance(value, str) else ""
        return f"{where}: must be one of {', '.join(valid)}{got}" + (f"; {hint.strip()}" if hint else "")
    if kind == "described":  # the message is complete as it is
        return f"{where}: {err['msg']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: must be a mapping{got}"
    return f"{where}: {pydantic_message(err)}{got}"


def pydantic_message(err: dict) -> str:
    """pydantic's own message of an error, without its "Value error, " prefixes and in this module's words."""
    msg = err["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg.replace("Input should be", "must be")
