"""`alignti evaluate --lmms-eval` and `alignti export-task` (student_train/lmms_harness.py).

The task export runs everywhere; lmms-eval itself runs in the eval env (`.venv-eval`, made by .ci/run: lmms-eval
needs torchvision, which needs its own torch), and those tests are skipped where ``lmms_eval`` does not import.
The agreement test scores the demo student on a task exported from the demo's test split with lmms-eval's own
model class (llava_hf) and with ``alignti evaluate``, and compares answer by answer."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from alignti.cli import app
from alignti.common.generate import exact_match
from alignti.common.records import Record
from alignti.common.sources import load_image, load_records

runner = CliRunner()


def _lmms_eval_imports() -> bool:
    try:
        import lmms_eval.evaluator  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or no torchvision for it
        return False
    return True


HAS_LMMS = _lmms_eval_imports()
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval does not import in this env (it needs torchvision "
                                "and its own torch): .ci/run runs these tests in .venv-eval")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo kit (LLaVA, untrained: the test compares the two harnesses answer by answer) with a test split of
    12 questions, 2 of them multi-turn."""
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp("lmms_kit")
    make_demo(out, n_train=1, n_val=1, n_test=4, train_teacher=False)
    return out


def _export(demo, tmp_path, *extra):
    res = runner.invoke(app, ["export-task", "--data", str(demo / "data/test.json"), "--images",
                              str(demo / "data/images"), "--out", str(tmp_path / "task"), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def test_export_task_holds_the_questions_and_pixels_evaluate_uses(demo, tmp_path):
    import datasets
    import numpy as np

    from alignti.common.conversation import chat_messages
    info = _export(demo, tmp_path, "--name", "shapes_test")
    assert info["task"] == "shapes_test" and (tmp_path / "task/utils.py").exists()
    rows = datasets.load_dataset("parquet", data_files={"test": info["parquet"]})["test"]
    recs = [r for r in load_records(str(demo / "data/test.json")) if isinstance(r, Record)]
    assert info["samples"] == len(recs) == len(rows) == 12
    assert sum(len(r.turns) > 2 for r in recs) >= 1  # a multi-turn sample: its history is in the messages
    for rec, row in zip(recs, rows):
        assert row["id"] == rec.sample_id and row["answer"] == rec.turns[-1][1]
        assert json.loads(row["messages"]) == chat_messages(rec, generation_prompt=True)
        img, _ = load_image(rec, demo / "data/images")
        assert len(row["images"]) == 1
        assert np.array_equal(np.asarray(row["images"][0]), np.asarray(img))  # PNG: the same pixels, bit for bit
    text = (tmp_path / "task/shapes_test.yaml").read_text()
    assert "task: shapes_test" in text and info["parquet"] in text and "max_new_tokens: 8" in text


def test_export_task_refuses_a_bad_name_in_one_line(demo, tmp_path):
    res = runner.invoke(app, ["export-task", "--data", str(demo / "data/test.json"), "--images",
                              str(demo / "data/images"), "--out", str(tmp_path / "t"), "--name", "9-bad"])
    assert res.exit_code == 2 and "--name '9-bad'" in res.output and not (tmp_path / "t").exists()


def test_evaluate_needs_data_or_lmms_eval_not_both(tmp_path):
    for args in (["--model", "M"], ["--model", "M", "--data", "D", "--lmms-eval", "t"]):
        res = runner.invoke(app, ["evaluate", *args])
        assert res.exit_code == 2 and "--lmms-eval" in res.output


@pytest.mark.skipif(HAS_LMMS, reason="checks the message where lmms-eval is missing")
def test_without_lmms_eval_the_error_names_the_install_command(demo):
    res = runner.invoke(app, ["evaluate", "--model", str(demo / "student"), "--lmms-eval", "shapes_test"])
    assert res.exit_code == 2
    assert "torchvision==0.29.1" in res.output and 'pip install "alignti[eval]"' in res.output
    assert ".venv-eval/bin/alignti evaluate" in res.output and "Traceback" not in res.output


@needs_lmms
def test_the_two_normalisations_as_documented(demo, tmp_path):
    """process_results: exact_match is lmms-eval's VQA normaliser, alignti_exact_match alignti evaluate's."""
    info = _export(demo, tmp_path)
    spec = importlib.util.spec_from_file_location("exported_utils", tmp_path / "task/utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    doc = {"answer": "2"}
    cases = {  # prediction -> (VQA normaliser's verdict, alignti's), reference "2" or "red circle"
        ("2", "2"): (1.0, 1.0), (" 2. ", "2"): (1.0, 1.0), ("two", "2"): (1.0, 0.0), ("3", "2"): (0.0, 0.0),
        ("Red circle.", "red circle"): (1.0, 1.0), ("a red circle", "red circle"): (1.0, 0.0),
        ("red, circle", "red circle"): (1.0, 0.0), ("red  circle", "red circle"): (1.0, 1.0),
    }
    for (pred, ref), (vqa, ours) in cases.items():
        doc = {"answer": ref}
        got = utils.process_results(doc, [pred])
        assert got == {"exact_match": vqa, "alignti_exact_match": ours}, (pred, ref, got)
        assert exact_match(pred, ref) == bool(ours)  # the generated copy is alignti's own function
    assert info["samples"] == 12


@needs_lmms
def test_lmms_eval_scores_the_student_as_alignti_evaluate_does(demo, tmp_path):
    """The same 12 questions through lmms-eval's llava_hf and through alignti evaluate: the same greedy answer to
    each (the untrained demo student's answers differ from image to image, so this checks prompts, pixels and
    decoding), so alignti_exact_match equals alignti's accuracy exactly; exact_match (the VQA normaliser) differs
    only on answers where the two normalisations disagree. The split's references are the student's own answer on
    every other question (the rest kept), so both accuracies are 0.5, not a trivial 0. Scores land in RUN/eval/,
    metrics.jsonl."""
    import shutil

    from alignti.common.generate import _norm
    from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
    run = tmp_path / "run"
    shutil.copytree(demo / "student", run / "final")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    (run / "config.yaml").write_text("report_to: [tensorboard]\n")  # the run's trackers get the scores too

    def alignti_evaluate(split):
        res = runner.invoke(app, ["evaluate", "--model", str(run / "final"), "--data", str(split), "--images",
                                  str(demo / "data/images"), "--device", "cpu", "--answers-out",
                                  str(tmp_path / "answers.json"), "--json"])
        assert res.exit_code == 0, res.output
        return (json.loads(res.output[res.output.index("{"):])["accuracy"],
                json.loads((tmp_path / "answers.json").read_text()))

    _, first = alignti_evaluate(demo / "data/test.json")
    items = json.loads((demo / "data/test.json").read_text())
    for i, item in enumerate(items):
        if i % 2 == 0:
            item["conversations"][-1]["value"] = first[item["id"]]
    split = tmp_path / "test_half.json"
    split.write_text(json.dumps(items))
    ours_acc, ours_answers = alignti_evaluate(split)
    assert ours_answers == first and ours_acc == 0.5
    refs = {r.sample_id: r.turns[-1][1] for r in load_records(str(split)) if isinstance(r, Record)}

    res = runner.invoke(app, ["export-task", "--data", str(split), "--images", str(demo / "data/images"), "--out",
                              str(tmp_path / "task"), "--name", "shapes_test"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(run / "final"), "--lmms-eval", "shapes_test",
                              "--include-path", str(tmp_path / "task"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads((run / "eval/lmms_eval-shapes_test.json").read_text())
    assert saved["lmms_eval_model"] == "llava_hf" and saved["samples"]["shapes_test"] == 12
    theirs = saved["answers"]["shapes_test"]
    assert set(theirs) == set(ours_answers) == set(refs)
    assert len(set(theirs.values())) > 1  # answers depend on the image and question
    for sid in refs:  # lmms-eval strips its answers' surrounding whitespace
        assert theirs[sid] == ours_answers[sid].strip(), (sid, theirs[sid], ours_answers[sid])
    scores = saved["results"]["shapes_test"]
    assert scores["alignti_exact_match"] == pytest.approx(ours_acc, abs=1e-12)
    vqa = EvalAIAnswerProcessor()
    expect = sum(vqa(theirs[s]) == vqa(refs[s]) for s in refs) / len(refs)
    assert scores["exact_match"] == pytest.approx(expect, abs=1e-12)
    differ = [s for s in refs if (vqa(theirs[s]) == vqa(refs[s])) != (_norm(theirs[s]) == _norm(refs[s]))]
    assert scores["exact_match"] - ours_acc == pytest.approx(
        sum(1 if vqa(theirs[s]) == vqa(refs[s]) else -1 for s in differ) / len(refs), abs=1e-12)
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["step"] == 5 and line["event"] == "lmms_eval"
    assert line["val_lmms_eval/shapes_test/alignti_exact_match"] == pytest.approx(ours_acc, abs=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    logged = acc.Scalars("eval/lmms_eval/shapes_test/alignti_exact_match")
    assert [(e.step, e.value) for e in logged] == [(5, pytest.approx(ours_acc, abs=1e-7))]


def test_each_family_has_lmms_eval_s_own_class():
    """The family choice sits behind the adapters: llava_hf loads transformers-format LLaVA and LLaVA-OneVision
    folders, qwen2_vl / qwen2_5_vl theirs, with the processor's pixel bounds (lmms-eval's own: 3136 / 602112)."""
    from alignti.common.adapters import adapter_class
    got = {t: adapter_class(t).lmms_eval_model(t) for t in ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl",
                                                             "qwen3_vl", "gemma3")}
    assert got == {"llava": "llava_hf", "llava_onevision": "llava_hf", "qwen2_vl": "qwen2_vl",
                   "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "gemma3": "gemma3"}
    size = {"size": {"shortest_edge": 2304, "longest_edge": 2304}}
    assert adapter_class("qwen2_vl").lmms_eval_args(size) == {"min_pixels": 2304, "max_pixels": 2304}
    assert adapter_class("llava").lmms_eval_args(size) == {}
    # LFM2-VL: lmms-eval's lfm2_5_vl class, told to load the checkpoint's own dtype (its default is bfloat16)
    assert adapter_class("lfm2_vl").lmms_eval_model("lfm2_vl") == "lfm2_5_vl"
    assert adapter_class("lfm2_vl").lmms_eval_args({}) == {"dtype": "auto"}


def _lmms_run_on_a_demo_student(family: str, tmp_path) -> dict:
    """A family's untrained demo kit, its test split exported as the lmms-eval task "q", `evaluate --lmms-eval q` on
    its student (2 samples, CPU): the saved result."""
    from alignti.demo.kit import make_demo
    make_demo(tmp_path, n_train=1, n_val=1, n_test=1, train_teacher=False, family=family)
    res = runner.invoke(app, ["export-task", "--data", str(tmp_path / "data/test.json"), "--images",
                              str(tmp_path / "data/images"), "--out", str(tmp_path / "task"), "--name", "q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(tmp_path / "student"), "--lmms-eval", "q", "--include-path",
                              str(tmp_path / "task"), "--device", "cpu", "--limit", "2"])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "student/eval/lmms_eval-q.json").read_text())


@needs_lmms
def test_qwen2_vl_runs_through_lmms_eval_s_qwen2_vl_class(tmp_path):
    """lmms-eval's qwen2_vl class loads the demo's Qwen2-VL student and answers with the processor's pixel bounds.
    Its answers are not compared with alignti's: that class always sends a system turn ("You are a helpful
    assistant.", which real Qwen2-VL templates add by default and the demo's template does not)."""
    saved = _lmms_run_on_a_demo_student("qwen2_vl", tmp_path)
    assert saved["lmms_eval_model"] == "qwen2_vl" and saved["samples"]["q"] == 2
    assert saved["lmms_eval_model_args"]["min_pixels"] == saved["lmms_eval_model_args"]["max_pixels"] == "2304"
    assert set(saved["results"]["q"]) == {"exact_match", "alignti_exact_match"}


@needs_lmms
@pytest.mark.parametrize("family", ["qwen3_vl", "gemma3"])
def test_qwen3_vl_and_gemma3_run_through_lmms_eval_s_own_classes(family, tmp_path):
    """lmms-eval 0.7.3's own qwen3_vl and gemma3 classes load the demo's Qwen3-VL and Gemma 3 students (bfloat16, as
    those classes load every checkpoint) and answer every question; the scores land in the model's eval folder.
    Answers are not compared with alignti's: both classes always send a system turn ("You are a helpful
    assistant."), and qwen3_vl resizes images on Qwen3-VL's released 16-px patch grid (``process_vision_info(...,
    image_patch_size=16)``, then the processor with ``do_resize=False``), so the demo's 48-px scenes in 8-px patches
    reach it as 32 x 32 (4 image tokens, not 9)."""
    saved = _lmms_run_on_a_demo_student(family, tmp_path)
    assert saved["lmms_eval_model"] == family and saved["samples"]["q"] == 2
    assert len(saved["answers"]["q"]) == 2
    assert set(saved["results"]["q"]) == {"exact_match", "alignti_exact_match"}


@needs_lmms
def test_a_qwen3_vl_moe_student_reaches_lmms_eval_as_moe(tmp_path):
    """lmms-eval's qwen3_vl class picks the MoE model class from the path alone (A<n>B in it): the demo's Qwen3-VL-MoE
    student's bare folder it loads as a dense Qwen3-VL (its MLP weights missing, initialised at random), the path
    alignti gives it (the adapter's ``lmms_eval_folder``: a link ending in -A0B) as Qwen3-VL-MoE holding the folder's
    weights; evaluate --lmms-eval then runs."""
    from transformers import AutoModelForImageTextToText

    from alignti.common.adapters import adapter_class
    from alignti.demo.kit import make_demo
    from lmms_eval.models.simple.qwen3_vl import Qwen3_VL
    make_demo(tmp_path, n_train=1, n_val=1, n_test=1, train_teacher=False, family="qwen3_vl_moe")
    student = (tmp_path / "student").resolve()
    bare = Qwen3_VL(pretrained=str(student), device="cpu", device_map="cpu")
    assert type(bare.model).__name__ == "Qwen3VLForConditionalGeneration"  # the silent failure alignti avoids
    (tmp_path / "scratch").mkdir()
    path = adapter_class("qwen3_vl_moe").lmms_eval_folder(student, tmp_path / "scratch")
    loaded = Qwen3_VL(pretrained=str(path), device="cpu", device_map="cpu").model
    assert type(loaded).__name__ == "Qwen3VLMoeForConditionalGeneration"
    want = AutoModelForImageTextToText.from_pretrained(student, dtype=loaded.dtype).state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    res = runner.invoke(app, ["export-task", "--data", str(tmp_path / "data/test.json"), "--images",
                              str(tmp_path / "data/images"), "--out", str(tmp_path / "task"), "--name", "q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", "--model", str(student), "--lmms-eval", "q", "--include-path",
                              str(tmp_path / "task"), "--device", "cpu", "--limit", "2"])
    assert res.exit_code == 0, res.output
    saved = json.loads((student / "eval/lmms_eval-q.json").read_text())
    assert saved["lmms_eval_model"] == "qwen3_vl" and saved["lmms_eval_model_args"]["pretrained"].endswith("-A0B")
