"""Where `ServeConfig` values come from: flags, `CAPASERVE_*` variables, a YAML file.

All three, the `--help` text and the flag table of docs/cli.md are generated from the
model, so a setting added to serving/config.py gets its flag, variable, file key and docs
row without further code. Precedence, per setting: flag > environment > file > default.

The flags of `capaserve train` and `capaserve loadtest` come from their flat models
(`TrainConfig`, `LoadTestConfig`) through the same `Setting` (`add_model_flags`,
`model_from_namespace`): one flag per field, the model's defaults and descriptions in
`--help`, and an unset flag left to the model's default.

    python -m serving.config_sources docs/cli.md    # rewrite the generated table in place
"""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import sys
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo

from adapters.errors import validation_message
from serving.config import BYTES, ServeConfig, format_bytes

ENV_PREFIX = "CAPASERVE_"
CONFIG_ENV = "CAPASERVE_CONFIG"
SECTIONS = tuple(ServeConfig.model_fields)

PRECEDENCE = (
    "Each setting is taken from its flag, else its CAPASERVE_* environment variable (an empty one counts "
    "as unset), else the --config YAML file (nested by section: " + ", ".join(SECTIONS) + "), else its "
    "default. Byte sizes take an integer or a size such as 256MiB or 2GiB; on/off settings take "
    "--x/--no-x, or true/false, 1/0, yes/no, on/off in a variable or the file."
)

DOCS_BEGIN = "<!-- generated from serving/config.py: python -m serving.config_sources docs/cli.md -->"
DOCS_END = "<!-- end of generated table -->"


class ConfigError(ValueError):
    """A one-line reason the configuration is unusable; `capaserve serve` exits with status 2."""


def _plain(annotation: Any) -> Any:
    """The annotation without `| None`."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


@dataclass(frozen=True)
class Setting:
    """One leaf of `ServeConfig` and the names it goes by in every source."""

    path: tuple[str, ...]  # ("server", "port"): the section first, then the field (nested models in between)
    info: FieldInfo
    #: leading parts of `path` the flag leaves out: 1 for ServeConfig's section, 0 for a flat model
    section_depth: int = 1

    @property
    def key(self) -> str:
        """The dotted key of the YAML file."""
        return ".".join(self.path)

    @property
    def _extra(self) -> dict[str, Any]:
        extra = self.info.json_schema_extra
        return extra if isinstance(extra, dict) else {}

    @property
    def flag(self) -> str:
        """`--field-name` (a nested model's name leads: `--mode-policy-min-dwell-ms`), unless the field names one."""
        return "--" + str(self._extra.get("flag") or "-".join(self.path[self.section_depth:]).replace("_", "-"))

    @property
    def short(self) -> str | None:
        """A one-letter alias (`-o`) where the field names one."""
        value = self._extra.get("short")
        return None if value is None else str(value)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag[2:].upper().replace("-", "_")

    @property
    def dest(self) -> str:
        return "setting:" + self.key

    @property
    def is_bool(self) -> bool:
        return self.info.annotation is bool

    @property
    def is_bytes(self) -> bool:
        return any(m is BYTES for m in self.info.metadata)

    @property
    def is_secret(self) -> bool:
        plain = _plain(self.info.annotation)
        return plain is SecretStr or SecretStr in get_args(plain)

    @property
    def description(self) -> str:
        return self.info.description or ""

    def default_text(self, markdown: bool = False) -> str:
        """The default as help and docs show it: words for a `None` or computed one."""
        code = (lambda s: f"`{s}`") if markdown else (lambda s: s)
        if "default_doc" in self._extra:
            return str(self._extra["default_doc"])
        value = self.info.get_default(call_default_factory=True)
        if value is None:
            return "none"
        if isinstance(value, list) and value:
            return code(",".join(str(v) for v in value))
        if isinstance(value, bool):
            return "on" if value else "off"
        if self.is_bytes:
            number, _, size = format_bytes(value).partition(" ")
            return code(number) + (f" {size}" if size else "")
        return code(f"{value:g}" if isinstance(value, float) else str(value))

    def metavar(self) -> str:
        plain = _plain(self.info.annotation)
        if self.is_bytes:
            return "BYTES"
        if get_origin(plain) is Literal:
            return "{" + ",".join(map(str, get_args(plain))) + "}"
        if get_origin(plain) is list:
            return "N1,N2" if get_args(plain) and get_args(plain)[0] in (int, float) else "K1,K2"
        return {int: "INT", float: "NUM", SecretStr: "TOKEN", Path: "PATH"}.get(plain, "TEXT")

    def help(self) -> str:
        text = f"{self.description} (default: {self.default_text()}) [env: {self.env}; file: {self.key}]"
        return text.replace("%", "%%")

    def flat_help(self) -> str:
        """The help of a flat model's flag (the command line parser adds its variable)."""
        given = "required" if self.info.is_required() else f"default: {self.default_text()}"
        return f"{self.description} ({given})".replace("%", "%%")

    def choices(self) -> list[str] | None:
        """The values a Literal or enum field takes, as typed on the command line."""
        plain = _plain(self.info.annotation)
        if get_origin(plain) is Literal:
            return [str(a) for a in get_args(plain)]
        if isinstance(plain, type) and issubclass(plain, Enum):
            return [str(m.value) for m in plain]
        return None

    def arg_type(self) -> Callable[[str], Any] | None:
        """What argparse converts a flat model's flag with: numbers and paths as such, a list
        field from comma-separated items (`--targets query,value`); None keeps the string."""
        plain = _plain(self.info.annotation)
        if get_origin(plain) is list:
            item = (get_args(plain) or (str,))[0]
            return _comma_list(item if item in (int, float) else str)
        return {int: int, float: float, Path: Path}.get(plain)


def csv_list(value: str) -> list[str]:
    """An argparse `type` for a comma-separated list flag (`--targets query,value`)."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. a,b")
    return items


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    def parse(value: str) -> list[Any]:
        try:
            return [item(p) for p in csv_list(value)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {getattr(item, '__name__', 'text')} values, got {value!r}") from None

    return parse


def _settings(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Setting]:
    out: list[Setting] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _settings(ann, (*prefix, name))
        else:
            out.append(Setting((*prefix, name), info))
    return out


#: Every leaf of ServeConfig, in declaration order.
SETTINGS: tuple[Setting, ...] = tuple(_settings(ServeConfig))

_flags = [s.flag for s in SETTINGS]
if len(set(_flags)) != len(_flags):
    raise RuntimeError(f"two ServeConfig settings share a flag: {sorted(f for f in _flags if _flags.count(f) > 1)}")


# ---------------------------------------------------------------------------- argparse


def add_flags(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one flag per setting, grouped by section; unset flags stay absent."""
    parser.add_argument(
        "--config", dest="config_file", metavar="FILE", default=None,
        help=f"YAML file of settings, nested by section ({', '.join(SECTIONS)}) [env: {CONFIG_ENV}]",
    )
    groups: dict[str, Any] = {}
    for s in SETTINGS:
        section = s.path[0]
        if section not in groups:
            groups[section] = parser.add_argument_group(
                f"{section} settings", ServeConfig.model_fields[section].description
            )
        kw: dict[str, Any] = {"dest": s.dest, "default": argparse.SUPPRESS, "help": s.help()}
        if s.is_bool:
            groups[section].add_argument(s.flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            groups[section].add_argument(s.flag, metavar=s.metavar(), **kw)


# ---------------------------------------------------------------------------- flat models


def model_settings(model: type[BaseModel]) -> tuple[Setting, ...]:
    """Every field of a flat command model (`capaserve train`, `capaserve loadtest`), in order."""
    settings = tuple(Setting((name,), info, section_depth=0) for name, info in model.model_fields.items())
    flags = [s.flag for s in settings]
    if len(set(flags)) != len(flags):
        raise RuntimeError(f"two {model.__name__} fields share a flag: {sorted(f for f in flags if flags.count(f) > 1)}")
    return settings


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of `model`: a bool is --x/--no-x, a Literal or enum takes its values,
    a list takes comma-separated items, a field without default is required. An unset flag
    stays absent from the namespace, so the model's own default applies."""
    for s in model_settings(model):
        names = [s.flag] if s.short is None else [s.short, s.flag]
        kw: dict[str, Any] = {"dest": s.dest, "default": argparse.SUPPRESS, "help": s.flat_help()}
        if s.is_bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if s.info.is_required():
            kw["required"] = True
        choices, convert = s.choices(), s.arg_type()
        if choices is not None:
            kw["choices"] = choices
        if convert is not None:
            kw["type"] = convert
        parser.add_argument(*names, metavar=None if choices else s.metavar(), **kw)


def model_from_namespace(model: type[BaseModel], ns: argparse.Namespace) -> Any:
    """The `model` of parsed `add_model_flags` flags; a ConfigError names each bad flag."""
    settings = model_settings(model)
    values = {s.path[0]: getattr(ns, s.dest) for s in settings if hasattr(ns, s.dest)}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        by_name = {s.path[0]: s for s in settings}
        problems = []
        for err in exc.errors():
            setting = by_name.get(str(err["loc"][0])) if err["loc"] else None
            label = setting.flag if setting is not None else "arguments"
            problems.append(f"{label}: {validation_message(err)}")
        raise ConfigError("; ".join(problems)) from None


# ---------------------------------------------------------------------------- layering


def load_file(path: str) -> dict[str, Any]:
    """The YAML file's mapping of sections; an unreadable or malformed file is a ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def _put(tree: dict[str, Any], path: tuple[str, ...], value: Any, origin: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} {origin}: expected a mapping of settings, got {child!r}")
        node = child
    node[path[-1]] = value


def config_from(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] = os.environ,
    config_file: str | None = None,
    base: Mapping[str, Any] | None = None,
) -> ServeConfig:
    """The ServeConfig of the given flags (by `Setting.dest`), environment and YAML file.

    `config_file` None falls back to `$CAPASERVE_CONFIG`. `base`, a nested mapping such as
    `serve run` passes to `build_app` as `args`, takes the file's place. Any problem is a
    ConfigError.
    """
    if base is not None:
        tree: dict[str, Any] = copy.deepcopy(dict(base))
    else:
        config_file = config_file or environ.get(CONFIG_ENV) or None
        tree = load_file(config_file) if config_file else {}
    origin: dict[tuple[str, ...], str] = {}
    for s in SETTINGS:
        if environ.get(s.env):
            _put(tree, s.path, environ[s.env], f"in {config_file}")
            origin[s.path] = s.env
        if s.dest in flags:
            _put(tree, s.path, flags[s.dest], f"in {config_file}")
            origin[s.path] = s.flag
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, origin, config_file)) from None


def config_of(**settings: Any) -> ServeConfig:
    """A ServeConfig from settings named as their flags, with `_` for `-`: the flat form for Python.

    `config_of(registry="/tmp/r", max_batch_size=16, replicas=2)` is `capaserve serve
    --registry /tmp/r --max-batch-size 16 --replicas 2` without environment or file, so a
    script or test uses the names the CLI documents. An unknown name is a ConfigError.
    """
    by_name = {s.flag[2:].replace("-", "_"): s for s in SETTINGS}
    unknown = sorted(set(settings) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return config_from({by_name[k].dest: v for k, v in settings.items()}, environ={}, config_file=None)


def config_from_namespace(ns: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> ServeConfig:
    """The ServeConfig of parsed `capaserve serve` arguments (see `config_from`)."""
    return config_from(vars(ns), environ, getattr(ns, "config_file", None))


def _explain(exc: ValidationError, origin: Mapping[tuple[str, ...], str], config_file: str | None) -> str:
    """One line naming each bad setting as the user gave it (flag, variable or file key)."""
    by_path = {s.path: s for s in SETTINGS}
    problems = []
    for err in exc.errors():
        loc = tuple(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            where = f" in {config_file}" if config_file else ""
            near = [s.key for s in SETTINGS if s.path[-1] == loc[-1]] or difflib.get_close_matches(
                ".".join(loc), [s.key for s in SETTINGS], n=1
            )
            hint = f" (did you mean {near[0]}?)" if near else f" (known sections: {', '.join(SECTIONS)})"
            problems.append(f"unknown setting {'.'.join(loc)}{where}{hint}")
            continue
        setting = next((by_path[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in by_path), None)
        if setting is None:
            problems.append(f"invalid {'.'.join(loc)}: {validation_message(err)}")
            continue
        label = origin.get(setting.path) or (f"{setting.key} in {config_file}" if config_file else setting.key)
        given = err.get("input")
        shown = "" if setting.is_secret or isinstance(given, (dict, list)) else f" {given!r}"
        problems.append(f"invalid {label}{shown}: {validation_message(err)}")
    return "; ".join(problems)


# ---------------------------------------------------------------------------- docs


def markdown_table() -> str:
    """The flag table of docs/cli.md#capaserve-serve."""
    rows = [
        "| flag | environment variable | `--config` key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = f"`{s.flag}`" + (f" / `--no-{s.flag[2:]}`" if s.is_bool else "")
        meaning = s.description.replace("|", "\\|")
        rows.append(f"| {flag} | `{s.env}` | `{s.key}` | {s.default_text(markdown=True)} | {meaning} |")
    return "\n".join(rows)


def render_docs(text: str) -> str:
    """`text` with the block between the generated-table markers replaced by `markdown_table()`."""
    head, begin, rest = text.partition(DOCS_BEGIN)
    _, end, tail = rest.partition(DOCS_END)
    if not begin or not end:
        raise ValueError(f"the generated-table markers are missing: {DOCS_BEGIN!r} ... {DOCS_END!r}")
    return f"{head}{DOCS_BEGIN}\n{markdown_table()}\n{DOCS_END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated table of each given markdown file."""
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        path.write_text(render_docs(path.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
