"""What a config's validation errors say: one line per field naming what was given, what the field takes and a
value that works, as TOML and as --set (pydantic's own messages name the type, not the fix).

explain(err, source, ...) turns a pydantic ValidationError of a config (or of a Python call's arguments) into
the DDMError text; parse_value reads a --set value as the command line does, so a fix offered as --set reads back
as the value it names.
"""
from __future__ import annotations

import difflib
import json
import shlex
import sys
import types
import typing
import re
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_value(text: str) -> Any:
    """A command-line value: a TOML literal (300, 1e-3, true, "a", ["top-1", "full"], {width = 64}),
    else JSON (null), else the text itself as a string (cuda:0, ring8)."""
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


TEXT_SECTIONS = ("corpus", "model", "centralized")  # sections only a text config has (ddmkit.discrete.config)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names of the section of `model` at `loc` (a path of field names), or [] when it is not one."""
    for name in loc:
        field = model.model_fields.get(name) if isinstance(name, str) else None
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _paths_named(model: type[BaseModel], name: str, prefix: tuple = ()) -> list[str]:
    """The dotted paths of the fields of `model`, at any depth, called `name` (whatever its case):
    'expert.train.steps' and 'expert.path.steps' for 'steps' under the run config's expert section."""
    out = []
    for field, info in model.model_fields.items():
        path = (*prefix, field)
        if field.lower() == name.lower():
            out.append(".".join(path))
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _paths_named(info.annotation, name, path)
    return out


def _free_table(model: type[BaseModel], section: tuple) -> str | None:
    """The free-form table (TABLES) of the section at `section`: 'kwargs' of expert.net, 'params' of data."""
    return next((name for name in _fields_at(model, section) if name in TABLES and
                 typing.get_origin(_annotation_at(model, (*section, name))) is dict), None)


def _unknown_field(model: type[BaseModel] | None, loc: tuple) -> str:
    """The message for an unknown field at `loc`: the closest accepted name of its section, else the fields of
    that name in a table below it (expert.steps -> expert.train.steps) or elsewhere (sample.chunk ->
    evaluate.chunk), and the key of that name in the section's free-form table (expert.net.width ->
    expert.net.kwargs.width), else where the accepted fields are listed."""
    section = loc[:-1]
    close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, section) if model else [], 1)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    if model is not None and isinstance(loc[-1], str):
        inner = _annotation_at(model, section)
        below = _paths_named(inner, loc[-1], section) if isinstance(inner, type) else []
        table = _free_table(model, section)
        paths = (below or _paths_named(model, loc[-1])) + ([".".join((*section, table, loc[-1]))] if table else [])
        if paths:
            others = ", ".join(repr(path) for path in paths[:-1])
            return f"unknown field here; did you mean {f'{others} or ' if others else ''}{paths[-1]!r}?"
    return ("unknown field (check the spelling; see docs/config.md for the accepted fields, docs/discrete.md "
            "for a text config's)")


def _annotation_at(model: type[BaseModel] | None, loc: tuple):
    """The annotation of the field of `model` at `loc` (a path of field names), or None when there is none."""
    annotation = model
    for name in loc:
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(name, str)):
            return None
        field = annotation.model_fields.get(name)
        if field is None:
            return None
        annotation = field.annotation
    return annotation


def _of_texts(annotation) -> bool:
    """Whether a field's annotation is a list of texts (list[str], or a list of some of them: Literal["a", "b"])."""
    if typing.get_origin(annotation) is not list or len(typing.get_args(annotation)) != 1:
        return False
    item = typing.get_args(annotation)[0]
    literal = typing.get_origin(item) is Literal and all(isinstance(a, str) for a in typing.get_args(item))
    return item is str or literal


def _example_texts(field) -> list[list]:
    """Lists for a list-of-texts field, best first: its examples (Field(examples=...)), then one-item lists of each
    item of its default and of its choices (Literal), else the placeholder ["NAME"]."""
    default = field.get_default(call_default_factory=True) or []
    choices = typing.get_args(typing.get_args(field.annotation)[0])  # Literal["a", "b"]'s; list[str]: none
    items = list(dict.fromkeys([*default, *choices]))
    lists = [list(value) for value in field.examples or []] + [[item] for item in items]
    return lists or [["NAME"]]  # tests/test_config.py checks that every field has one


def _with(table, loc: tuple, value) -> dict:
    """A copy of the nested table `table` with `value` at `loc` (a path of field names)."""
    table = dict(table) if isinstance(table, dict) else {}
    table[loc[0]] = _with(table.get(loc[0]), loc[1:], value) if loc[1:] else value
    return table


def _refusal(model: type[BaseModel], data: dict, loc: tuple, value) -> str | None:
    """Why `model` refuses `value` as the field at `loc` of `data`: the first error inside that field or of a
    section holding it (e.g. text_dfm's check of router.kinds), with the other fields as given and, as a section's
    check is skipped while another of its fields is bad, with the config's top-level values alone (its kind);
    None if it takes it."""
    for table in (data, {k: v for k, v in data.items() if not isinstance(v, (dict, list))}):
        try:
            model.model_validate(_with(table, loc, value))
        except ValidationError as bad:
            near = [b["msg"] for b in bad.errors() if b["loc"] and (b["loc"][:len(loc)] == loc or
                                                                     loc[:len(b["loc"])] == b["loc"])]
            if near:
                return near[0].removeprefix("Value error, ")
    return None


def _texts_for(given, model: type[BaseModel], data: dict, loc: tuple, where: str) -> str:
    """What to write for a number (or boolean) `given`, or a list holding some, as the list-of-texts field at `loc`
    of `data`: the list with each number quoted when the config takes it, else the first of the field's examples
    or items of its default or choices that the config takes (and why the quoted one would not do)."""
    items = given if isinstance(given, list) else [given]
    numbers = [json.dumps(item) for item in items if isinstance(item, (int, float))]  # 3 -> "3", as TOML writes it
    texts = [json.dumps(item) if isinstance(item, (int, float)) else item for item in items]
    quoted = ", ".join(json.dumps(number) for number in numbers)
    head = (f"{' and '.join(numbers)} in {json.dumps(given)} {'is' if len(numbers) == 1 else 'are'} not text"
            if isinstance(given, list) else f"{json.dumps(given)} is one value")
    head += ", and this field is a list of texts, each in quotes"
    why = _refusal(model, data, loc, texts)
    if why is None:
        return f"{head}: give {json.dumps(texts)} (on the command line: --set '{where}={json.dumps(texts)}')"
    examples = _example_texts(_annotation_at(model, loc[:-1]).model_fields[loc[-1]])
    example = json.dumps(next((e for e in examples if _refusal(model, data, loc, e) is None), examples[0]))
    return f"{head}, e.g. {example} (on the command line: --set '{where}={example}'); {quoted} would not do: {why}"


def _field_at(model: type[BaseModel] | None, loc: tuple):
    """The pydantic field of `model` at `loc` (a path of field names), or None when there is none."""
    section = _annotation_at(model, loc[:-1]) if loc else None
    if not (isinstance(section, type) and issubclass(section, BaseModel) and isinstance(loc[-1], str)):
        return None
    return section.model_fields.get(loc[-1])


def _scalar_kinds(annotation) -> tuple:
    """The kinds of one value a field's annotation takes (int, float, bool, str, or a Literal's choices), None left
    out: (int,) for int | None; () for a list, a table or a section."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = tuple(k for k in (typing.get_args(annotation) if union else (annotation,)) if k is not type(None))
    if len(kinds) == 1 and typing.get_origin(kinds[0]) is Literal:
        return tuple(typing.get_args(kinds[0]))
    return kinds if kinds and all(k in (int, float, bool, str) for k in kinds) else ()


def _takes(kinds: tuple) -> str:
    """What a field of these kinds takes, in words: 'a whole number', "one of 'euler', 'heun'"."""
    if not all(isinstance(k, type) for k in kinds):
        return "one of " + ", ".join(repr(k) for k in kinds)
    number = "a number" if float in kinds else "a whole number" if int in kinds else None
    words = [number, "true or false" if bool in kinds else None, "text" if str in kinds else None]
    return " or ".join(w for w in words if w)


def _kind_of(value, kinds: tuple) -> str | None:
    """What `value` is, in words, when it is not of `kinds` (_scalar_kinds), e.g. 'a list'; None when it is (a
    number out of range or a choice misspelt is no type error)."""
    texts = str in kinds or any(isinstance(k, str) for k in kinds)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return None if bool in kinds else "a boolean"
    if isinstance(value, str):
        return None if texts else "text"
    if isinstance(value, (int, float)) and (texts or kinds == (bool,)):
        return "a number"
    if isinstance(value, float) and kinds == (int,) and value == value and abs(value) != float("inf") \
            and not value.is_integer():
        return "a number with a fractional part"
    return None


def _candidates(given, field, kinds: tuple) -> list:
    """Values to offer for a field of `kinds` given `given`, best first: `given` read as one ('5' -> 5, 1.5 -> 2),
    the field's default, its lower bound, its choices, a plain one of its kind; for text, `given` as text first
    (prompt = 123 -> "123")."""
    out = []
    number = float in kinds or int in kinds
    if number and isinstance(given, str):
        try:
            out.append(float(given))
        except ValueError:
            pass
    if number and isinstance(given, (int, float)) and not isinstance(given, bool):
        out.append(given)
    out = [round(v) if float not in kinds and v == v and abs(v) != float("inf") else v for v in out]
    if str in kinds and isinstance(given, (bool, int, float)):
        out.insert(0, json.dumps(given))
    out.append(field.get_default(call_default_factory=True))
    out += [m.ge for m in field.metadata if getattr(m, "ge", None) is not None]
    out += [k for k in kinds if not isinstance(k, type)] + [{int: 1, float: 1.0, bool: True, str: "NAME"}.get(k)
                                                           for k in kinds]
    return [v for v in out if v is not None and _kind_of(v, kinds) is None]


def _reads_as_number(text: str) -> bool:
    """Whether `text` is a number written in quotes ("5")."""
    try:
        return float(text) == float(text)
    except ValueError:
        return False


def _on_command_line(where: str, value) -> str:
    """`--set where=value` as a shell reads it and --set reads it back: --set expert.train.steps=2000,
    --set data.name=ring8, --set 'latent.widths=[8, 16]', --set 'data.name="3"' (text --set would read as a number)."""
    plain = value if isinstance(value, str) else json.dumps(value)
    return f"--set {shlex.quote(f'{where}={plain if parse_value(plain) == value else json.dumps(value)}')}"


def _wrong_kind(model: type[BaseModel] | None, data: dict, loc: tuple, given) -> str | None:
    """The message for `given`, a value of the wrong kind (a list, a table, text, a fraction) for the field of one
    value at `loc` or for an item of a list of them: what it is, what the field takes and a value the config takes,
    as TOML and as --set ("[1, 2] is a list, and this field takes a whole number: give 2000 (on the command line:
    --set expert.train.steps=2000)"); None when `given` is of its kind (or the field is no such one)."""
    if loc and isinstance(loc[-1], int):
        return _wrong_item(model, data, loc, given)
    field = _field_at(model, loc)
    kinds = _scalar_kinds(field.annotation) if field is not None else ()
    kind = _kind_of(given, kinds) if kinds else None
    if kind is None:
        return None
    head = f"{json.dumps(given)} is {kind}, and this field takes {_takes(kinds)}"
    fix = next((v for v in _candidates(given, field, kinds) if _refusal(model, data, loc, v) is None), None)
    return _with_fix(head, ".".join(loc), fix, numeric_text=isinstance(given, str) and _reads_as_number(given))


OUT_OF_RANGE = ("finite_number", "literal_error", "greater_than", "greater_than_equal", "less_than",
                "less_than_equal", "string_too_short", "string_too_long", "too_short", "too_long")  # pydantic's
# errors of a value of its kind that its field does not take: nan, 0 where more than 0 goes, a choice misspelt, ""


def _value_that_works(model: type[BaseModel] | None, data: dict, loc: tuple) -> tuple | None:
    """Where and what to give for the field at `loc`, in place of a value of its kind that it does not take: (loc,
    the field's default, else its lower bound, its first choice or 1); for a list, or an item of one (the list's
    loc), the list's default; None when none of them is taken."""
    at = loc[:-1] if loc and isinstance(loc[-1], int) else loc
    field = _field_at(model, at)
    if field is None:
        return None
    if typing.get_origin(field.annotation) is list:
        fixes = [field.get_default(call_default_factory=True)]
    else:  # no placeholder: "NAME" is no value that works
        fixes = [v for v in _candidates(None, field, _scalar_kinds(field.annotation)) if v != "NAME"]
    return next(((at, v) for v in fixes if v is not None and _refusal(model, data, at, v) is None), None)


def _none_by_default(model: type[BaseModel] | None, loc: tuple) -> bool:
    """Whether the field at `loc` is one whose default is None (latent.pretrained: no folder), which no value
    written in a TOML or --set gives back: leaving it out does."""
    field = _field_at(model, loc)
    return field is not None and field.get_default(call_default_factory=True) is None and \
        type(None) in typing.get_args(field.annotation)


def _wrong_item(model: type[BaseModel] | None, data: dict, loc: tuple, given) -> str | None:
    """_wrong_kind's message for an item of a list (latent.widths = [8, "a"], strategies = [["full"]]; a number in a
    list of texts is _texts_for's): the list with each such item replaced by one of its kind, else the field's
    default."""
    field = _field_at(model, loc[:-1])
    items = _given_at(data, loc[:-1])
    if field is None or typing.get_origin(field.annotation) is not list or not isinstance(items, list):
        return None
    kinds = _scalar_kinds(typing.get_args(field.annotation)[0])
    kind = _kind_of(given, kinds) if kinds else None
    if kind is None:
        return None
    head = f"{json.dumps(given)} in {json.dumps(items)} is {kind}, and each item of this field is {_takes(kinds)}"
    mended = [item if _kind_of(item, kinds) is None else next(iter(_candidates(item, field, kinds)), None)
              for item in items]
    fixes = [mended, field.get_default(call_default_factory=True)]
    fix = next((v for v in fixes if None not in v and _refusal(model, data, loc[:-1], v) is None), None)
    return _with_fix(head, ".".join(str(p) for p in loc[:-1]), fix)


def _with_fix(head: str, where: str, fix, numeric_text: bool = False) -> str:
    """`head` and the value to give instead, as TOML and as --set (fix None: the form to write, VALUE)."""
    if fix is None:
        return f"{head} (set {where} = VALUE in the TOML, or --set {where}=VALUE)"
    unquoted = ", without quotes" if numeric_text else ""
    return f"{head}: give {json.dumps(fix)}{unquoted} (on the command line: {_on_command_line(where, fix)})"


def _given_at(data, loc: tuple):
    """The value at `loc` (a path of field names) of the nested table `data`, or None."""
    for name in loc:
        data = data.get(name) if isinstance(data, dict) else None
    return data


TABLES = {"params": "the data set's parameters (the keywords of its preset or loader, e.g. radius for ring8)",
          "kwargs": "the network's keyword arguments (e.g. width, depth)"}  # free-form tables, by field name


def explain(err: ValidationError, source: str, what: str = "configuration", model: type[BaseModel] | None = None,
             data: dict | None = None) -> str:
    lines = [f"{source}: invalid {what}"]
    unknown = {e["loc"][0] for e in err.errors() if e["type"] == "extra_forbidden" and len(e["loc"]) == 1}
    if data is not None and "kind" not in data and unknown & set(TEXT_SECTIONS):  # a text config without its kind:
        sections = "], [".join(sorted(unknown & set(TEXT_SECTIONS)))
        return "\n".join([*lines, f"  kind: missing; a text config (it has [{sections}]) starts with kind = "
                          "\"text_ar\" (autoregressive) or kind = \"text_dfm\" (discrete flow matching): "
                          "docs/discrete.md"])  # the other errors are of reading it as a vector run's
    told = set()  # the lists of texts told already: one line for all the numbers in one
    for e in err.errors()[:20]:
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")  # our validators' own messages, as written
        field, item = e["loc"][:-1], e["loc"][-1] if e["loc"] else None
        if e["type"] == "extra_forbidden":
            msg = _unknown_field(model, e["loc"])
        elif what == "configuration" and e["type"] in ("string_type", "literal_error") and isinstance(item, int) \
                and isinstance(e.get("input"), (int, float)) and _of_texts(_annotation_at(model, field)):  # [3]
            where = ".".join(str(p) for p in field)
            if where in told:
                continue
            told.add(where)
            given = _given_at(data, field)
            msg = _texts_for(given if isinstance(given, list) else [e["input"]], model, data or {}, field, where)
        elif what == "configuration" and (wrong := _wrong_kind(model, data or {}, e["loc"], e.get("input"))):
            msg = wrong  # [1, 2], {a = 1}, "abc" or 1.5 for a whole number: what it takes and a value that works
            if isinstance(item, int):  # an item of a list: one line for the list
                where = ".".join(str(p) for p in field)
                if where in told:
                    continue
                told.add(where)
        elif what == "configuration" and e["type"] in OUT_OF_RANGE and \
                (fixed := _value_that_works(model, data or {}, e["loc"])):
            at, fix = fixed  # nan, 0 where more than 0 goes, a choice misspelt: a value that works
            if at != e["loc"]:  # an item of a list: one line for the list
                where = ".".join(str(p) for p in at)
                if where in told:
                    continue
                told.add(where)
                msg = f"{json.dumps(e.get('input'))} in {json.dumps(_given_at(data, at))}: " + \
                    msg.replace("Input should", "each item should", 1)
            msg = _with_fix(msg, where, fix)
        elif what == "configuration" and e["type"] in OUT_OF_RANGE and _none_by_default(model, e["loc"]):
            msg = f"{msg}: leave {where} out of the TOML and of --set (its default is none)"  # pretrained = ""
        elif what == "configuration" and e["type"] == "list_type" and isinstance(e.get("input"), (str, int, float)):
            given = e["input"]
            if _of_texts(_annotation_at(model, e["loc"])) and not isinstance(given, str):  # 3 where ["top-3"] goes
                msg = _texts_for(given, model, data or {}, e["loc"], where)
            else:
                msg = (f"{given!r} is one value, and this field is a list: give [{json.dumps(given)}] (on the command "
                       f"line: --set '{where}=[{json.dumps(given)}]')")
        elif what == "configuration" and e["type"] == "model_type" and isinstance(e.get("input"), list) and \
                e["input"] and all(isinstance(item, dict) for item in e["input"]):  # [[sample]] in the TOML
            msg = f"written as a list of tables ([[{where}]]); a section is one table: write [{where}]"
        elif what == "configuration" and e["type"] == "model_type" and not isinstance(e.get("input"), dict):
            msg = f"{e['input']!r} is one value, and this is a table of fields: set one of them ({where}.FIELD = VALUE)"
        elif what == "configuration" and e["type"] == "dict_type" and e["loc"] and e["loc"][-1] in TABLES:
            given = "is a list" if isinstance(e.get("input"), list) else "is one value"  # [[data.params]] too
            msg = (f"{e['input']!r} {given}, and this is a table of {TABLES[e['loc'][-1]]}: write each as "
                   f"NAME = VALUE under [{where}] in the TOML, or --set {where}.NAME=VALUE on the command line")
        lines.append(f"  {where}: {msg}" if where else f"  {msg}")  # a check of the whole section names its fields
    if what == "arguments" and len(lines) == 2:  # one bad argument of a Python call: one line naming it
        return f"{source}: {lines[1].strip()}"
    return "\n".join(lines)


def fix_as_option(message: str, field: str, option: str) -> str:
    """`message` with the value offered for `field` as --set (give 48 (on the command line: --set F=48)) given as
    the command's own option instead (give --n 48): for a field the user set through that option."""
    return re.sub(rf"give \S+ \(on the command line: --set '?{re.escape(field)}=([^\s'\[]+)'?\)", rf"give {option} \1",
                  message)
