"""On-policy faults from public distillation bug reports: rows scored as the student generated them.

* a cut answer (``--max-new-tokens`` reached) is scored as generated: its tokens, no end-of-turn markup the student
  never produced (also where its tokens cannot be swapped in: the re-encoded answer, markup cut off);
* generation stops at the chat template's end of turn even where ``generation_config.eos_token_id`` names another
  token (a base model's end of text): rollout and evaluate alike;
* an answer the student ends at once is a row (its target the teacher's view of that end of turn); a rollout with no
  usable row fails naming why; a data source (not a sample) is named as such;
* evaluate refuses (or, with --skip-bad, names and counts) the samples dump-teacher refuses.

Each student is scripted (tests/helpers.py ``scripted_student``): its next token is a function of its current
token, so what it generates is known exactly and the cache is checked against it token for token."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from alignti.common.cache import CacheReader
from alignti.common.conversation import end_of_turn_ids
from alignti.common.errors import BadSamples, DataError, DataSourceError
from alignti.common.models import load_vlm
from alignti.student_rollout.rollout import RolloutConfig, rollout
from alignti.student_train.evaluate import evaluate
from alignti.student_train.lmms_harness import export_task
from alignti.teacher_dump.dump import DumpConfig, dump_teacher

from helpers import scripted_student


@pytest.fixture(scope="module")
def qkit(tmp_path_factory):
    """A Qwen2-VL demo kit (untrained teacher): its template ends a turn with <|im_end|>\\n."""
    from alignti.demo.kit import make_demo
    out = tmp_path_factory.mktemp("qkit")
    make_demo(out, n_train=3, n_val=2, n_test=2, train_teacher=False, family="qwen2_vl")
    return out


def _rows(out):
    return [r for f in sorted((out / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def _rollout(kit, student, out, **kw):
    return rollout(RolloutConfig(**{**dict(student=str(student), data=str(kit / "data/train.json"),
                                           images=str(kit / "data/images"), out=str(out), temperature=0.0,
                                           max_new_tokens=4, top_b=2, progress=False), **kw}))


def _cached(kit, ro, c):
    """Dump the rollout ``ro`` into ``c``; per cache sample (its rollout row, the cache's response ids, its ids)."""
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(ro), images=str(kit / "data/images"), out=str(c),
                            top_k=8, tpa_branches=2, tpa_top_k=4, saliency_layer="1", progress=False))
    rows = {r["id"]: r for r in _rows(ro)}
    reader = CacheReader(str(c))
    out = []
    for i in range(len(reader)):
        x = reader[i]
        (s, e), = x["resp_spans"]
        out.append((rows[x["sample_id"]], x["input_ids"][s:e].tolist(), x["input_ids"].tolist()))
    assert len(out) == len(rows)
    return out


@pytest.fixture(scope="module")
def cut(qkit, tmp_path_factory):
    """A student that never stops, rolled out at --max-new-tokens 4 (log kept) and dumped: (rollout.json, its log,
    per cache sample (row, response ids, ids), the cache folder)."""
    tmp = tmp_path_factory.mktemp("cut")
    student = scripted_student(qkit / "student", tmp / "s", {"<prompt>": "red", "red": "Ġcircle",
                                                             "Ġcircle": "Ġcircle"})
    records = []
    handler = logging.Handler()
    handler.emit = lambda rec: records.append(rec.getMessage())
    log = logging.getLogger("alignti.rollout")
    log.addHandler(handler)
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not .level =: it clears the logger's cached isEnabledFor answers
    try:
        m = _rollout(qkit, student, tmp / "r")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return m, "\n".join(records), _cached(qkit, tmp / "r", tmp / "c"), tmp / "c"


def test_cut_answers_are_scored_as_generated(qkit, cut):
    """A student that never stops, at --max-new-tokens 4: every row is cut ("length", counted in rollout.json and
    the log) and the cache scores exactly its 4 tokens, the sequence ending there: no <|im_end|> target."""
    tok = load_vlm(str(qkit / "student"), torch.device("cpu"))[1].tokenizer
    im_end, red, circle = tok.convert_tokens_to_ids(["<|im_end|>", "red", "Ġcircle"])
    m, logged, cached, _ = cut
    assert m["counts"]["rows"] == m["counts"]["cut"] >= 3 and m["counts"]["dropped"] == 0
    assert "answers cut at --max-new-tokens" in logged and "were cut at --max-new-tokens 4" in logged
    for row, resp, ids in cached:
        assert row["finish"] == "length" and row["student_token_ids"] == [red, circle, circle, circle]
        assert row["conversations"][-1]["value"] == "red circle circle circle"
        assert resp == row["student_token_ids"] and ids[-4:] == resp and im_end not in resp, (resp, row["id"])


def test_a_cut_answer_has_no_end_of_turn_across_tokenizers(qkit, cut):
    """Sibling through cross-tokenizer training: the cache keeps each row's finish, and a student with another
    tokenizer and template (the LLaVA demo's, <|end|>) re-encodes a cut row without its own end-of-turn markup; its
    response is the answer's text alone."""
    from alignti.demo import kit
    from alignti.student_train.cross import CrossDataset, CrossTokenizer
    reader = CacheReader(str(cut[3]))
    proc = kit.build_processor(kit.build_tokenizer("llava"), "llava")
    ds = CrossDataset(reader, proc, CrossTokenizer(reader, proc), images_dir=str(qkit / "data/images"))
    end = proc.tokenizer.convert_tokens_to_ids("<|end|>")
    for i in range(len(ds)):
        assert reader[i]["finish"] == "length"
        y = ds[i]
        resp = np.asarray(y["input_ids"])[np.asarray(y["response_mask"]).astype(bool)].tolist()
        assert end not in resp and proc.tokenizer.decode(resp).strip() == "red circle circle circle", resp


def test_a_cut_answer_whose_tokens_cannot_be_swapped_in_keeps_no_end_of_turn(qkit, tmp_path):
    """Sibling: the student's tokens hold a special token its answer text cannot (<unk>, dropped from the text), so
    the dump scores the re-encoded answer; cut, it too ends without the end-of-turn markup."""
    student = scripted_student(qkit / "student", tmp_path / "s", {"<prompt>": "red", "red": "<unk>",
                                                                   "<unk>": "red"})
    m = _rollout(qkit, student, tmp_path / "r")
    tok = load_vlm(str(student), torch.device("cpu"))[1].tokenizer
    assert m["counts"]["cut"] == m["counts"]["rows"] >= 3
    for row, resp, ids in _cached(qkit, tmp_path / "r", tmp_path / "c"):
        assert not row["retokenized_equal"] and row["conversations"][-1]["value"] == "redred"
        assert resp == tok("redred", add_special_tokens=False)["input_ids"] and ids[-len(resp):] == resp


def test_a_finished_answer_keeps_its_end_of_turn(qkit, tmp_path):
    """The other side of the rule: an answer the student ended is scored with the end-of-turn markup (<|im_end|>
    then the template's newline), its stop token being the markup's first."""
    tok = load_vlm(str(qkit / "student"), torch.device("cpu"))[1].tokenizer
    student = scripted_student(qkit / "student", tmp_path / "s", {"<prompt>": "red", "red": "<|im_end|>"})
    _rollout(qkit, student, tmp_path / "r")
    red, im_end = tok.convert_tokens_to_ids(["red", "<|im_end|>"])
    for row, resp, _ in _cached(qkit, tmp_path / "r", tmp_path / "c"):
        assert row["finish"] == "eos" and resp == [red, im_end] + tok("\n", add_special_tokens=False)["input_ids"]


def test_generation_stops_at_the_templates_end_of_turn(qkit, tmp_path):
    """A student whose generation_config names another end token (a base model's end of text; <unk> here) than the
    template's <|im_end|>: the rollout stops at <|im_end|> (finish "eos", answer "red"), and so does evaluate's
    greedy answer, where both ran on to "red circle circle circle"."""
    student = scripted_student(qkit / "student", tmp_path / "s",
                               {"<prompt>": "red", "red": "<|im_end|>", "<|im_end|>": "Ġcircle",
                                "Ġcircle": "Ġcircle"}, eos="<unk>")
    model, proc = load_vlm(str(student), torch.device("cpu"))
    tok = proc.tokenizer
    assert model.generation_config.eos_token_id == tok.unk_token_id
    m = _rollout(qkit, student, tmp_path / "r", max_new_tokens=6)
    red, im_end = tok.convert_tokens_to_ids(["red", "<|im_end|>"])
    rows = _rows(tmp_path / "r")
    assert m["counts"]["cut"] == 0 and len(rows) == m["counts"]["rows"] >= 3
    assert all(r["student_token_ids"] == [red, im_end] and r["finish"] == "eos" for r in rows)
    assert {r["conversations"][-1]["value"] for r in rows} == {"red"}
    res = evaluate(str(student), str(qkit / "data/test.json"), str(qkit / "data/images"), max_new_tokens=6,
                   answers_out=tmp_path / "a.json")
    n_test = len(json.loads((qkit / "data/test.json").read_text()))
    assert set(json.loads((tmp_path / "a.json").read_text()).values()) == {"red"} and res["samples"] == n_test


QWEN2VL_TEMPLATE = (  # Qwen/Qwen2-VL-7B-Instruct's, as tests/test_real_templates.py
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a "
    "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{% for content in "
    "message['content'] %}{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif "
    "'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAVA15_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf's: an answer ends with " ", its model stops at </s>
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_end_of_turn_ids_come_from_the_template():
    """One place (conversation.end_of_turn_ids) reads the template's end of turn: the special tokens of the markup
    after an answer; none where that markup is plain text (LLaVA-1.5: generation_config's </s> ends answers)."""
    from alignti.common.generate import stop_ids
    from alignti.demo import kit
    for family, end in (("llava", "<|end|>"), ("qwen2_vl", "<|im_end|>")):
        proc = kit.build_processor(kit.build_tokenizer(family), family)
        assert end_of_turn_ids(proc) == [proc.tokenizer.convert_tokens_to_ids(end)]
    tok = kit.build_tokenizer("qwen2_vl")
    def shim(template):  # a processor of the kit's tokenizer with that chat template
        return SimpleNamespace(tokenizer=tok, apply_chat_template=lambda m, **kw: tok.apply_chat_template(
            m, chat_template=template, **kw))
    assert end_of_turn_ids(shim(QWEN2VL_TEMPLATE)) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert end_of_turn_ids(shim(LLAVA15_TEMPLATE)) == []
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[5, 2]))
    assert stop_ids(model, shim(QWEN2VL_TEMPLATE)) == [5, 2] and stop_ids(model) == [5, 2]
    model.generation_config.eos_token_id = tok.unk_token_id
    assert stop_ids(model, shim(QWEN2VL_TEMPLATE)) == [tok.unk_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_answers_ended_at_once_are_rows_scored_at_the_end_of_turn(qkit, tmp_path, caplog):
    """A student that ends every answer at once: each is a row with an empty answer (counted, and a warning), and
    the cache scores the end-of-turn markup alone, the teacher's log-probs at that position being the target that
    moves the student off its empty answer (where before every row was dropped: "0 rows", exit 0)."""
    tok = load_vlm(str(qkit / "student"), torch.device("cpu"))[1].tokenizer
    student = scripted_student(qkit / "student", tmp_path / "s", {"<prompt>": "<|im_end|>"})
    with caplog.at_level(logging.WARNING, logger="alignti.rollout"):
        m = _rollout(qkit, student, tmp_path / "r")
    n_turns = sum(sum(c["from"] == "gpt" for c in it["conversations"])
                  for it in json.loads((qkit / "data/train.json").read_text()))
    assert m["counts"]["rows"] == m["counts"]["empty"] == n_turns and m["counts"]["dropped"] == 0
    assert "ended every answer at once" in caplog.text
    markup = tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    for row, resp, _ in _cached(qkit, tmp_path / "r", tmp_path / "c"):
        assert row["conversations"][-1]["value"] == "" and row["finish"] == "eos" and resp == markup
    x = CacheReader(str(tmp_path / "c"))[0]
    assert x["topk_ids"].shape[0] == len(markup)  # the teacher's distributions at the end-of-turn positions


def test_a_rollout_with_no_usable_row_fails_naming_why(qkit, tmp_path):
    """A student that writes only special tokens and never stops: no answer text in any row. The rollout fails
    naming its folder, the count and the reason, and writes no rollout.json (before: exit 0, "0 rows")."""
    student = scripted_student(qkit / "student", tmp_path / "s", {"<prompt>": "<unk>", "<unk>": "<unk>"})
    with pytest.raises(DataSourceError, match=r"no usable row: every one of the \d+ rows .*no answer text in "
                                              r"--max-new-tokens 4 tokens") as e:
        _rollout(qkit, student, tmp_path / "r")
    assert str(e.value).startswith(str(tmp_path / "r")) and not (tmp_path / "r/rollout.json").exists()
    with pytest.raises(DataError, match="unfinished rollout"):  # nothing can dump it
        dump_teacher(DumpConfig(teacher=str(qkit / "teacher"), data=str(tmp_path / "r"), out=str(tmp_path / "c"),
                                images=str(qkit / "data/images"), progress=False))


def test_a_data_source_is_named_as_a_source_not_a_sample(qkit, tmp_path):
    """dump-teacher, rollout and evaluate on data with no sample, or no file: "D: no samples in the data (...)", not
    "sample D: ..." (a file or folder named as if it were a sample id)."""
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    missing = tmp_path / "none.json"
    calls = [(lambda d: dump_teacher(DumpConfig(teacher=str(qkit / "teacher"), data=str(d), images=None,
                                                out=str(tmp_path / "c"), progress=False)), (empty, missing)),
             (lambda d: _rollout(qkit, qkit / "student", tmp_path / "r", data=str(d)), (empty, missing)),
             (lambda d: evaluate(str(qkit / "student"), str(d), None), (missing,))]
    for call, cases in calls:
        for data in cases:
            with pytest.raises(DataSourceError) as e:
                call(data)
            what = "no samples in the data" if data == empty else "data file not found"
            assert str(e.value).startswith(f"{data}: {what} (")


def test_evaluate_refuses_the_samples_the_dump_refuses(qkit, tmp_path):
    """evaluate on 4 samples, one with an <image> in its answer and one with an empty answer: refused by name as
    dump-teacher refuses them (before: "samples": 2, the two left out unnamed); with skip_bad (--skip-bad) scored on
    the other 2, the two named and counted in "skipped". A missing image is the dump's refusal too. export-task (the
    same split as an lmms-eval task) refuses and skips them the same way."""
    items = json.loads((qkit / "data/test.json").read_text())[:2]
    items += [dict(items[0], id="img_in_answer", conversations=[items[0]["conversations"][0],
                                                               {"from": "gpt", "value": "see <image>"}]),
              dict(items[1], id="empty_answer", conversations=[items[1]["conversations"][0],
                                                              {"from": "gpt", "value": " "}])]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(items))
    model, proc = str(qkit / "student"), str(qkit / "data/images")
    with pytest.raises(BadSamples, match=r"2 bad sample\(s\) found before evaluating.*sample img_in_answer: .*<image>"
                                         r".*sample empty_answer: assistant turn 1 has an empty answer.*--skip-bad") as e:
        evaluate(model, str(data), proc)
    assert str(e.value).count("--skip-bad") == 1  # said once for the list, not again in each sample's message
    with pytest.raises(BadSamples, match="2 bad sample.*before dumping.*img_in_answer.*empty_answer"):  # the same
        dump_teacher(DumpConfig(teacher=str(qkit / "teacher"), data=str(data), images=proc, out=str(tmp_path / "c"),
                                progress=False))
    with pytest.raises(BadSamples, match="2 bad sample.*before exporting.*img_in_answer.*empty_answer"):  # sibling
        export_task(str(data), proc, tmp_path / "task")
    res = evaluate(model, str(data), proc, skip_bad=True)
    assert res["samples"] == 2 and [s["id"] for s in res["skipped"]] == ["img_in_answer", "empty_answer"]
    assert "empty answer" in res["skipped"][1]["reason"]
    assert export_task(str(data), proc, tmp_path / "task", skip_bad=True)["samples"] == 2
    items[0]["image"] = "gone.png"
    data.write_text(json.dumps(items[:2]))
    with pytest.raises(BadSamples, match="1 bad sample.*before evaluating.*image 'gone.png' not found"):
        evaluate(model, str(data), proc)
