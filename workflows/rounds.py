"""`alignti rounds --config rounds.yaml`: K on-policy rounds, each the ordinary stages in their own folders.

Round 0 (only when the YAML names no ``reference_cache``) dumps the teacher on the reference answers into
``WORK/round-0/cache``: the off-policy cache every round mixes in. Round r (1..K) then runs

1. ``rollout``: the round's student answers every assistant turn (round 1: ``student``; round r > 1: round
   r-1's ``run/final``), sampled with the round's settings, into ``WORK/round-r/rollout``;
2. ``dump-teacher`` on those rows (loss on the student's turns, TPA after the student's candidates) into
   ``WORK/round-r/cache``;
3. ``train-student`` from ``student`` with ``--init`` round r-1's run (weights only, fresh optimizer) on the
   mixture: the reference cache at weight 1 - lambda, and the latest on-policy cache plus up to ``replay`` earlier
   ones sharing lambda equally (DistiLLM-style replay), into ``WORK/round-r/run``.

Each stage is the stage's own Python API (``rollout``, ``dump_teacher``, ``train_student``), so every folder is
exactly what the command writes and can be shared, inspected or re-used like any other. Resuming: the same
command after an interruption (kill -9 anywhere) skips finished stages (a rollout's ``rollout.json``, a cache's
``manifest.json``, a run's complete ``final/``), re-runs an unfinished rollout or dump (both finish only their
missing units) and continues a half-trained run from its checkpoint (``resume=True``). ``WORK/rounds.yaml`` holds
the configuration the work runs with. A later run may change any setting whose stages have not finished (a diverged
round's ``train.lr``, a later round's rollout settings; ``rounds`` always): the change is taken from the first stage
it reaches, partial work of those stages is set aside (``NAME.before-TIME``) and ``WORK/rounds.json`` records it
under ``changes``; a change that reaches a finished stage is refused naming the stages, how to redo them (delete
their folders) and how to keep the finished reference cache in a new workdir (``reference_cache:``).
``WORK/rounds.json`` records each stage's state and seconds.

``nproc`` N > 1 runs every stage as its own command under torchrun with N processes: ``python -m alignti rollout |
dump-teacher | train-student --config WORK/round-r/<command>.yaml --nproc N`` (``stage_command``; the YAML holds
exactly the settings the in-process stage would get, so the folders are the same either way). Where the stages
split the work: the rollout's and the dump's ranks take work units in turn, train-student runs DDP (``train.fsdp``:
FSDP2).

Settings of the ``rollout`` and ``train`` sections may be given per round as a list of ``rounds`` values
(``temperature: [1.0, 0.7]``); an integer rollout ``seed`` gives round r the seed ``seed + r - 1``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import yaml

from alignti.common.cache import atomic_write_json, atomic_write_text
from alignti.common.config import ConfigError, check_keys, check_ranges, read_config
from alignti.common.errors import AlignTIError
from alignti.common.onpolicy import ROLLOUT_MANIFEST
from alignti.common.schema import MANIFEST_FILE
from alignti.student_rollout.rollout import RolloutConfig, rollout
from alignti.student_train.trainer import TrainConfig, train_student
from alignti.teacher_dump.dump import DumpConfig, check_dump_config, dump_teacher

log = logging.getLogger("alignti.rounds")

STATE_FILE = "rounds.json"
FROZEN_FILE = "rounds.yaml"

TOP_KEYS = ("workdir", "teacher", "student", "data", "images", "reference_cache", "rounds", "lambda", "replay",
            "device", "nproc", "rollout", "dump", "train")
REQUIRED = ("workdir", "teacher", "student", "data")
TOP_DEFAULTS: dict[str, Any] = {"images": None, "reference_cache": None, "rounds": 2, "lambda": 0.5, "replay": 1,
                                "device": "auto", "nproc": 1}
# what rounds sets itself in each stage (the folders, the round, the chain of students)
_OWNED = {"student", "teacher", "data", "images", "out", "round", "progress", "device", "cache", "cache_weights",
          "init", "resume", "eval_every"}
SECTION_KEYS = {
    "rollout": [f.name for f in fields(RolloutConfig) if f.name not in _OWNED],
    "dump": [f.name for f in fields(DumpConfig) if f.name not in _OWNED],
    "train": [f.name for f in fields(TrainConfig) if f.name not in _OWNED],
}
SECTION_COMMAND = {"rollout": "rollout", "dump": "dump-teacher", "train": "train-student"}
SECTION_CLASS = {"rollout": RolloutConfig, "dump": DumpConfig, "train": TrainConfig}
# the stage configs' fields that are no command-line option (python API only): left out of a stage's --config YAML
_API_ONLY = ("progress", "eval_every")
PER_ROUND = ("rollout", "train")  # sections whose settings may be lists, one value per round
# the rounds defaults that differ from the stage's own (a round is short: the rollout's top-B is the dump's branches)
SECTION_DEFAULTS = {"rollout": {}, "dump": {}, "train": {"loss": "alignti"}}

TEMPLATE = """\
# alignti rounds configuration: `alignti rounds --config THIS_FILE`.
# K rounds of rollout -> dump-teacher -> train-student, each stage in its own folder under workdir
# (round-R/rollout, round-R/cache, round-R/run); re-running the same command resumes where it stopped.

# Folder of the rounds' work (required). Keeps rounds.yaml (the settings it was started with) and rounds.json.
workdir: rounds
# Teacher checkpoint, local path or hub id (required).
teacher: null
# The starting student (required): round 1 rolls it out; every round trains from it with --init of the round before.
student: null
# Samples: LLaVA JSON/JSONL, parquet, or a datasets folder; local or fsspec URL (required).
data: null
# Folder the data's image paths are relative to (null: the data embeds its images).
images: null
# The off-policy cache (teacher-forced on the references) mixed into every round; null: dumped in round 0 into
# workdir/round-0/cache with the dump settings below.
reference_cache: null
# Number of on-policy rounds (more rounds later: raise it and run the same command).
rounds: 2
# The on-policy share of the training draws (GKD's lambda), in (0, 1]: the reference cache gets 1 - lambda (left
# out at 1), the latest on-policy cache and the `replay` earlier ones share lambda equally.
lambda: 0.5
# How many earlier rounds' on-policy caches stay in the mixture besides the latest (0: the latest only).
replay: 1
# auto, cpu, cuda, cuda:N: every stage.
device: auto
# Processes per stage: N > 1 runs rollout, dump-teacher and train-student each as its command with --nproc N under
# torchrun (one per GPU; gloo on CPU): the rollout's and the dump's ranks split the work units, training is DDP
# (train.batch_size is per process).
nproc: 1
# alignti rollout settings (any of its options but student/data/images/out/round). A list gives one value per
# round (temperature: [1.0, 0.7]); an integer seed gives round R the seed seed + R - 1.
rollout:
  temperature: 1.0
  top_p: 1.0
  max_new_tokens: 128
  samples_per_prompt: 1
  seed: 0
  top_b: 4
  teacher_forced: false
  batch_size: 8
  unit_size: 64
  limit: null
  skip_bad: false
# alignti dump-teacher settings (any of its options but teacher/data/images/out), for round 0's reference cache
# and every on-policy cache. tpa_branches must not exceed the rollout's top_b.
dump:
  top_k: null              # null: 64, or the teacher's vocabulary if smaller
  logprob_encoding: packed # or float16, uint8
  tpa_branches: 4
  tpa_top_k: null          # null: 8, or the teacher's vocabulary if smaller
  tpa_positions: 1.0
  saliency_layer: auto
  irs_samples: 256
  batch_size: 8
  unit_size: 256
  skip_bad: false
# alignti train-student settings per round (any of its options but student/cache/cache_weights/init/out/resume).
# A list gives one value per round (max_steps: [200, 100]).
train:
  loss: alignti
  max_steps: 100
  lr: 0.001
  batch_size: 8
  seed: 0
  save_every: 50
"""


def template() -> str:
    """The commented YAML template ``alignti config rounds`` prints."""
    return TEMPLATE


def _round_value(value: Any, r: int, rounds: int, where: str) -> Any:
    """A per-round setting's value for round ``r`` (1-based): a list holds one value per round."""
    if isinstance(value, list):
        if len(value) != rounds:
            raise ConfigError(f"{where}: a per-round list needs one value per round ({rounds}), got {len(value)}")
        return value[r - 1]
    return value


def section_for_round(cfg: dict, section: str, r: int) -> dict:
    """The settings of ``section`` for round ``r`` (lists resolved; the rollout's integer seed offset by round)."""
    values = dict(cfg[section])
    if section in PER_ROUND:
        values = {k: _round_value(v, r, cfg["rounds"], f"{section}.{k}") for k, v in values.items()}
        if section == "rollout" and "seed" in values and not isinstance(cfg["rollout"]["seed"], list):
            values["seed"] = values["seed"] + r - 1
    return values


def _numbers(section: str, values: dict, src: str) -> dict:
    """``values`` with each numeric setting as the stage's command line would take it (the sections have no click
    parameters to convert them): a string (``'3e-4'``, quoted) made a number, a whole float (``1e5``) an int where
    the setting is an int. Raises ConfigError naming the file, the section and the key for a string that is no
    number."""
    hints = typing.get_type_hints(SECTION_CLASS[section])
    out = {}
    for k, v in values.items():
        kinds = set(typing.get_args(hints.get(k))) or {hints.get(k)}
        if str in kinds or not kinds & {int, float}:
            out[k] = v
            continue

        def num(x, k=k, kinds=kinds):
            if isinstance(x, str):
                try:
                    x = float(x)
                except ValueError:
                    raise ConfigError(f"{src}: {section}.{k} must be a number (got {x!r})") from None
            whole = isinstance(x, float) and x.is_integer()
            return int(x) if whole and int in kinds and float not in kinds else x
        out[k] = [num(x) for x in v] if isinstance(v, list) else num(v)
    return out


def load_config(path: str | Path) -> dict:
    """Read and validate a rounds YAML before anything loads. Returns the resolved configuration (defaults filled).

    Raises ConfigError: an unknown key (top level or in a section, naming the closest valid one), a missing required
    key, a per-round list of the wrong length, a dump ``tpa_branches`` above the rollout's ``top_b``, or a numeric
    setting out of its range (OptionRangeError, the stages' own ranges in common/config.py OPTION_RANGES)."""
    src = str(path)
    given = read_config(path)
    return resolve(given, src)


def resolve(given: dict, src: str = "rounds config") -> dict:
    """``given`` (top-level keys, sections as mappings) checked and completed; see load_config."""
    check_keys(given, TOP_KEYS, "rounds", src)
    missing = [k for k in REQUIRED if given.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"{src}: rounds needs {', '.join(missing)} (`alignti config rounds` prints a template)")
    cfg = {**TOP_DEFAULTS, **{k: v for k, v in given.items() if k not in SECTION_KEYS}}
    for k in ("workdir", "teacher", "student", "data", "images", "reference_cache", "device"):
        if cfg.get(k) is not None:
            cfg[k] = str(cfg[k])
    check_ranges("rounds", cfg, src)
    for section, valid in SECTION_KEYS.items():
        values = given.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{src}: '{section}' must be a mapping of option: value (got {type(values).__name__})")
        values = {k.replace("-", "_"): v for k, v in values.items()}
        check_keys(values, valid, f"rounds {section}", src,  # the stage's options, less those rounds sets itself
                   lists=f"alignti config {SECTION_COMMAND[section]}")
        values = _numbers(section, values, src)
        cfg[section] = {**SECTION_DEFAULTS[section], **values}
        if section not in PER_ROUND:
            for k, v in values.items():
                if isinstance(v, list):
                    raise ConfigError(f"{src}: {section}.{k} cannot be a per-round list (one dump setting serves "
                                      "every round's cache)")
    for r in range(1, cfg["rounds"] + 1):
        for section in SECTION_KEYS:
            check_ranges(SECTION_COMMAND[section], section_for_round(cfg, section, r), f"{src} ({section}, round {r})")
        train = section_for_round(cfg, "train", r)
        t_train, t_dump = float(train.get("temperature", 1.0)), float(cfg["dump"].get("temperature", 1.0))
        if t_train != t_dump and not train.get("approximate_temperature"):
            raise ConfigError(f"{src}: round {r}'s train.temperature ({t_train:g}) is not dump.temperature "
                              f"({t_dump:g}), the temperature the caches hold the teacher at: set dump.temperature: "
                              f"{t_train:g} (or train.approximate_temperature: true to temper the caches as one lump)")
        top_b = section_for_round(cfg, "rollout", r).get("top_b", 4)
        branches = cfg["dump"].get("tpa_branches", 4)
        if branches > top_b:
            raise ConfigError(f"{src}: dump.tpa_branches ({branches}) is larger than round {r}'s rollout.top_b "
                              f"({top_b}); the dump needs that many student candidates per token: raise top_b or "
                              "lower tpa_branches")
    try:  # the dump's own checks (names of encodings and compressors, k against the teacher's vocabulary)
        check_dump_config(DumpConfig(teacher=cfg["teacher"], data=cfg["data"], images=cfg["images"], out="",
                                     **cfg["dump"]))
    except ValueError as e:
        raise ConfigError(f"{src} (dump): {e}") from None
    if cfg["lambda"] < 1 and cfg["reference_cache"] is None and cfg["dump"].get("tpa_branches", 4) == 0 \
            and "tpa" in str(cfg["train"].get("loss", "alignti")):
        raise ConfigError(f"{src}: train loss {cfg['train']['loss']} needs TPA statistics; dump.tpa_branches is 0")
    return cfg


def mixture_for_round(cfg: dict, r: int, ref_cache: str | None) -> tuple[list[str], list[float]]:
    """Round ``r``'s caches and weights: the reference (1 - lambda, left out at lambda 1) and the on-policy caches of
    rounds max(1, r - replay)..r, lambda split equally."""
    work = Path(cfg["workdir"])
    onp = [str(work / f"round-{q}" / "cache") for q in range(max(1, r - cfg["replay"]), r + 1)]
    lam = float(cfg["lambda"])
    caches, weights = [], []
    if lam < 1:
        caches.append(ref_cache)
        weights.append(1.0 - lam)
    caches += onp
    weights += [lam / len(onp)] * len(onp)
    return caches, weights


def _final_complete(final: Path) -> bool:
    """A run's ``final/`` with its config, weights and tokenizer (save_pretrained + the processor, written last)."""
    return ((final / "config.json").is_file() and any(final.glob("*.safetensors*"))
            and (final / "tokenizer_config.json").is_file())


class _State:
    """``WORK/rounds.json``: each stage's state (done / skipped as done earlier) and seconds, written atomically."""

    def __init__(self, work: Path):
        self.path = work / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"stages": {}}

    def record(self, name: str, **info) -> None:
        self.data["stages"][name] = {**self.data["stages"].get(name, {}), **info}
        atomic_write_json(self.path, self.data)

    def note_change(self, change: dict) -> None:
        """A change of settings taken for stages not yet finished (``_freeze``), in ``changes``, oldest first."""
        self.data.setdefault("changes", []).append(change)
        atomic_write_json(self.path, self.data)


STAGE_KINDS = ("rollout", "dump", "train")  # a round's stages, in order; round 0 has its reference "dump" alone
_STAGE_COMMAND = {"rollout": "rollout", "dump": "dump-teacher", "train": "train-student"}
_STAGE_FOLDER = {"rollout": "rollout", "dump": "cache", "train": "run"}


def stage_name(r: int, kind: str) -> str:
    """A stage's name in the log and ``rounds.json`` ("round 1 rollout", "round 0 dump-teacher (reference)")."""
    return f"round {r} {_STAGE_COMMAND[kind]}" + (" (reference)" if r == 0 else "")


def stage_folder(work: Path, r: int, kind: str) -> Path:
    return Path(work) / f"round-{r}" / _STAGE_FOLDER[kind]


def _order(r: int, kind: str) -> tuple[int, int]:
    """Where a stage runs: (round, index in STAGE_KINDS); round 0's reference dump first, at (0, 0)."""
    return (r, STAGE_KINDS.index(kind)) if r else (0, 0)


def stage_done(folder: Path, kind: str) -> bool:
    """Whether a stage's folder says it is finished: a rollout's ``rollout.json``, a cache's ``manifest.json``, a
    run's complete ``final/``."""
    if kind == "rollout":
        return (folder / ROLLOUT_MANIFEST).is_file()
    if kind == "dump":
        return (folder / MANIFEST_FILE).is_file()
    return _final_complete(folder / "final")


def _reference(cfg: dict) -> str:
    return str(Path(cfg["reference_cache"]).resolve()) if cfg.get("reference_cache") else \
        str((Path(cfg["workdir"]) / "round-0" / "cache").resolve())


def _changes(old: dict, cfg: dict) -> dict[str, tuple[int, int]]:
    """Each setting that differs between the configuration a workdir was started with (``old``) and ``cfg``, with
    the first stage it reaches (``_order``); every later stage depends on that one. ``device`` reaches none (the same
    work on another device); ``rounds`` none by itself (its per-round values are compared round by round); a
    per-round section setting reaches that round's stage first."""
    get = lambda c, k: c.get(k, TOP_DEFAULTS.get(k))  # noqa: E731 - a key added later: its default
    dumped_here = old.get("reference_cache") is None or cfg.get("reference_cache") is None
    first = {"data": (0, 0), "images": (0, 0), "teacher": (0, 0) if dumped_here else (1, 1), "student": (1, 0),
             "lambda": (1, 2), "replay": (1, 2), "nproc": (1, 2)}
    out: dict[str, tuple[int, int]] = {}
    for k, at in first.items():
        if get(old, k) != get(cfg, k):
            out[k] = at
    if _reference(old) != _reference(cfg):
        out["reference_cache"] = (1, 2)
    if (old.get("dump") or {}) != cfg["dump"]:
        out["dump"] = (0, 0) if dumped_here else (1, 1)
    for section, kind in (("rollout", 0), ("train", 2)):
        olds = {"rounds": old.get("rounds", 0), section: old.get(section) or {}}
        for r in range(1, min(int(old.get("rounds", 0)), cfg["rounds"]) + 1):
            try:
                was = section_for_round(olds, section, r)
            except ConfigError:
                was = None
            if was != section_for_round(cfg, section, r):
                out[section] = (r, kind)
                break
    return out


def _freeze(cfg: dict, work: Path, src: str) -> dict | None:
    """Write the configuration the work is run with (``WORK/rounds.yaml``). Against the one it was started with,
    a changed setting is taken when every stage it reaches is unfinished (``_changes``; a larger or smaller
    ``rounds`` always): the folders of those stages that hold partial work made with the old settings are set aside
    (renamed ``NAME.before-TIME``), and the change is returned ({"settings": {key: {"was", "now"}}, "from_stage",
    "set_aside", "time"}) for ``rounds.json``. A change that reaches a finished stage raises ConfigError naming the
    settings and the stages, and how to go on: the old settings, deleting those stages' folders, or a new workdir
    that keeps the finished reference cache (``reference_cache:``) where the change leaves it valid."""
    frozen = work / FROZEN_FILE
    change = None
    if frozen.is_file():
        old = yaml.safe_load(frozen.read_text(encoding="utf-8")) or {}
        changed = _changes(old, cfg)
        if changed:
            at = min(changed.values())
            stages = ([(0, "dump")] if cfg["reference_cache"] is None or old.get("reference_cache") is None else [])
            stages += [(r, k) for r in range(1, max(cfg["rounds"], int(old.get("rounds", 0))) + 1)
                       for k in STAGE_KINDS]
            reached = [(r, k) for r, k in stages if _order(r, k) >= at]
            finished = [(r, k) for r, k in reached if stage_done(stage_folder(work, r, k), k)]
            keys = ", ".join(sorted(changed))
            if finished:
                ref = stage_folder(work, 0, "dump")
                keep = (f"; or start a new workdir that keeps the finished teacher work here: reference_cache: {ref}"
                        if stage_done(ref, "dump") and not {"teacher", "data", "images", "dump"} & set(changed)
                        else "; or choose a new workdir")
                folders = ", ".join(str(stage_folder(work, r, k)) for r, k in finished)
                raise ConfigError(f"{src}: {work} holds finished stages made with other settings ({keys}; see "
                                  f"{frozen}): the change reaches {', '.join(stage_name(r, k) for r, k in finished)}. "
                                  f"Run with the settings they were made with to resume; or delete {folders} to redo "
                                  f"them with the new settings (stages before them are kept){keep}")
            stamp = time.strftime("%Y%m%dT%H%M%S")
            aside = []
            for r, k in reached:
                folder = stage_folder(work, r, k)
                if folder.exists():  # partial work made with the old settings: kept, out of the way
                    target = folder.with_name(f"{folder.name}.before-{stamp}")
                    folder.rename(target)
                    aside.append(str(target))
            change = {"settings": {k: {"was": old.get(k, TOP_DEFAULTS.get(k)), "now": cfg.get(k)} for k in changed},
                      "from_stage": stage_name(*reached[0]) if reached else None, "set_aside": aside, "time": stamp}
            log.warning("%s: settings changed since %s was started (%s): taken from %s on, no stage of it had "
                        "finished%s", src, work, keys, change["from_stage"],
                        f"; partial work set aside: {', '.join(aside)}" if aside else "")
        if cfg["rounds"] < old.get("rounds", 0):
            log.info("%s was started for %d rounds; running only the first %d", work, old["rounds"], cfg["rounds"])
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(frozen, yaml.safe_dump(cfg, sort_keys=False))
    return change


class StageFailed(AlignTIError):
    """A stage run as its own command (``nproc`` > 1) exited non-zero; its own messages were printed above."""


def stage_command(command: str, stage_cfg, config_path: Path, nproc: int) -> list[str]:
    """Write ``stage_cfg`` (a RolloutConfig, DumpConfig or TrainConfig) to ``config_path`` as the command's --config
    YAML (every field that is a flag; ``progress`` and ``eval_every`` are python-only) and return the command line that
    runs it with ``nproc`` processes: ``[python, -m, alignti, COMMAND, --config, PATH, --nproc, N]`` (the command hands
    itself to torchrun)."""
    values = {k: v for k, v in asdict(stage_cfg).items() if k not in _API_ONLY}
    config_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, f"# alignti rounds: the {command} stage, run as `alignti {command} --config "
                      f"{config_path.name} --nproc {nproc}`\n" + yaml.safe_dump(values, sort_keys=False))
    return [sys.executable, "-m", "alignti", command, "--config", str(config_path), "--nproc", str(nproc)]


def _run_command(argv: list[str], name: str, folder: Path) -> None:
    """Run a stage's command line with this alignti importable first (the same code as this process); raise
    StageFailed naming the stage and its folder when it exits non-zero."""
    import alignti
    env = dict(os.environ)
    root = str(Path(alignti.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log.info("%s: %s", name, " ".join(argv[1:]))
    code = subprocess.call(argv, env=env)
    if code != 0:
        raise StageFailed(f"{name} failed (exit code {code}; its messages are above); {folder} keeps what it "
                          "finished: fix the cause and re-run the same alignti rounds command to resume")


def run_rounds(cfg: dict, src: str = "rounds config", progress: bool = True) -> dict:
    """Run (or resume) every round of a resolved rounds configuration (``resolve`` / ``load_config``).

    Returns ``{"reference_cache", "rounds": [{"round", "rollout", "cache", "run", "final", "caches", "weights"}],
    "final"}`` with the last round's ``final/`` as ``final``. Raises what the stages raise (their errors name the
    stage's folder); a stage that fails leaves its folder resumable by the same command."""
    work = Path(cfg["workdir"])
    change = _freeze(cfg, work, src)
    state = _State(work)
    if change:  # settings changed for stages not yet finished: recorded beside the stages' states
        state.note_change(change)
    device = cfg["device"]
    nproc = int(cfg.get("nproc") or 1)

    def launch(command: str, stage_cfg, fn, name: str, folder: Path, rdir: Path) -> None:
        """The stage in this process (nproc 1), or as its own command under torchrun with nproc processes."""
        if nproc == 1:
            fn(stage_cfg)
        else:
            _run_command(stage_command(command, stage_cfg, rdir / f"{command}.yaml", nproc), name, folder)

    def stage(name: str, done, run) -> None:
        if done():
            log.info("%s: already done, skipped", name)
            state.record(name, status="done")
            return
        log.info("%s: running", name)
        t0 = time.perf_counter()
        state.record(name, status="running")
        run()
        secs = time.perf_counter() - t0
        state.record(name, status="done", seconds=round(secs, 1))
        log.info("%s: done in %.1f s", name, secs)

    ref = cfg["reference_cache"]
    if ref is None:
        ref = str(stage_folder(work, 0, "dump"))
        dump_cfg = DumpConfig(teacher=cfg["teacher"], data=cfg["data"], images=cfg["images"], out=ref, device=device,
                              progress=progress, **cfg["dump"])
        stage(stage_name(0, "dump"), lambda: stage_done(Path(ref), "dump"),
              lambda: launch("dump-teacher", dump_cfg, dump_teacher, "round 0 dump-teacher", Path(ref),
                             work / "round-0"))

    results = []
    student = cfg["student"]
    prev_run = None
    for r in range(1, cfg["rounds"] + 1):
        rdir = work / f"round-{r}"
        roll_dir, cache_dir, run_dir = (stage_folder(work, r, k) for k in STAGE_KINDS)
        roll_student = student if prev_run is None else str(prev_run / "final")
        roll_cfg = RolloutConfig(student=roll_student, data=cfg["data"], images=cfg["images"], out=str(roll_dir),
                                 round=r, device=device, progress=progress, **section_for_round(cfg, "rollout", r))
        stage(stage_name(r, "rollout"), lambda: stage_done(roll_dir, "rollout"),
              lambda: launch("rollout", roll_cfg, rollout, f"round {r} rollout", roll_dir, rdir))

        dump_cfg = DumpConfig(teacher=cfg["teacher"], data=str(roll_dir), images=cfg["images"], out=str(cache_dir),
                              device=device, progress=progress, **cfg["dump"])
        stage(stage_name(r, "dump"), lambda: stage_done(cache_dir, "dump"),
              lambda: launch("dump-teacher", dump_cfg, dump_teacher, f"round {r} dump-teacher", cache_dir, rdir))

        caches, weights = mixture_for_round(cfg, r, ref)
        train_values = section_for_round(cfg, "train", r)

        def train(caches=caches, weights=weights, run_dir=run_dir, init=prev_run, values=train_values):
            final = run_dir / "final"
            if final.exists():  # written only partly (killed while saving): set aside, the checkpoint continues
                aside = run_dir / f"final.incomplete-{int(time.time())}"
                log.warning("%s is incomplete (interrupted while saving); moved to %s", final, aside)
                final.rename(aside)
            resume = (run_dir / "checkpoint" / "state.pt").is_file()
            if resume:
                log.info("round %d train-student: continuing %s from its checkpoint", r, run_dir)
            train_cfg = TrainConfig(student=student, cache=caches if len(caches) > 1 else caches[0],
                                    cache_weights=weights if len(caches) > 1 else None, out=str(run_dir),
                                    init=str(init) if init is not None else None, resume=resume, device=device,
                                    images=cfg["images"], progress=progress, **values)
            launch("train-student", train_cfg, train_student, f"round {r} train-student", run_dir, run_dir.parent)

        stage(stage_name(r, "train"), lambda: stage_done(run_dir, "train"), train)
        results.append({"round": r, "rollout": str(roll_dir), "cache": str(cache_dir), "run": str(run_dir),
                        "final": str(run_dir / "final"), "caches": caches, "weights": weights})
        prev_run = run_dir
    return {"reference_cache": ref, "rounds": results, "final": results[-1]["final"]}
