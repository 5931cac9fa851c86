"""Run configuration files: YAML in (``--config FILE``), the resolved configuration out (``RUN/config.yaml``, the
cache's manifest), and commented templates (``alignti config COMMAND``).

A file's keys are the command's option names (``top_k`` or ``top-k``); flags given on the command line override the
file; an unknown key is an error naming the key and the closest valid one. The CLI layer (cli.py) knows which
options a command has and which were given; this module only reads, checks and writes."""

from __future__ import annotations

import difflib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from .errors import AlignTIError


class ConfigError(AlignTIError):
    pass


class OptionRangeError(ConfigError, ValueError):
    """A numeric option outside its stated range (see ``OPTION_RANGES``); names the option, the range and the value."""


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``lo``..``hi`` (None: unbounded on that side; ``lo_open`` /
    ``hi_open``: the bound itself excluded), ``integer`` for counts, ``optional`` where None means "unset".
    NaN and infinities are never accepted."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False

    def text(self) -> str:
        """The range as the error message states it: "1 or more", "in (0, 1]", "0 or more"."""
        if self.hi is None and self.lo is not None:
            return f"above {_num(self.lo)}" if self.lo_open else f"{_num(self.lo)} or more"
        if self.lo is None and self.hi is not None:
            return f"below {_num(self.hi)}" if self.hi_open else f"{_num(self.hi)} or less"
        if self.lo is None:
            return "a finite number"
        return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}")

    def contains(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        if self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


COUNT = Range(1, integer=True)                      # 1, 2, 3, ...
COUNT0 = Range(0, integer=True)                     # 0, 1, 2, ...
OPT_COUNT = Range(1, integer=True, optional=True)   # unset, or 1, 2, 3, ...
OPT_COUNT0 = Range(0, integer=True, optional=True)  # unset, or 0, 1, 2, ...
SHARE = Range(0, 1, lo_open=True)                   # (0, 1]: a fraction of something that must not be empty
WEIGHT = Range(0, 1000)                             # a loss term's weight (0: the term is computed, not trained)
POSITIVE = Range(0, lo_open=True)                   # any finite number above 0
SEED = Range(0, 2 ** 32 - 1, integer=True)          # what numpy's seeding takes
TEMPERATURE_MIN = 0.1  # below it the tempered teacher's rest bucket and the student's logits/tau leave fp32 headroom

# Every numeric option of every command, in one place: the CLI checks a command's options here before any work
# (flags and --config values alike), and the Python API (TrainConfig, DumpConfig, QuickstartConfig) runs the same
# check first thing. A test walks every numeric CLI option and feeds it a value outside its range.
OPTION_RANGES: dict[str, dict[str, Range]] = {
    "train-student": {
        "kd_weight": WEIGHT, "iva_weight": WEIGHT, "tpa_weight": WEIGHT,
        "iva_ratio": SHARE,  # the share of image tokens IVA aligns; 1.0 (all salient) included
        "temperature": Range(TEMPERATURE_MIN, 10),
        "student_layer": OPT_COUNT0,  # also below the student's layer count, checked once it is loaded
        "max_steps": OPT_COUNT, "epochs": COUNT,
        "lr": Range(0),  # 0: nothing moves (a measuring run; --init checks). No upper bound: a rate that diverges is
        # stopped by the non-finite guard
        "batch_size": COUNT, "grad_accum": COUNT, "warmup_steps": COUNT0,
        "weight_decay": Range(0, 1), "max_grad_norm": POSITIVE, "save_every": COUNT, "seed": SEED,
        "workers": OPT_COUNT0, "eval_every": COUNT0, "checkpoint_every": COUNT, "nproc": COUNT,
        "shuffle_window": COUNT0,  # 0: samples shuffled within their part only
        "lora_r": OPT_COUNT,  # unset: no LoRA
        "lora_alpha": Range(0, lo_open=True, optional=True),  # unset: 2 r
        "lora_dropout": Range(0, 1, hi_open=True),
    },
    "dump-teacher": {
        # unset: 64 / 8, or the teacher's vocabulary if smaller; a k given is at most the teacher's vocabulary,
        # checked from its config before it loads (teacher_dump.dump.resolve_top_k)
        "top_k": OPT_COUNT,
        "batch_size": COUNT, "limit": OPT_COUNT, "tpa_branches": COUNT0, "tpa_top_k": OPT_COUNT,
        "tpa_positions": SHARE, "iva_token_ratio": SHARE, "irs_samples": COUNT, "unit_size": COUNT,
        "max_length": OPT_COUNT, "nproc": COUNT, "tp_size": COUNT, "ep_size": COUNT,
        "encode_workers": OPT_COUNT0,  # unset: 1 for a teacher on a GPU, 0 on CPU
        "packed_kl": Range(0, 0.1, lo_open=True),  # nats per token; the truncation KL itself is ~0.1-1 (bench/README)
        "temperature": Range(TEMPERATURE_MIN, 10),  # the tempered teacher cached (train-student --temperature)
    },
    "rollout": {
        "temperature": Range(0, 10),  # 0: greedy
        "top_p": SHARE, "max_new_tokens": COUNT, "samples_per_prompt": COUNT, "seed": SEED, "round": COUNT0,
        "top_b": COUNT,  # also at least dump-teacher's --tpa-branches, checked when the dump reads the rollout
        "batch_size": COUNT, "unit_size": COUNT, "limit": OPT_COUNT, "max_length": OPT_COUNT, "nproc": COUNT,
        "tp_size": COUNT,
    },
    # the top level of a rounds YAML (workflows/rounds.py); its rollout/dump/train sections use the stages' ranges
    "rounds": {"rounds": COUNT, "lambda": SHARE, "replay": COUNT0, "nproc": COUNT},
    "quickstart": {"seeds": COUNT, "workers": OPT_COUNT},
    "make-demo": {
        "teacher_steps": COUNT0, "teacher_target": Range(0, 1, lo_open=True, optional=True), "teacher_batch": COUNT,
        "teacher_lr": POSITIVE, "teacher_grounding": WEIGHT, "n_train": COUNT, "n_val": COUNT, "n_test": COUNT,
        "seed": SEED,
    },
    "select-layer": {"samples": COUNT, "batch_size": COUNT, "nproc": COUNT, "tp_size": COUNT},
    "evaluate": {"limit": OPT_COUNT, "max_new_tokens": COUNT},
    "export-task": {"max_new_tokens": COUNT},
    "show-saliency": {"turn": COUNT0},
    "make-student": {"seed": SEED},
}


def flag(option: str) -> str:
    """An option's command-line spelling: top_k -> --top-k."""
    return "--" + option.replace("_", "-")


def check_ranges(command: str, values: Mapping[str, Any] | Any, source: str = "") -> None:
    """Every option of ``command`` in ``values`` (a mapping, or a config dataclass) within its ``OPTION_RANGES``
    entry; the first one outside is raised as OptionRangeError naming the option (as its flag), the range, the
    value and ``source`` (a config file) if given. Options without an entry are not numeric and pass."""
    ranges = OPTION_RANGES[command]
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    missing = object()
    for name, rng in ranges.items():
        value = get(name, missing)
        if value is missing or rng.contains(value):
            continue
        where = f"{source}: " if source else ""
        kind = "a whole number " if rng.integer and isinstance(value, float) and not value.is_integer() else ""
        raise OptionRangeError(f"{where}{command} {flag(name)} must be {kind}{rng.text()} (got {value!r})")


def _key(k: Any) -> str:
    return str(k).strip().replace("-", "_")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``3e-4`` and ``1e5`` are numbers (YAML 1.1, PyYAML's default,
    wants a dot, ``3.0e-4``, and reads them as strings), as the command line takes them."""


_Loader.add_implicit_resolver(  # the YAML 1.2 core schema's float (yaml.org/spec/1.2.2, 10.3.2), plus 1.1's forms
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_config(path: str | Path) -> dict:
    """A YAML mapping of option -> value, keys normalised to option names (dashes to underscores)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        values = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)
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


def check_keys(values: Iterable[str], valid: Iterable[str], command: str, source: str,
               lists: str | None = None) -> None:
    """Every key must be one of ``valid``; else a ConfigError naming it, the closest valid key and a command that
    lists the valid ones: ``lists`` (a command line, e.g. ``alignti config rollout``), by default ``alignti config
    COMMAND`` (``alignti config`` prints every command that takes a --config file)."""
    valid = sorted(set(valid))
    for k in values:
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{source}: unknown option '{k}' for {command}{hint} "
                              f"(`{lists or f'alignti config {command}'}` lists every option)")


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
