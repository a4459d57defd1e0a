"""One configuration loader for every AccelGen service.

A service's configuration is a dataclass; ``ConfigLoader(TheConfig, "worker")`` reads it the
same way for every service. Precedence, lowest first:

1. the field defaults;
2. a config file, TOML (or JSON when the name ends in ``.json``), named by ``--config PATH`` or
   ``ACCELGEN_<SERVICE>_CONFIG``; the keys are the field names;
3. environment variables ``ACCELGEN_<SERVICE>_<FIELD>`` (upper case);
4. command-line flags ``--field-name`` (only the flags given override).

Field types: ``bool`` (true/false, yes/no, on/off, 1/0), ``int``, ``float``, ``str``, ``X | None``
(``none`` or an empty value is None), ``dict`` (a table in the file, a JSON object in the
environment and on the command line), ``list[str]`` (an array of strings in the file, a
comma-separated list in the environment, and a flag given once per item: ``--api-key A
--api-key B``; a source that gives the list replaces it whole) and nested dataclasses. A nested
dataclass is a *section*: a table in the file (``[budget]``, or the dotted path in the field's
metadata ``"table"``) whose environment and flag names join the field names:
``ACCELGEN_<SERVICE>_BUDGET_SAFETY_MARGIN``, ``--budget-safety-margin``.

Field metadata: ``"help"`` (else the attribute's docstring is the help), ``"file"`` (the dotted
key in the file, or a tuple of accepted keys, instead of the field name), ``"table"`` (sections),
``"env"`` (other environment variables read when ``ACCELGEN_<SERVICE>_<FIELD>`` is unset: a
shorter name a document promised, such as ``ACCELGEN_API_KEY``).

Every mistake is a ``ConfigError`` (a ``ValueError``) with one line saying what and where; the
services' ``main()`` calls ``loader.main_config(argv)``, which prints
``accelgen <service>: config error: ...`` and exits 2. A bad flag value is argparse's own error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import os
import re
import sys
import textwrap
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_SCALARS = (bool, int, float, str)


class ConfigError(ValueError):
    """A configuration mistake, in one line that names where it is (file, variable or flag)."""


def parse_bool(raw: str) -> bool:
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


@dataclass(frozen=True, eq=False)
class Setting:
    """One leaf of a configuration: where it lives in the object, the file, the env and argv."""

    path: tuple[str, ...]  # field names from the root: ("policy_accelgen", "budget", "safety_margin")
    kind: type  # bool, int, float, str, dict or list (of str)
    optional: bool  # X | None
    files: tuple[str, ...]  # dotted keys accepted in the file
    table: str  # the file table it sits in ("" = top level)
    help: str
    default: Any  # dataclasses.MISSING: computed (a default_factory)
    env: str
    flag: str
    env_aliases: tuple[str, ...] = ()  # read when ``env`` is unset, in this order

    @property
    def name(self) -> str:
        """The flat name: ``policy_accelgen_budget_safety_margin`` (argparse dest)."""
        return "_".join(self.path)

    @property
    def type_name(self) -> str:
        return "list of str" if self.kind is list else self.kind.__name__

    def parse(self, raw: str) -> Any:
        """A value from the environment or the command line (always a string)."""
        if self.optional and raw.strip().lower() in ("", "none"):
            return None
        if self.kind is bool:
            return parse_bool(raw)
        if self.kind is dict:
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return value
        if self.kind is list:  # comma-separated (the environment); blanks dropped
            return [item.strip() for item in raw.split(",") if item.strip()]
        return self.kind(raw)

    def check(self, value: Any) -> Any:
        """A value from the file (already typed by TOML or JSON): checked, never converted from text."""
        if value is None and self.optional:
            return None
        if self.optional and isinstance(value, str) and self.kind is not str and value.strip().lower() in ("", "none"):
            return None
        if isinstance(value, bool) != (self.kind is bool):
            raise ValueError(self.type_name)
        if self.kind is float and isinstance(value, int):
            return float(value)
        if self.kind is list:
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ValueError(self.type_name)
            return list(value)
        if not isinstance(value, self.kind):
            raise ValueError(self.type_name)
        return value

    def argparse_type(self) -> Callable[[str], Any]:
        if self.kind is list:  # one item per flag (argparse's append action collects them)
            return str

        def parse(raw: str) -> Any:
            return self.parse(raw)

        parse.__name__ = self.type_name  # argparse names it: "invalid int value: 'x'"
        return parse

    def shown_default(self) -> str:
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, str):
            return repr(self.default)
        if isinstance(self.default, dict):
            return json.dumps(self.default)
        if isinstance(self.default, list):
            return ",".join(self.default) or "none"
        return str(self.default)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's, without breaking long words: variable names stay whole (and searchable)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


@dataclass(frozen=True)
class _Section:
    cls: type
    table: str
    help: str


class ConfigLoader(Generic[T]):
    """Reads one service's configuration dataclass (see the module doc).

    ``check_file``, when given, sees the parsed file first and may raise ``ValueError`` with a
    clearer message than "unknown field" for a service-specific mistake (the file is named).
    """

    def __init__(self, cls: type[T], service: str,
                 check_file: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cls = cls
        self.service = service
        self.env_prefix = f"ACCELGEN_{service.upper()}_"
        self.config_env = self.env_prefix + "CONFIG"
        self.check_file = check_file
        self.sections: dict[tuple[str, ...], _Section] = {}
        self.settings: list[Setting] = list(self._walk(cls, (), "", ""))
        self._by_name = {s.name: s for s in self.settings}
        self._by_file: dict[str, Setting] = {}
        for s in self.settings:
            for key in s.files:
                if key in self._by_file:
                    raise TypeError(f"{cls.__name__}: two settings at {key!r} in the file")
                self._by_file[key] = s
        if len(self._by_name) != len(self.settings) or any(s.name == "config" for s in self.settings):
            raise TypeError(f"{cls.__name__}: flattened names must be unique and not 'config'")
        self._value_tables = {key for s in self.settings if s.kind is dict for key in s.files}

    # -- the schema --------------------------------------------------------------------------
    def _walk(self, cls: type, path: tuple[str, ...], table: str, section_help: str):
        self.sections[path] = _Section(cls, table, section_help)
        hints = typing.get_type_hints(cls)
        docs = attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            hint = hints[f.name]
            doc = f.metadata.get("help") or docs.get(f.name, "")
            if dataclasses.is_dataclass(hint):
                sub = f.metadata.get("table") or _join(table, f.name)
                yield from self._walk(hint, path + (f.name,), sub, doc)
                continue
            kind, optional = _kind_of(hint, f"{cls.__name__}.{f.name}")
            files = f.metadata.get("file", f.name)
            files = (files,) if isinstance(files, str) else tuple(files)
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory in (dict, list):  # type: ignore[comparison-overlap]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = dataclasses.MISSING
            name = "_".join(path + (f.name,))
            aliases = f.metadata.get("env", ())
            yield Setting(path=path + (f.name,), kind=kind, optional=optional,
                          files=tuple(_join(table, key) for key in files), table=table, help=doc,
                          default=default, env=self.env_prefix + name.upper(), flag="--" + name.replace("_", "-"),
                          env_aliases=(aliases,) if isinstance(aliases, str) else tuple(aliases))

    def setting(self, name: str) -> Setting:
        return self._by_name[name]

    # -- the sources, lowest precedence first -----------------------------------------------
    def read_file(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The settings a TOML or JSON file gives, by flat name; every key must be known."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
        try:
            data = json.loads(text) if str(path).endswith(".json") else tomllib.loads(text)
        except ValueError as exc:
            kind = "JSON" if str(path).endswith(".json") else "TOML"
            raise ConfigError(f"{path}: not valid {kind}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the file must hold a table of settings")
        if self.check_file is not None:
            try:
                self.check_file(data)
            except ValueError as exc:
                raise ConfigError(f"{path}: {exc}") from None
        values: dict[str, Any] = {}
        for key, value in self._flatten(data, ""):
            setting = self._by_file.get(key)
            if setting is None:
                if value is _EMPTY and self._is_table(key):
                    continue
                if self._is_table(key):
                    raise ConfigError(f"{path}: {key} is a table ([{key}]), not a value")
                raise ConfigError(f"{path}: {self._unknown(key)}")
            if setting.name in values:
                raise ConfigError(f"{path}: {setting.name} is given twice (as {' and as '.join(setting.files)})")
            try:
                values[setting.name] = setting.check(value)
            except ValueError:
                raise ConfigError(f"{path}: {key}={value!r} is not a valid {setting.type_name}") from None
        return values

    def read_env(self, env: Mapping[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for s in self.settings:
            name = next((n for n in (s.env, *s.env_aliases) if env.get(n) is not None), s.env)
            raw = env.get(name)
            if raw is not None:
                try:
                    values[s.name] = s.parse(raw)
                except ValueError:
                    raise ConfigError(f"{name}={raw!r} is not a valid {s.type_name}") from None
        return values

    # -- putting them together ----------------------------------------------------------------
    def load(self, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
             flags: Mapping[str, Any] | None = None) -> T:
        """Defaults < ``path`` (default: ``$ACCELGEN_<SERVICE>_CONFIG``) < ``env`` (default:
        ``os.environ``) < ``flags`` (typed values by flat name, as argparse leaves them)."""
        env = os.environ if env is None else env
        if path is None:
            path = env.get(self.config_env) or None
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        if path is not None:
            found = self.read_file(path)
            values.update(found)
            sources.update(dict.fromkeys(found, str(path)))
        found = self.read_env(env)
        values.update(found)
        sources.update({name: self._by_name[name].env for name in found})
        for name, value in (flags or {}).items():
            if name not in self._by_name:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = value
            sources[name] = self._by_name[name].flag
        return self.build(values, sources)

    def build(self, values: Mapping[str, Any], sources: Mapping[str, str] | None = None) -> T:
        """The config object from typed values by flat name; the dataclasses' own validation
        errors become a ``ConfigError`` naming the table, and where each named value came from."""
        return self._build((), values, sources or {})

    def _build(self, path: tuple[str, ...], values: Mapping[str, Any], sources: Mapping[str, str]) -> Any:
        section = self.sections[path]
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(section.cls):
            sub = path + (f.name,)
            if sub in self.sections:
                if any(self._by_name[name].path[:len(sub)] == sub for name in values):
                    kwargs[f.name] = self._build(sub, values, sources)
            elif "_".join(sub) in values:
                kwargs[f.name] = values["_".join(sub)]
        try:
            return section.cls(**kwargs)
        except ValueError as exc:
            message = " ".join(str(exc).split())
            named = [f"{n} from {sources['_'.join(path + (n,))]}" for n in kwargs
                     if "_".join(path + (n,)) in sources and re.search(rf"\b{re.escape(n)}\b", message)]
            where = f" ({', '.join(named)})" if named else ""
            raise ConfigError(f"[{section.table}] {message}{where}" if section.table else f"{message}{where}") from None

    # -- the command line ----------------------------------------------------------------------
    def add_args(self, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """``--config`` and one flag per setting, grouped by table; help: the field's help,
        its environment variable and its default. Flags not given leave the namespace alone."""
        parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                            help=f"TOML config file (JSON if it ends in .json) (env {self.config_env})")
        groups: dict[str, Any] = {"": parser}
        for s in self.settings:
            if s.table not in groups:
                section = next(sec for sec in self.sections.values() if sec.table == s.table)
                groups[s.table] = parser.add_argument_group(f"[{s.table}]", _escape(section.help) or None)
            shown = f"; default {s.shown_default()}" if s.default is not dataclasses.MISSING else ""
            env = " or ".join((s.env, *s.env_aliases)) + (", comma-separated" if s.kind is list else "")
            text = f"{s.help} (env {env}{shown})".strip()
            extra: dict[str, Any] = {"action": "append"} if s.kind is list else {}
            if s.kind is bool:  # a bare --insecure means true; --admission false still works
                extra = {"nargs": "?", "const": True}
            metavar = {dict: "JSON", list: "STR"}.get(s.kind, s.type_name.upper())
            groups[s.table].add_argument(s.flag, dest=s.name, type=s.argparse_type(), default=argparse.SUPPRESS,
                                         metavar=metavar, help=_escape(text), **extra)

    def parser(self, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog or f"accelgen {self.service}", description=description,
                                         formatter_class=HelpFormatter)
        self.add_args(parser)
        return parser

    def from_args(self, ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> T:
        """The config from a namespace ``add_args`` filled (other dests are ignored)."""
        flags = {name: value for name, value in vars(ns).items() if name in self._by_name}
        return self.load(getattr(ns, "config", None), env, flags)

    def parse(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
              prog: str | None = None, description: str | None = None) -> T:
        """Flags (argparse exits 2 on a bad one), then ``from_args``; raises ``ConfigError``."""
        return self.from_args(self.parser(prog, description).parse_args(argv), env)

    def main_config(self, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
                    prog: str | None = None, description: str | None = None) -> T:
        """``parse`` for a service's ``main()``: a config error is one line on stderr and exit 2."""
        try:
            return self.parse(argv, env, prog, description)
        except ConfigError as exc:
            self.exit(exc)

    def exit(self, exc: ConfigError) -> typing.NoReturn:
        print(f"accelgen {self.service}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2)

    # -- file helpers ---------------------------------------------------------------------------
    def _flatten(self, data: Mapping[str, Any], prefix: str):
        for key, value in data.items():
            dotted = _join(prefix, str(key))
            if isinstance(value, dict) and dotted not in self._value_tables:
                if not value:
                    yield dotted, _EMPTY
                yield from self._flatten(value, dotted)
            else:
                yield dotted, value

    def _tables(self) -> set[str]:
        return {sec.table for sec in self.sections.values()}

    def _is_table(self, key: str) -> bool:
        return key in self._tables() or any(k.startswith(key + ".") for k in self._by_file)

    def _unknown(self, key: str) -> str:
        """'unknown field' naming the innermost known table and what it holds."""
        parts = key.split(".")
        table = ""
        for i in range(len(parts) - 1, 0, -1):
            if self._is_table(".".join(parts[:i])):
                table = ".".join(parts[:i])
                break
        depth = len(table.split(".")) if table else 0
        field = ".".join(parts[:depth + 1])
        known = sorted({k.split(".")[depth] for k in list(self._by_file) + list(self._tables())
                        if k and (not table or k.startswith(table + ".")) and len(k.split(".")) > depth})
        where = f" in [{table}]" if table else ""
        return f"unknown field {field!r}{where}; known: {', '.join(known)}"


_EMPTY = object()  # an empty table in the file


def _join(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


def _escape(text: str) -> str:
    return text.replace("%", "%%")


def _kind_of(hint: Any, where: str) -> tuple[type, bool]:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{where}: only X | None unions are supported, got {hint!r}")
        hint, optional = args[0], True
        origin = typing.get_origin(hint)
    if hint is dict or origin is dict:
        return dict, optional
    if origin is list and typing.get_args(hint) == (str,):
        return list, optional
    if hint in _SCALARS:
        return hint, optional
    raise TypeError(f"{where}: unsupported config type {hint!r}")


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """The docstrings under a class's fields (``x: int = 1`` then ``\"\"\"doc\"\"\"``), one line each."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = next((n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == cls.__name__), [])
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
