"""alignti rounds: the YAML checked up front, and 2 rounds of the demo end to end on a tiny kit, killed (kill -9 in
round 1's training) and finished by the same command without redoing a finished stage; settings changed for stages
not yet finished (a diverged round at a lower lr), finished stages kept, and the hint of a refused key runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.cache import CacheReader
from alignti.common.config import ConfigError, OptionRangeError
from alignti.workflows.rounds import load_config, mixture_for_round, template

runner = CliRunner()


def _yaml(path, **over):
    cfg = yaml.safe_load(template())
    cfg.update(teacher="T", student="S", data="D")
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_template_loads_and_bad_configs_are_named(tmp_path):
    res = runner.invoke(app, ["config", "rounds"])
    assert res.exit_code == 0 and "lambda:" in res.output and "replay:" in res.output
    cfg = load_config(_yaml(tmp_path / "ok.yaml", rollout={"temperature": [1.0, 0.7]}))
    assert cfg["train"]["loss"] == "alignti" and cfg["rounds"] == 2
    caches, weights = mixture_for_round({**cfg, "workdir": "W", "replay": 1}, 3, "REF")
    assert caches == ["REF", "W/round-2/cache", "W/round-3/cache"] and weights == [0.5, 0.25, 0.25]
    bad = {"lamda": 0.5}
    with pytest.raises(ConfigError, match="'lamda'.*did you mean 'lambda'"):
        load_config(_yaml(tmp_path / "a.yaml", **bad))
    with pytest.raises(ConfigError, match="'temprature'.*'temperature'"):
        load_config(_yaml(tmp_path / "b.yaml", rollout={"temprature": 1.0}))
    with pytest.raises(ConfigError, match="one value per round"):
        load_config(_yaml(tmp_path / "c.yaml", train={"max_steps": [1, 2, 3]}))
    with pytest.raises(ConfigError, match="tpa_branches"):
        load_config(_yaml(tmp_path / "d.yaml", dump={"tpa_branches": 8}))
    with pytest.raises(OptionRangeError, match="lambda must be in \\(0, 1\\]"):
        load_config(_yaml(tmp_path / "e.yaml", **{"lambda": 0}))
    with pytest.raises(OptionRangeError, match="top-p"):
        load_config(_yaml(tmp_path / "f.yaml", rollout={"top_p": [1.0, 1.5]}))
    with pytest.raises(ConfigError, match="needs teacher"):
        load_config(_yaml(tmp_path / "g.yaml", teacher=None))
    res = runner.invoke(app, ["rounds", "--config", str(tmp_path / "a.yaml")])
    assert res.exit_code == 2 and not (tmp_path / "rounds").exists()


def _mtimes(work):
    names = ["round-0/cache/manifest.json", "round-1/rollout/rollout.json", "round-1/cache/manifest.json"]
    return {n: os.stat(work / n).st_mtime_ns for n in names}


def test_numbers_yaml_reads_as_strings_and_dump_typos_are_refused_up_front(tmp_path):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string: rounds takes it as the number the command line would. A dump
    setting the dump itself would refuse (an encoding's name, a k above the teacher's vocabulary) is refused when the
    YAML is read, naming the file, before a workdir is written."""
    from alignti.demo import kit as demo_kit
    from alignti.common.saving import save_checkpoint
    tok = demo_kit.build_tokenizer()
    teacher = tmp_path / "teacher"  # only its config is read
    model = demo_kit.build_model("llava", tok, demo_kit.STUDENT, 0)
    save_checkpoint(model, demo_kit.build_processor(tok), teacher)
    text = _yaml(tmp_path / "n.yaml").read_text().replace("teacher: T", f"teacher: {teacher}")
    path = tmp_path / "n.yaml"
    path.write_text(text + "\n")
    raw = yaml.safe_load(path.read_text())
    raw["train"]["lr"], raw["dump"]["packed_kl"] = "3e-4", "4e-5"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "3e-4"  # what YAML gives
    cfg = load_config(path)
    assert cfg["train"]["lr"] == 3e-4 and cfg["dump"]["packed_kl"] == 4e-5
    raw["train"]["lr"] = "fast"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=r"n.yaml: train.lr must be a number \(got 'fast'\)"):
        load_config(path)
    raw["train"]["lr"] = 3e-4
    vocab = len(tok)
    for dump, what in (({"logprob_encoding": "pakced"}, "--logprob-dtype must be one of"),
                       ({"top_k": vocab + 1}, f"--top-k {vocab + 1} is larger than the teacher's vocabulary of {vocab} tokens")):
        raw["dump"] = {**raw["dump"], **dump}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        with pytest.raises(ConfigError, match=rf"n.yaml \(dump\): {what}"):
            load_config(path)
        raw["dump"] = {k: v for k, v in raw["dump"].items() if k not in dump}


def test_two_rounds_end_to_end_killed_and_resumed(tmp_path):
    from alignti.demo.kit import make_demo
    kit = tmp_path / "kit"
    make_demo(kit, n_train=2, n_val=1, n_test=1, train_teacher=False)
    items = [it for it in json.loads((kit / "data/train.json").read_text()) if len(it["conversations"]) == 2][:4]
    (tmp_path / "d.json").write_text(json.dumps(items))
    work = tmp_path / "work"
    path = _yaml(tmp_path / "rounds.yaml", workdir=str(work), teacher=str(kit / "teacher"),
                 student=str(kit / "student"), data=str(tmp_path / "d.json"), images=str(kit / "data/images"),
                 device="cpu", replay=1, **{"lambda": 0.5},
                 rollout={"max_new_tokens": 4, "batch_size": 4, "top_b": 2, "temperature": [1.0, 0.7]},
                 dump={"top_k": 8, "tpa_branches": 2, "tpa_top_k": 4, "irs_samples": 2, "batch_size": 4},
                 train={"max_steps": 2, "batch_size": 2, "save_every": 1, "warmup_steps": 1})
    # kill -9 after round 1's second optimizer step, before its checkpoint (step 1's is on disk)
    env = {**os.environ, "ALIGNTI_CRASH_AT": "train-step:2"}
    proc = subprocess.run([sys.executable, "-m", "alignti", "rounds", "--config", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (work / "round-1/run/checkpoint/state.pt").is_file() and not (work / "round-1/run/final").exists()
    before = _mtimes(work)

    res = runner.invoke(app, ["rounds", "--config", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    assert _mtimes(work) == before  # the finished rollout and dumps were not redone
    out = json.loads(res.output[res.output.index("{"):])
    assert out["final"] == str(work / "round-2/run/final") and (work / "round-2/run/final/config.json").is_file()
    steps = [json.loads(x)["step"] for x in (work / "round-1/run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # resumed from step 1's checkpoint; no step twice
    r2 = out["rounds"][1]
    assert r2["caches"] == [str(work / "round-0/cache"), str(work / "round-1/cache"), str(work / "round-2/cache")]
    assert r2["weights"] == [0.5, 0.25, 0.25]
    run2 = yaml.safe_load((work / "round-2/run/config.yaml").read_text())
    assert run2["init"] == str(work / "round-1/run") and run2["cache_weights"] == [0.5, 0.25, 0.25]
    roll2 = json.loads((work / "round-2/rollout/rollout.json").read_text())
    assert roll2["round"] == 2 and roll2["settings"]["temperature"] == 0.7 and roll2["settings"]["seed"] == 1
    assert CacheReader(str(work / "round-2/cache")).manifest["tpa_candidates"]["by"] == "student"
    state = json.loads((work / "rounds.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in state.values()) and len(state) == 7

    made = runner.invoke(app, ["config", "rounds", "--from", str(work)])
    assert made.exit_code == 0 and yaml.safe_load(made.output)["lambda"] == 0.5
    # a third run does nothing; other settings are refused by name
    res = runner.invoke(app, ["rounds", "--config", str(path)], catch_exceptions=False)
    assert res.exit_code == 0 and _mtimes(work) == before
    other = _yaml(tmp_path / "other.yaml", **{**yaml.safe_load(path.read_text()), "replay": 0})
    res = runner.invoke(app, ["rounds", "--config", str(other)])
    assert res.exit_code == 2 and "replay" in res.output


def test_nproc_runs_each_stage_as_its_command(tmp_path, monkeypatch):
    """nproc 2: every stage is `python -m alignti COMMAND --config WORK/round-r/COMMAND.yaml --nproc 2`. Each command
    line is parsed here by the CLI's own option handling (what the torchrun ranks would run) and that stage config is
    run in this process, so the YAML round trip is checked end to end without paying for torchrun's launches."""
    import typer

    from alignti import cli
    from alignti.demo.kit import make_demo
    from alignti.student_rollout.rollout import RolloutConfig, rollout
    from alignti.student_train.trainer import TrainConfig, train_student
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    from alignti.workflows import rounds as rounds_mod

    kit = tmp_path / "kit"
    make_demo(kit, n_train=2, n_val=1, n_test=1, train_teacher=False)
    items = [it for it in json.loads((kit / "data/train.json").read_text()) if len(it["conversations"]) == 2][:3]
    (tmp_path / "d.json").write_text(json.dumps(items))
    work = tmp_path / "work"
    cfg = load_config(_yaml(tmp_path / "rounds.yaml", workdir=str(work), teacher=str(kit / "teacher"),
                            student=str(kit / "student"), data=str(tmp_path / "d.json"), images=str(kit / "data/images"),
                            device="cpu", rounds=1, nproc=2,
                            rollout={"max_new_tokens": 3, "batch_size": 4, "top_b": 2},
                            dump={"top_k": 8, "tpa_branches": 2, "tpa_top_k": 4, "irs_samples": 2, "batch_size": 4},
                            train={"max_steps": 1, "batch_size": 2, "save_every": 1, "warmup_steps": 1}))
    assert cfg["nproc"] == 2
    run = {"rollout": (RolloutConfig, rollout), "dump-teacher": (DumpConfig, dump_teacher),
           "train-student": (TrainConfig, train_student)}
    seen = []

    def as_the_cli_runs_it(argv, name, folder):
        assert argv[:3] == [sys.executable, "-m", "alignti"] and argv[-2:] == ["--nproc", "2"], argv
        command = argv[3]
        click_cmd = typer.main.get_command(cli.app).commands[command]
        ctx = click_cmd.make_context(command, argv[4:])
        values = cli._resolve(ctx, ctx.params["config"], required=cli._REQUIRED[command])
        assert values.pop("nproc") == 2
        cls, fn = run[command]
        stage_cfg = cls(**{k: str(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}, progress=False)
        seen.append((command, argv[5], stage_cfg))
        fn(stage_cfg)

    monkeypatch.setattr(rounds_mod, "_run_command", as_the_cli_runs_it)
    out = rounds_mod.run_rounds(cfg, progress=False)
    assert [(c, p) for c, p, _ in seen] == [
        ("dump-teacher", str(work / "round-0/dump-teacher.yaml")), ("rollout", str(work / "round-1/rollout.yaml")),
        ("dump-teacher", str(work / "round-1/dump-teacher.yaml")), ("train-student", str(work / "round-1/train-student.yaml"))]
    roll, train = seen[1][2], seen[3][2]
    assert roll.round == 1 and roll.top_b == 2 and roll.max_new_tokens == 3 and roll.out == str(work / "round-1/rollout")
    assert seen[2][2].data == str(work / "round-1/rollout") and seen[2][2].tpa_branches == 2
    assert train.cache == [str(work / "round-0/cache"), str(work / "round-1/cache")]
    assert [float(w) for w in train.cache_weights] == [0.5, 0.5] and train.loss == "alignti" and train.max_steps == 1
    assert (work / "round-1/run/final/config.json").is_file() and out["final"] == str(work / "round-1/run/final")


def _finish(folder, kind):
    """Mark a stage folder finished as its stage does (rollout.json, a cache's manifest.json, a complete final/)."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "train":
        for f in ("final/config.json", "final/model.safetensors", "final/tokenizer_config.json"):
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("{}")
    else:
        (folder / ("rollout.json" if kind == "rollout" else "manifest.json")).write_text("{}")


def test_settings_of_unfinished_stages_may_change_finished_stages_are_kept(tmp_path):
    """After a round's training stopped (diverged, say), its settings may change: the stages the change reaches are
    all unfinished, so it is taken, the stopped run's partial folder set aside and the change returned for
    rounds.json; finished stages stay as they are. A change that reaches a finished stage is refused naming it, how
    to redo it and how to keep the finished teacher work in a new workdir (reference_cache:)."""
    from alignti.workflows.rounds import _freeze
    work = tmp_path / "work"
    cfg = load_config(_yaml(tmp_path / "a.yaml", workdir=str(work)))
    assert _freeze(cfg, work, "a.yaml") is None
    for r, kind, folder in ((0, "dump", "cache"), (1, "rollout", "rollout"), (1, "dump", "cache")):
        _finish(work / f"round-{r}/{folder}", kind)
    (work / "round-1/run/checkpoint").mkdir(parents=True)
    (work / "round-1/run/checkpoint/state.pt").write_text("step 7, diverged")
    lower = load_config(_yaml(tmp_path / "b.yaml", workdir=str(work), train={"lr": 1e-4}))
    change = _freeze(lower, work, "b.yaml")
    assert change["settings"] == {"train": {"was": cfg["train"], "now": lower["train"]}}
    assert change["from_stage"] == "round 1 train-student" and not (work / "round-1/run").exists()
    aside, = change["set_aside"]
    assert aside.startswith(str(work / "round-1/run.before-")) and (Path(aside) / "checkpoint/state.pt").is_file()
    assert yaml.safe_load((work / "rounds.yaml").read_text())["train"]["lr"] == 1e-4
    assert all((work / f).is_file() for f in ("round-0/cache/manifest.json", "round-1/rollout/rollout.json"))
    # round 2's rollout only (a per-round list whose round-1 value is unchanged): no stage of it has run
    later = load_config(_yaml(tmp_path / "c.yaml", workdir=str(work), train={"lr": 1e-4},
                              rollout={"temperature": [1.0, 0.5]}))
    assert _freeze(later, work, "c.yaml")["from_stage"] == "round 2 rollout"
    assert _freeze(dict(later, device="cpu"), work, "c.yaml") is None  # another device reaches no stage
    _finish(work / "round-1/run", "train")
    with pytest.raises(ConfigError, match=r"finished stages made with other settings \(train; .*reaches round 1 "
                                          r"train-student\. .*delete .*round-1/run to redo .*reference_cache: "
                                          r".*round-0/cache"):
        _freeze(load_config(_yaml(tmp_path / "d.yaml", workdir=str(work), train={"lr": 1e-5},
                                  rollout={"temperature": [1.0, 0.5]})), work, "d.yaml")
    with pytest.raises(ConfigError, match=r"\(teacher; .*round 0 dump-teacher \(reference\), round 1 rollout.*"
                                          r"choose a new workdir$"):  # the reference cache is the old teacher's
        _freeze(dict(later, device="cpu", teacher="T2"), work, "e.yaml")


def test_a_diverged_round_trains_again_at_a_lower_lr(tmp_path):
    """The whole path: round 1's training diverges at lr 1e9 (train-student stops at the non-finite step); the user
    lowers lr in rounds.yaml and runs the same command: round 0's dump and round 1's rollout and dump are not redone,
    the diverged run is set aside, round 1 trains at the new lr, and rounds.json records the change."""
    from alignti.demo.kit import make_demo
    kit = tmp_path / "kit"
    make_demo(kit, n_train=2, n_val=1, n_test=1, train_teacher=False)
    items = [it for it in json.loads((kit / "data/train.json").read_text()) if len(it["conversations"]) == 2][:2]
    (tmp_path / "d.json").write_text(json.dumps(items))
    work = tmp_path / "work"
    common = dict(workdir=str(work), teacher=str(kit / "teacher"), student=str(kit / "student"),
                  data=str(tmp_path / "d.json"), images=str(kit / "data/images"), device="cpu", rounds=1,
                  rollout={"max_new_tokens": 3, "batch_size": 4, "top_b": 2},
                  dump={"top_k": 8, "tpa_branches": 2, "tpa_top_k": 4, "saliency_layer": "1", "batch_size": 4})
    train = {"max_steps": 3, "batch_size": 2, "save_every": 1, "warmup_steps": 0}
    path = _yaml(tmp_path / "rounds.yaml", **common, train={**train, "lr": 1e9})
    res = runner.invoke(app, ["rounds", "--config", str(path)])
    assert res.exit_code != 0 and "non-finite" in res.output, res.output[-2000:]
    assert not (work / "round-1/run/final").exists()
    before = _mtimes(work)
    path = _yaml(tmp_path / "rounds.yaml", **common, train={**train, "lr": 1e-3})
    res = runner.invoke(app, ["rounds", "--config", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    assert _mtimes(work) == before and (work / "round-1/run/final/config.json").is_file()
    assert yaml.safe_load((work / "round-1/run/config.yaml").read_text())["lr"] == 1e-3
    change, = json.loads((work / "rounds.json").read_text())["changes"]
    assert change["settings"]["train"]["was"]["lr"] == 1e9 and change["settings"]["train"]["now"]["lr"] == 1e-3
    aside, = change["set_aside"]
    assert (Path(aside) / "checkpoint").is_dir() or (Path(aside) / "metrics.jsonl").is_file()


def test_the_hint_of_a_refused_key_is_a_command_that_runs(tmp_path):
    """A typo in rounds.yaml (top level or a section) or in a stage's --config file is refused with the command that
    lists the valid options; that command runs and lists the key meant (before: `alignti config rounds rollout`,
    "unexpected extra argument")."""
    import re
    cases = [(_yaml(tmp_path / "a.yaml", lamda=0.5), "lambda:"),
             (_yaml(tmp_path / "b.yaml", rollout={"temprature": 1.0}), "temperature:"),
             (_yaml(tmp_path / "c.yaml", dump={"tpa_brances": 2}), "tpa_branches:"),
             (_yaml(tmp_path / "d.yaml", train={"lrr": 0.1}), "lr:")]
    stage = tmp_path / "rollout.yaml"
    stage.write_text("student: S\ndata: D\nout: O\nmax_new_token: 4\n")
    for path, key in cases + [(stage, "max_new_tokens:")]:
        command = "rollout" if path == stage else "rounds"
        res = runner.invoke(app, [command, "--config", str(path)])
        assert res.exit_code == 2, res.output
        hint = re.search(r"`alignti ([^`]+)` lists every option", " ".join(res.output.split()))
        assert hint, res.output
        listed = runner.invoke(app, hint.group(1).split())
        assert listed.exit_code == 0 and key in listed.output, (hint.group(1), listed.output[-500:])
