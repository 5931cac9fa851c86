"""Config files: `--config FILE.yaml` for dump-teacher, train-student and quickstart; flags override the file; an
unknown key names the closest valid one; every run writes its resolved config and re-running from it reproduces
the run; `alignti config COMMAND` prints a commented template (and `--from` a cache's or run's own settings)."""

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from alignti.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _text(res) -> str:
    return " ".join(res.output.split())  # the log handler wraps long lines


def test_templates_list_every_option_with_its_default():
    for command, required in [("dump-teacher", "teacher"), ("train-student", "student"), ("quickstart", None)]:
        res = _invoke("config", command)
        assert res.exit_code == 0, res.output
        values = yaml.safe_load(res.output)
        flags = {p.name for p in __import__("typer").main.get_command(app).commands[command].params} - {"config"}
        assert flags <= set(values), flags - set(values)
        if required:
            assert values[required] is None and "(required)" in res.output
    tmpl = yaml.safe_load(_invoke("config", "train-student").output)
    assert tmpl["loss"] == "kd" and tmpl["lr"] == 1e-3 and tmpl["group_by_length"] is True
    assert tmpl["checkpoint_every"] == 1 and tmpl["max_grad_norm"] == 1.0
    dump = yaml.safe_load(_invoke("config", "dump-teacher").output)
    # the defaults a real teacher gets (bench/README.md, "Real LM", "Choice"): k resolved against the teacher's
    # vocabulary at run time (null here), the packed encoding; the flags' defaults are DumpConfig's
    from alignti.teacher_dump.dump import DEFAULT_LOGPROB_ENCODING, DumpConfig
    assert dump["top_k"] is None and dump["tpa_top_k"] is None and dump["logprob_encoding"] == "packed"
    api = DumpConfig(teacher="T", data="D", images=None, out="O")
    assert api.top_k is None and api.tpa_top_k is None and api.logprob_encoding == DEFAULT_LOGPROB_ENCODING
    out = _invoke("config", "dump-teacher").output
    assert "[default: 64, or the teacher's vocabulary if smaller].\n# null: that default.\ntop_k: null" in out
    from alignti.common.codecs import DEFAULT_TAIL_KL
    assert dump["packed_kl"] == DEFAULT_TAIL_KL  # the flag's default is the codec's (cli.py avoids importing it)
    qs = yaml.safe_load(_invoke("config", "quickstart").output)
    assert qs["methods"] == ["sft", "kd", "kd+iva", "kd+tpa", "alignti"] and qs["overrides"] == {}
    assert "# Top-k log-probs kept per response token." in _invoke("config", "dump-teacher").output


def test_unknown_key_names_the_closest_valid_one(kit, tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text(f"teacher: {kit / 'teacher'}\ntop-kk: 16\n")
    res = _invoke("dump-teacher", "--config", f, "--data", kit / "data/train.json", "--images", kit / "data/images",
                  "--out", tmp_path / "c")
    assert res.exit_code == 2
    assert "unknown option 'top_kk' for dump-teacher; did you mean 'top_k'?" in _text(res)
    assert not (tmp_path / "c").exists()
    f.write_text("loss: [kd\n")
    res = _invoke("train-student", "--config", f)
    assert res.exit_code == 2 and "is not valid YAML at line 2" in _text(res)
    f.write_text("lr: fast\n")
    res = _invoke("train-student", "--config", f)
    assert res.exit_code == 2 and "d.yaml: option 'lr': Input should be a valid number" in _text(res)
    f.write_text("loss: kd\n")
    res = _invoke("train-student", "--config", f)
    assert res.exit_code == 2 and "train-student needs --student, --cache, --out" in _text(res)
    res = _invoke("train-student", "--config", tmp_path / "nope.yaml")
    assert res.exit_code == 2 and "does not exist" in _text(res)


def test_quickstart_settings_are_checked_before_any_work(tmp_path):
    from alignti.common.config import ConfigError
    from alignti.demo.quickstart import QuickstartConfig, quickstart
    with pytest.raises(ConfigError, match="unknown option 'student_step' for quickstart; did you mean 'student_steps'"):
        quickstart(QuickstartConfig(workdir=str(tmp_path / "q"), overrides={"student_step": 10}))
    with pytest.raises(ConfigError, match="unknown method"):
        quickstart(QuickstartConfig(workdir=str(tmp_path / "q"), methods=("kd", "kdd")))
    f = tmp_path / "q.yaml"
    f.write_text("seeds: 1\nmethod: [kd]\n")
    res = _invoke("quickstart", "--config", f, "--workdir", tmp_path / "q")
    assert res.exit_code == 2 and "unknown option 'method' for quickstart; did you mean 'methods'?" in _text(res)


def test_flags_override_the_file_and_the_written_config_reproduces_the_run(kit, cache, tmp_path):
    f = tmp_path / "train.yaml"
    f.write_text(yaml.safe_dump({"student": str(kit / "student"), "cache": str(cache), "out": str(tmp_path / "x"),
                                 "loss": "sft", "max-steps": 3, "batch_size": 4, "lr": 0.003, "save_every": 100,
                                 "gradient_checkpointing": True}))
    # flags win over the file: --loss and --out
    res = _invoke("train-student", "--config", f, "--loss", "alignti", "--out", tmp_path / "a")
    assert res.exit_code == 0, res.output[-2000:]
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert written["loss"] == "alignti" and written["max_steps"] == 3 and written["batch_size"] == 4
    assert written["out"] == str(tmp_path / "a") and written["gradient_checkpointing"] is True
    assert not (tmp_path / "x").exists()
    # the run again from its own config file (a new run directory): the same weights, bit for bit
    res = _invoke("train-student", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output[-2000:]
    a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    shown = _invoke("config", "train-student", "--from", tmp_path / "a")
    assert yaml.safe_load(shown.output) == written


def test_dump_settings_come_back_from_the_cache(kit, tmp_path):
    f = tmp_path / "dump.yaml"
    f.write_text(yaml.safe_dump({"teacher": str(kit / "teacher"), "data": str(kit / "data/train.json"),
                                 "images": str(kit / "data/images"), "out": str(tmp_path / "c1"), "limit": 6,
                                 "top_k": 16, "irs_samples": 4, "tpa_branches": 2, "logprob_encoding": "uint8"}))
    assert _invoke("dump-teacher", "--config", f, "--top-k", 8).exit_code == 0
    res = _invoke("config", "dump-teacher", "--from", tmp_path / "c1")
    assert res.exit_code == 0, res.output
    made = yaml.safe_load(res.output)
    assert made["top_k"] == 8 and made["tpa_branches"] == 2 and made["logprob_encoding"] == "uint8"
    assert made["limit"] == 6 and made["out"] == str(tmp_path / "c1")
    (tmp_path / "again.yaml").write_text(res.output)
    assert _invoke("dump-teacher", "--config", tmp_path / "again.yaml", "--out", tmp_path / "c2").exit_code == 0
    from alignti.common.cache import CacheReader
    r1, r2 = CacheReader(str(tmp_path / "c1")), CacheReader(str(tmp_path / "c2"))
    assert r1.manifest["counts"] == r2.manifest["counts"] and r1.params == r2.params
    assert r1.manifest["dump_config"] == {**r2.manifest["dump_config"], "out": str(tmp_path / "c1")}


def test_yaml_numbers_are_read_as_the_command_line_takes_them(tmp_path):
    """YAML 1.1 (PyYAML's default) reads 3e-4 and 1e5 as strings; config files read them as numbers (YAML 1.2), so
    quickstart's overrides and rounds' sections, which no click parameter converts, get numbers too."""
    from alignti.common.config import read_config
    from alignti.workflows.rounds import _numbers
    p = tmp_path / "c.yaml"
    p.write_text("lr: 3e-4\nbig: 1e5\nplain: 0.5\ncount: 10\nquoted: '3e-4'\nversion: 1.0.2\n")
    got = read_config(p)
    assert got == {"lr": 3e-4, "big": 1e5, "plain": 0.5, "count": 10, "quoted": "3e-4", "version": "1.0.2"}
    assert type(got["big"]) is float and type(got["count"]) is int
    n = _numbers("train", {"lr": "3e-4", "max_steps": 1e5, "seed": [2.0, "3"], "loss": "kd"}, "f")
    assert n == {"lr": 3e-4, "max_steps": 100000, "seed": [2, 3], "loss": "kd"} and type(n["max_steps"]) is int
