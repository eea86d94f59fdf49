"""Parsers, config files and recorded configs, all derived from option declarations.

* :func:`build_parser`: the argparse parser of a list of options (spellings kept from the release, types and
  ranges checked by :meth:`Option.convert`, defaults shown in ``--help``), plus ``--config FILE.yaml``.
* :func:`parse`: command line over config file over defaults, into a read-only :class:`Settings`. Bad input is one
  line (exit status 2, or :class:`OptionError` with ``raise_errors``), before anything loads.
* :func:`read_config`: a YAML mapping of option names to values, checked key by key (no code runs: safe_load;
  at most :data:`MAX_CONFIG_BYTES`).
* :func:`settings_from`: settings from a mapping (the harness's ``model_args``), checked the same way.
* :func:`config_yaml`: the settings a run used, as YAML that ``--config`` reads back.
* :func:`keys`: names of the options with a property (``results``, ``runtime``, ...), for resume checks,
  shared runtimes and comparisons.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from models.options.settings import Settings
from models.options.spec import Option, OptionError, by_name

MAX_CONFIG_BYTES = 1 << 20
CONFIG = Option("config", metavar="FILE.yaml", record=False, group="config",
                help="read settings from this YAML file (keys are option names, e.g. 'k: 6'); flags given on the "
                     "command line win over it. A run writes the settings it used as such a file beside its results")


class OptionsParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: ...`` line (rank 0 only) and exit status 2, or an
    :class:`OptionError` when ``raise_errors``."""

    raise_errors = False

    def error(self, message: str):
        if self.raise_errors:
            raise OptionError(message)
        from models.cli import report_error

        report_error(f"{message} (see --help)")
        raise SystemExit(2)


def _help(opt: Option) -> str:
    """The help line of ``opt``, always ending with its default (``required``, ``off`` for a flag, ``none``
    when unset) unless its own text already says what the default is."""
    text = opt.help or ""
    if opt.kind == "list" and opt.choices:
        names = ", ".join(map(str, opt.choice_values))
        text = f"{text} (from {names})" if text else f"from {names}"
    if "default" not in text.lower():
        if opt.required:
            shown = "required"
        elif opt.kind == "flag" and not opt.default:
            shown = "default: off"
        elif opt.default is None or opt.default in ([], ()):
            shown = "default: none"
        else:
            value = ",".join(map(str, opt.default)) if isinstance(opt.default, (list, tuple)) else opt.default
            shown = f"default: {value}"
        text = f"{text} ({shown})" if text else shown
    return text.replace("%", "%%")


def add_options(parser: argparse.ArgumentParser, options: Iterable[Option]) -> argparse.ArgumentParser:
    """Add ``options`` to ``parser``, in groups. Every default is SUPPRESS: the parsed namespace holds only
    what the command line gave, so :func:`parse` can put it over the config file and the defaults."""
    groups: dict[str, Any] = {}
    for opt in options:
        if opt.group not in groups:
            groups[opt.group] = parser.add_argument_group(opt.group)
        g = groups[opt.group]
        common = {"dest": opt.name, "default": argparse.SUPPRESS, "help": _help(opt)}
        if opt.kind == "flag":
            g.add_argument(*opt.flags, action="store_true", **common)
            continue
        metavar = opt.metavar or ("{" + ",".join(map(str, opt.choice_values)) + "}" if opt.kind == "choice" else None)
        if opt.kind == "switch":
            g.add_argument(*opt.flags, nargs="?", const=True, type=opt.parse_text, metavar="True|False", **common)
        elif opt.repeat:
            g.add_argument(*opt.flags, action="append", metavar=metavar or opt.name.upper(), **common)
        else:
            g.add_argument(*opt.flags, type=opt.parse_text, metavar=metavar, **common)
    return parser


def build_parser(options: Iterable[Option], description: str = "", *, parser: argparse.ArgumentParser | None = None,
                 config: bool = True, **kwargs) -> argparse.ArgumentParser:
    """The parser of ``options`` (and ``--config`` unless ``config=False``)."""
    options = list(options)
    by_name(options)  # one declaration per name
    parser = parser or OptionsParser(description=description, **kwargs)
    return add_options(parser, [*options, CONFIG] if config else options)


def _lookup(options: Iterable[Option]) -> dict[str, Option]:
    out = {}
    for opt in options:
        for name in opt.names():
            out[name] = opt
    return out


def load_yaml_mapping(path: str | Path) -> dict:
    """The mapping a YAML config file holds, read safely (``safe_load``: no tag runs code; at most
    :data:`MAX_CONFIG_BYTES`); its keys are not checked here. Raises :class:`OptionError` naming the file."""
    import yaml

    path = Path(path)
    where = f"--config {path}"
    try:
        if not path.is_file():
            raise OptionError(f"{where}: no such file")
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise OptionError(f"{where}: {size} bytes; a config file holds at most {MAX_CONFIG_BYTES}")
        with open(path, "rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1).decode("utf-8")
    except UnicodeDecodeError as err:
        raise OptionError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise OptionError(f"{where}: cannot read it ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise OptionError(f"{where}: not valid YAML{at} ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionError(f"{where}: must be a mapping of option names to values, got a {type(data).__name__}")
    return data


def read_config(path: str | Path, options: Iterable[Option]) -> dict[str, Any]:
    """``{option name: value}`` of a YAML config file, every key known and every value checked; raises
    :class:`OptionError` naming the file, the key and what is allowed."""
    return checked_values(load_yaml_mapping(path), list(options), f"--config {path}")


def checked_values(data: Mapping, options: Iterable[Option], where: str) -> dict[str, Any]:
    """Each key of ``data`` mapped to its option's name and its value converted; one OptionError line for
    an unknown key or a bad value, naming ``where``, the key and what is allowed."""
    options = list(options)
    lookup = _lookup(options)
    out: dict[str, Any] = {}
    for key, value in data.items():
        opt = lookup.get(str(key).lstrip("-").replace("-", "_")) if isinstance(key, str) else None
        if opt is None:
            allowed = ", ".join(o.name for o in options)
            raise OptionError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        if value is None and opt.default is not None:
            raise OptionError(f"{where}: {key}: must be {opt.allowed()}, got null")
        if opt.repeat and isinstance(value, str):
            value = [value]
        try:
            out[opt.name] = opt.convert(value)
        except OptionError as err:
            raise OptionError(f"{where}: {key}: {err}") from None
    return out


def _config_path(argv: list[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # '--config' without a value: the full parser says so
        return None
    return known.config


def parse(options: Iterable[Option], argv: list[str] | None = None, *, description: str = "",
          parser: argparse.ArgumentParser | None = None, known: bool = False, raise_errors: bool = False,
          defaults: Mapping[str, Any] | None = None, config: bool = True):
    """The settings of ``argv``: each option's value from the command line, else ``--config``, else
    ``defaults`` (already checked values an entry point supplies), else its declared default.

    ``known``: also return the tokens no option took (the suite hands them to its tasks)."""
    options = list(options)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or build_parser(options, description, config=config)
    if isinstance(parser, OptionsParser):
        parser.raise_errors = raise_errors
    try:
        if known:
            given, extras = parser.parse_known_args(argv)
        else:
            given, extras = parser.parse_args(argv), []
        config_file = getattr(given, "config", None)
        from_file = read_config(config_file, options) if config_file else {}
    except OptionError as err:
        if raise_errors:
            raise
        parser.error(str(err))
    values = {opt.name: opt.default for opt in options}
    values.update(defaults or {})
    values.update(from_file)
    for opt in options:
        if hasattr(given, opt.name):
            value = getattr(given, opt.name)
            if opt.repeat:
                value = opt.convert([*from_file.get(opt.name, []), *value])
            values[opt.name] = value
    missing = [opt.flag for opt in options if opt.required and values[opt.name] is None]
    if missing:
        message = f"the following arguments are required: {', '.join(missing)}"
        if raise_errors:
            raise OptionError(message)
        parser.error(message)
    # what the parser holds besides options: positional arguments and sub-commands, as given
    others = {k: v for k, v in vars(given).items() if k not in values and k != "config"}
    settings = Settings(**values, **others, config=config_file)
    return (settings, extras) if known else settings


def settings_from(options: Iterable[Option], values: Mapping[str, Any], where: str) -> Settings:
    """Settings from a mapping (every key known, every value checked), over the declared defaults."""
    options = list(options)
    out = {opt.name: opt.default for opt in options}
    out.update(checked_values(values, options, where))
    return Settings(**out, config=None)


def check_settings(settings, options: Iterable[Option], where: str = "") -> None:
    """Every value of ``settings`` that ``options`` declare passes its option's check (for namespaces that
    were built by hand, not parsed)."""
    for opt in options:
        if not hasattr(settings, opt.name):
            continue
        try:
            opt.convert(getattr(settings, opt.name))
        except OptionError as err:
            raise OptionError(f"{where}{opt.flag}: {err}") from None


def keys(options: Iterable[Option], *properties: str) -> tuple[str, ...]:
    """Names of the options that have every one of ``properties`` (``results``, ``runtime``, ``data``,
    ``images_only``, ``path``, ``record``)."""
    return tuple(o.name for o in options if all(getattr(o, p) for p in properties))


def recorded(settings, options: Iterable[Option]) -> dict[str, Any]:
    """The settings a run records: every option declared with ``record``, in declaration order."""
    return {o.name: _plain(getattr(settings, o.name, None)) for o in options if o.record}


def _plain(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return value


def config_yaml(settings, options: Iterable[Option], header: str = "") -> str:
    """The recorded settings as a YAML file that ``--config`` reads back (a comment header first)."""
    import yaml

    body = yaml.safe_dump(recorded(settings, options), sort_keys=False, allow_unicode=True, width=10_000)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()] if header else []
    return "\n".join(lines) + ("\n" if lines else "") + body
