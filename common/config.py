"""Run configuration files: YAML in (``--config FILE``), the resolved configuration out (``RUN/config.yaml``, the
cache's manifest), and commented templates (``alignti config COMMAND``).

A file's keys are the command's option names (``top_k`` or ``top-k``); flags given on the command line override the
file; an unknown key is an error naming the key and the closest valid one. The CLI layer (cli.py) knows which
options a command has and which were given; this module only reads, checks and writes."""

from __future__ import annotations

import difflib
import io
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import AlignTIError


class ConfigError(AlignTIError):
    pass


def _key(k: Any) -> str:
    return str(k).strip().replace("-", "_")


def read_config(path: str | Path) -> dict:
    """A YAML mapping of option -> value, keys normalised to option names (dashes to underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        values = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {p} must be a mapping of option: value (got a {type(values).__name__})")
    out: dict = {}
    for k, v in values.items():
        key = _key(k)
        if key in out:
            raise ConfigError(f"config file {p}: option '{key}' is given twice")
        out[key] = v
    return out


def check_keys(values: Iterable[str], valid: Iterable[str], command: str, source: str) -> None:
    """Every key must be one of ``valid``; else name it and the closest valid key."""
    valid = sorted(set(valid))
    for k in values:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown option '{k}' for {command}{hint} "
                              f"(`alignti config {command}` lists every option)")


def plain(value: Any) -> Any:
    """A value as YAML can write it (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def render(values: dict, header: str = "", comments: dict[str, str] | None = None) -> str:
    """YAML text of ``values`` in their order, each key preceded by its comment (if any)."""
    buf = io.StringIO()
    for line in header.splitlines():
        buf.write(f"# {line}".rstrip() + "\n")
    if header:
        buf.write("\n")
    for k, v in values.items():
        if comments and comments.get(k):
            for line in _wrap(comments[k]):
                buf.write(f"# {line}\n")
        buf.write(yaml.safe_dump({k: plain(v)}, sort_keys=False, default_flow_style=False, allow_unicode=True))
    return buf.getvalue()


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap
    return textwrap.wrap(" ".join(text.split()), width) or [""]


def write_config(path: str | Path, values: dict, header: str = "") -> Path:
    """Write the resolved configuration (atomically: a reader never sees half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(render(values, header), encoding="utf-8")
    tmp.replace(p)
    return p


def config_values(cfg: Any, keys: Iterable[str]) -> dict:
    """The named fields of a config dataclass, as plain values, in ``keys`` order."""
    return {k: plain(getattr(cfg, k)) for k in keys}
