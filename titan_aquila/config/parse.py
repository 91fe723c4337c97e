"""The mechanism behind `titan_aquila.config`: field docs, types, TOML + command-line merging, `--help`.

Generic over a root dataclass whose fields are section dataclasses. A section's fields may be typed
int, float, bool, str, Literal["a", "b"] (a str with allowed values), `X | None` of those, list[str],
list[int] or dict (TOML tables only). Each field's help text is the string literal written right after it
(an "attribute docstring"), read from the source with `ast`, as torchtitan does.

Command line: `--section.key value` or `--section.key=value`; a bool is a flag (`--s.k` sets true,
`--s.k=false`, `--s.k false` or `--no-s.k` set false); a list is comma-separated (`a,b`, `""` = empty);
`none` sets an optional field to None. Every user mistake raises a one-line `UserError`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
import textwrap
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from titan_aquila.errors import UserError, closest, did_you_mean

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}
CLI = "on the command line"


@dataclasses.dataclass(frozen=True)
class FieldType:
    """A field's type, normalised: `base` is one of int, float, bool, str, list, dict; `item` is a list's
    element type; `choices` are a Literal's allowed values; `optional` allows None."""

    base: type
    optional: bool = False
    item: type | None = None
    choices: tuple[str, ...] | None = None

    def __str__(self) -> str:
        if self.choices is not None:
            s = "|".join(c if c else '""' for c in self.choices)
        elif self.base is list:
            s = f"list[{self.item.__name__}]"
        elif self.base is dict:
            s = "dict, TOML table only"
        else:
            s = self.base.__name__
        return f"{s} | None" if self.optional else s


def field_type(tp: Any) -> FieldType:
    """Normalise a resolved annotation into a `FieldType` (asserts on types the mechanism cannot parse)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        assert len(args) == 1 and len(get_args(tp)) == 2, f"only `X | None` unions are supported: {tp}"
        return dataclasses.replace(field_type(args[0]), optional=True)
    if origin is Literal:
        choices = get_args(tp)
        assert all(isinstance(c, str) for c in choices), tp
        return FieldType(str, choices=choices)
    if origin is list:
        (item,) = get_args(tp)
        assert item in (str, int), tp
        return FieldType(list, item=item)
    if tp is dict or origin is dict:
        return FieldType(dict)
    assert tp in (int, float, bool, str), f"unsupported config type {tp}"
    return FieldType(tp)


@dataclasses.dataclass(frozen=True)
class Option:
    """One `section.name` option: its type, default and one-line help text."""

    section: str
    name: str
    type: FieldType
    default: Any
    doc: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    cls: type
    doc: str
    options: dict[str, Option]


def _one_line(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=None)
def attribute_docs(cls: type) -> dict[str, str]:
    """Map each annotated field of `cls` to the string literal that directly follows it in the source."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = _one_line(nxt.value.value)
    return docs


@lru_cache(maxsize=None)
def sections(root_cls: type) -> dict[str, Section]:
    """The sections of `root_cls` (a dataclass of section dataclasses), in declaration order."""
    out = {}
    for sec_field in dataclasses.fields(root_cls):
        cls = sec_field.default_factory
        assert dataclasses.is_dataclass(cls), f"section {sec_field.name} needs default_factory=<dataclass>"
        hints, docs = typing.get_type_hints(cls), attribute_docs(cls)
        options = {}
        for f in dataclasses.fields(cls):
            assert f.name in docs, f"{cls.__name__}.{f.name} has no docstring"
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            options[f.name] = Option(sec_field.name, f.name, field_type(hints[f.name]), default, docs[f.name])
        out[sec_field.name] = Section(sec_field.name, cls, _one_line(cls.__doc__ or ""), options)
    return out


def all_options(root_cls: type) -> dict[str, Option]:
    return {o.key: o for s in sections(root_cls).values() for o in s.options.values()}


# ------------------------------------------------------------------------------------------------ messages
def unknown_option_message(root_cls: type, key: str, where: str, prefix: str = "") -> str:
    """`unknown option 'training.step' in x.toml; did you mean 'training.steps'?`. The guess is the closest
    key in the same section, else the same key name in another section, else the closest full key."""
    secs, keys = sections(root_cls), list(all_options(root_cls))
    section, _, name = key.rpartition(".")
    guess = None
    if section in secs:
        close = closest(name, list(secs[section].options))
        guess = f"{section}.{close}" if close else None
    guess = guess or next((k for k in keys if k.rpartition(".")[2] == name), None) or closest(key, keys)
    hint = f"; did you mean '{prefix}{guess}'?" if guess else "; see --help for the valid options"
    return f"unknown option '{prefix}{key}' {where}{hint}"


def invalid_value_message(key: str, value: Any, expected: str, where: str = "") -> str:
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    where = f" {where}" if where else ""
    return f"invalid value {shown} for '{key}'{where}: expected {expected}"


def check_choice(opt: Option, value: Any) -> str | None:
    """An error message if `value` is not one of `opt`'s allowed values (with a did-you-mean), else None."""
    choices = opt.type.choices
    if choices is None or value in choices or (value is None and opt.type.optional):
        return None
    return (invalid_value_message(opt.key, value, "one of " + ", ".join(map(repr, choices)))
            + did_you_mean(str(value), choices))


# ------------------------------------------------------------------------------------------------ values
def from_text(opt: Option, raw: str) -> Any:
    """Parse a command-line string into `opt`'s type (lists comma-separated, `none` for an optional)."""
    t = opt.type
    text = raw.strip()
    if t.optional and text.lower() in _NONE:
        return None
    if t.base is dict:
        raise UserError(f"option '--{opt.key}' is a table and can only be set in a TOML file ([{opt.key}])")
    try:
        if t.base is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError(raw)
        if t.base in (int, float):
            return t.base(text)
        if t.base is list:
            return [t.item(p.strip()) for p in text.split(",") if p.strip()]
        return raw
    except ValueError:
        raise UserError(invalid_value_message(f"--{opt.key}", raw, str(t))) from None


def from_value(opt: Option, value: Any, where: str) -> Any:
    """Check a TOML/JSON value against `opt`'s type (an int is accepted for a float) and return a copy."""
    t = opt.type
    if value is None and t.optional:
        return None
    not_bool = not isinstance(value, bool)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not_bool,
        float: isinstance(value, (int, float)) and not_bool,
        str: isinstance(value, str),
        list: isinstance(value, list)
        and all(isinstance(v, t.item) and not isinstance(v, bool) for v in value),
        dict: isinstance(value, dict),
    }[t.base]
    if not ok:
        raise UserError(invalid_value_message(opt.key, value, str(t), where))
    return float(value) if t.base is float else copy.deepcopy(value)


# ------------------------------------------------------------------------------------------------ sources
def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error is a `UserError`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}" if not p.exists() else f"config path is not a file: {path}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"malformed TOML in {path}: {_one_line(str(e))}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text: {e}") from None


def apply_tables(cfg: Any, data: dict[str, Any], where: str, strict: bool = True) -> None:
    """Set `cfg.<section>.<key>` from `{section: {key: value}}` (parsed TOML or `to_dict` output).
    Unknown sections or keys raise a `UserError` with a suggestion, or are skipped when not `strict`."""
    root_cls = type(cfg)
    secs = sections(root_cls)
    for sec_name, table in data.items():
        if sec_name not in secs:
            if not strict:
                continue
            if not isinstance(table, dict):  # a bare `key = value` before any [section]
                raise UserError(unknown_option_message(root_cls, sec_name, where))
            close = closest(sec_name, list(secs))
            hint = f"; did you mean '[{close}]'?" if close else f"; valid sections: {', '.join(secs)}"
            raise UserError(f"unknown section '[{sec_name}]' {where}{hint}")
        if not isinstance(table, dict):
            raise UserError(f"'{sec_name}' {where} must be a table ([{sec_name}]), got {table!r}")
        section_obj = getattr(cfg, sec_name)
        for name, value in table.items():
            opt = secs[sec_name].options.get(name)
            if opt is None:
                if strict:
                    raise UserError(unknown_option_message(root_cls, f"{sec_name}.{name}", where))
                continue
            setattr(section_obj, name, from_value(opt, value, where))


def load(root_cls: type, argv: list[str]) -> Any:
    """`root_cls()` defaults, then the TOML file of `--job.config_file`, then the other command-line options (a CLI
    mistake is reported before file errors); `validate()`d."""
    overrides = parse_cli(root_cls, argv)
    cfg = root_cls()
    config_file = [v for o, v in overrides if o.key == "job.config_file"]
    if config_file and config_file[-1] is not None:
        apply_tables(cfg, load_toml(config_file[-1]), f"in {config_file[-1]}")
    for opt, value in overrides:
        setattr(getattr(cfg, opt.section), opt.name, value)
    cfg.validate()
    return cfg


def parse_cli(root_cls: type, argv: list[str]) -> list[tuple[Option, Any]]:
    """Turn `argv` into `(option, value)` pairs in order (a later repeat of an option wins when applied)."""
    options = all_options(root_cls)
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument {tok!r}; options look like '--section.key value' (see --help)")
        name, eq, raw = tok[2:].partition("=")
        if name not in options and name.startswith("no-") and name[3:] in options:
            opt = options[name[3:]]
            if opt.type.base is not bool or eq:
                raise UserError(f"'--{name}' only works for boolean options without a value; use '--{opt.key} VALUE'")
            out.append((opt, False))
            continue
        opt = options.get(name)
        if opt is None:
            raise UserError(unknown_option_message(root_cls, name, CLI, prefix="--"))
        if opt.type.base is bool and not eq:
            # A bare flag means true; a following true/false literal is taken as its value.
            if i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                out.append((opt, from_text(opt, argv[i])))
                i += 1
            else:
                out.append((opt, True))
            continue
        if not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                raise UserError(f"option '--{opt.key}' expects a value ({opt.type})")
            raw = argv[i]
            i += 1
        out.append((opt, from_text(opt, raw)))
    return out


# ------------------------------------------------------------------------------------------------ help
def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def format_help(root_cls: type, prog: str) -> str:
    """Usage, the rules, then every option as `--section.key (type, default D): doc`, grouped by section."""
    lines = [
        f"usage: {prog} [--job.config_file FILE] [--SECTION.KEY VALUE | --SECTION.KEY=VALUE ...]",
        "",
        "Each option is taken from the command line, else the TOML file given by --job.config_file",
        "([section] tables of `key = value`), else its default.",
        "Booleans: --KEY sets true; --KEY=false, --KEY false or --no-KEY sets false.",
        "Lists: comma-separated on the command line (a,b; \"\" = empty), arrays in TOML.",
        "Optional options: 'none' sets None. Options of type dict are TOML tables and cannot be set",
        "on the command line. Unknown options are errors.",
    ]
    for sec in sections(root_cls).values():
        lines += ["", f"[{sec.name}]  {sec.doc}".rstrip()]
        for o in sec.options.values():
            lines.append(f"  --{o.key} ({o.type}, default {_show_default(o.default)}): {o.doc}")
    return "\n".join(lines) + "\n"
