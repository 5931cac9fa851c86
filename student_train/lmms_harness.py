"""A student scored by lmms-eval, the harness the field reports with: ``alignti evaluate --lmms-eval TASKS`` and
``alignti export-task``.

``evaluate_lmms`` runs lmms-eval's own model class for the checkpoint's family (the registry,
``common.adapters.FAMILIES``: llava_hf for LLaVA and LLaVA-OneVision folders, qwen2_vl, qwen2_5_vl) through
its Python API (``lmms_eval.evaluator.simple_evaluate``), offline and on the CPU unless told otherwise, and writes
the scores into the run: ``RUN/eval/lmms_eval-TASKS.json``, one line of ``RUN/metrics.jsonl`` and the run's trackers
(``--report-to`` of its config.yaml) under ``eval/lmms_eval/TASK/METRIC``.

``export_task`` turns a LLaVA-style split into a local lmms-eval task: ``TASKDIR/NAME.parquet`` (each sample's
messages up to its last question, as alignti's chat template renders them, the images as decoded by alignti, PNG,
and the reference answer), ``TASKDIR/NAME.yaml`` and ``TASKDIR/utils.py`` (doc_to_visual / doc_to_text /
doc_to_messages / doc_to_target / process_results), for ``--include-path TASKDIR`` here or lmms-eval's own
``--include_path``.

Answer normalisation. The task reports two exact-match metrics per answer: ``exact_match`` with lmms-eval's VQA
normaliser (``EvalAIAnswerProcessor``, the VQAv2 evaluation's: lower case, punctuation removed or split, number
words to digits, articles a/an/the dropped, contractions restored), and ``alignti_exact_match`` with
``alignti evaluate``'s (``common.generate.exact_match``: lower case, surrounding whitespace and one trailing period
removed, inner whitespace collapsed). They differ only where the VQA rules change an answer (``"two"`` vs ``"2"``,
``"a circle"`` vs ``"circle"``, ``"red!"`` vs ``"red"``); tests/test_lmms_eval.py checks both on the same answers.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import os
import re
import time
from pathlib import Path

from alignti.common.adapters import adapter_class
from alignti.common.conversation import chat_messages
from alignti.common.errors import AlignTIError, DataError
from alignti.common.generate import _norm
from alignti.common.models import IMAGE_PROCESSOR_FILES
from alignti.common.records import Record
from alignti.common.sources import load_image, load_records, preflight

log = logging.getLogger("alignti.eval")

# the eval extra's working install on these machines: lmms-eval needs torchvision, whose PyPI build needs its own torch
INSTALL = ('python -m venv .venv-eval && .venv-eval/bin/pip install torch==2.14.1 torchvision==0.29.1 && '
           '.venv-eval/bin/pip install "alignti[eval]"  (from an alignti checkout: -e ".[eval]"), then run '
           '.venv-eval/bin/alignti evaluate ...')


def require_lmms_eval():
    """The ``lmms_eval.evaluator`` module; AlignTIError naming the install command where it does not import."""
    try:
        import lmms_eval.evaluator as evaluator
    except Exception as e:  # noqa: BLE001 - not installed, or torchvision broken beside this torch
        raise AlignTIError(f"--lmms-eval needs lmms-eval, which does not import here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}): install it in its own env: {INSTALL}") from None
    return evaluator


def lmms_eval_model(model_path: str | Path) -> tuple[str, dict]:
    """lmms-eval's model name (``--model``) for a checkpoint folder, from its config's ``model_type``, and the
    extra ``model_args`` its family needs (``ModelAdapter.lmms_eval_args``: e.g. Qwen2-VL's pixel bounds)."""
    from transformers import AutoConfig
    model_type = AutoConfig.from_pretrained(str(model_path)).model_type
    cls = adapter_class(model_type)
    image_processor = {}
    for name in reversed(IMAGE_PROCESSOR_FILES):  # processor_config.json first, then preprocessor_config.json
        f = Path(model_path) / name
        if f.exists():
            saved = json.loads(f.read_text())
            image_processor = saved.get("image_processor", saved)
            break
    return cls.lmms_eval_model(model_type), cls.lmms_eval_args(image_processor)


def run_dir(model_path: str | Path) -> Path:
    """Where the scores go: the run of ``RUN/final`` (a folder holding metrics.jsonl or config.yaml), else the
    model folder itself."""
    model_path = Path(model_path)
    parent = model_path.resolve().parent
    if (parent / "metrics.jsonl").exists() or (parent / "config.yaml").exists():
        return parent
    return model_path


def evaluate_lmms(model_path: str | Path, tasks: str | list[str], include_path: str | Path | None = None,
                  limit: int | None = None, device: str = "cpu", batch_size: int = 1) -> dict:
    """Score ``model_path`` on lmms-eval ``tasks`` (comma-separated names, or a list; local tasks found under
    ``include_path``) with lmms-eval's model class for its family, greedy as each task's generation settings say.

    Offline: HF_HUB_OFFLINE and HF_DATASETS_OFFLINE default to 1 (export them as 0 to let lmms-eval fetch a public
    benchmark). Returns {"model", "lmms_eval_model", "tasks", "results": {task: {metric: value}}, "samples":
    {task: n}, "answers": {task: {doc id: answer}}, "file"}; the same is written to RUN/eval/lmms_eval-TASKS.json,
    the scores to RUN/metrics.jsonl and the run's trackers. Raises AlignTIError when lmms-eval is not installed
    or a task is unknown, ValueError for a family lmms-eval has no class for."""
    _offline()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise AlignTIError("--lmms-eval: no task named (give e.g. --lmms-eval mytask,mme)")
    evaluator = require_lmms_eval()
    model_name, extra = lmms_eval_model(model_path)
    from lmms_eval.tasks import TaskManager
    manager = None
    if include_path is not None:  # only the local tasks: indexing lmms-eval's hundreds of task folders takes a while
        local = TaskManager("WARNING", include_path=str(include_path), include_defaults=False, model_name=model_name)
        if all(n in local.all_tasks for n in names):
            manager = local
    if manager is None:
        manager = TaskManager("WARNING", include_path=None if include_path is None else str(include_path),
                              model_name=model_name)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or under --include-path {include_path}" if include_path else " (a local task needs --include-path)"
        raise AlignTIError(f"--lmms-eval: no lmms-eval task {', '.join(unknown)} in lmms-eval{where}; "
                           "`alignti export-task` makes one from a LLaVA-style split")
    import tempfile

    from transformers import AutoConfig
    adapter = adapter_class(AutoConfig.from_pretrained(str(model_path)).model_type)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alignti-lmms-") as scratch:  # the family's link, where it needs one
        args = {"pretrained": adapter.lmms_eval_folder(Path(model_path).resolve(), Path(scratch)),
                "device_map": device, **extra}
        out = evaluator.simple_evaluate(model=model_name, model_args=",".join(f"{k}={v}" for k, v in args.items()),
                                        tasks=names, batch_size=batch_size, device=device, limit=limit,
                                        task_manager=manager, log_samples=True)
    seconds = time.perf_counter() - t0
    scores = {task: {k.split(",")[0]: v for k, v in res.items()
                     if isinstance(v, (int, float)) and "_stderr" not in k and k != "alias"}
              for task, res in out["results"].items()}
    answers = {task: {str((s.get("doc") or {}).get("id", s.get("doc_id"))): _first(s.get("filtered_resps"))
                      for s in samples} for task, samples in (out.get("samples") or {}).items()}
    from importlib.metadata import version
    res = {"model": str(model_path), "lmms_eval_model": model_name, "lmms_eval_version": version("lmms_eval"),
           "lmms_eval_model_args": {k: str(v) for k, v in args.items()},
           "tasks": names, "device": device,
           "seconds": round(seconds, 1), "results": scores,
           "samples": {task: len(a) for task, a in answers.items()}, "answers": answers}
    run = run_dir(model_path)
    path = run / "eval" / f"lmms_eval-{'+'.join(names)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    res["file"] = str(path)
    _record_scores(run, scores)
    return res


def _offline() -> None:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE default to 1; the libraries read them when first imported, so where they
    are imported already their flags are set too."""
    hub = os.environ.setdefault("HF_HUB_OFFLINE", "1") not in ("0", "false", "False", "")
    data = os.environ.setdefault("HF_DATASETS_OFFLINE", "1") not in ("0", "false", "False", "")
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = hub
    try:
        import datasets.config
    except ImportError:  # lmms-eval requires datasets; require_lmms_eval names the install
        return
    datasets.config.HF_HUB_OFFLINE = hub
    datasets.config.HF_DATASETS_OFFLINE = data or hub


def _first(resps):
    while isinstance(resps, (list, tuple)) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else ""


def _record_scores(run: Path, scores: dict) -> None:
    """A line in RUN/metrics.jsonl at the run's last step and the same figures to the run's trackers (the
    ``val_`` prefix files them under eval/ there: eval/lmms_eval/TASK/METRIC)."""
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.exists():
        return
    lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
    step = max((int(x.get("step", 0)) for x in lines), default=0)
    flat = {f"val_lmms_eval/{task}/{metric}": float(v) for task, ms in scores.items() for metric, v in ms.items()}
    with open(metrics_path, "a") as f:
        f.write(json.dumps({"step": step, "event": "lmms_eval", **flat}) + "\n")
    config = {}
    if (run / "config.yaml").exists():
        import yaml
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    if config.get("report_to"):
        from .tracking import Tracker
        with Tracker(config["report_to"], run, config, start_step=step) as tracker:
            tracker.log(flat, step)


_UTILS = '''"""lmms-eval task functions for a split exported by `alignti export-task` (generated; runs without alignti).

Two exact-match metrics: exact_match normalises both answers with lmms-eval's VQA normaliser (EvalAIAnswerProcessor:
lower case, punctuation, number words to digits, articles dropped); alignti_exact_match with `alignti evaluate`'s
(lower case, whitespace, one trailing period), the function below is alignti's own (alignti.common.generate._norm).
"""

import json

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

_vqa = EvalAIAnswerProcessor()


{norm}

def doc_to_visual(doc):
    """The sample's images (PIL), in the order their <image> placeholders stand."""
    return list(doc["images"] or [])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The last question (for lmms-eval's single-turn model classes; earlier turns are in doc_to_messages only)."""
    kw = lmms_eval_specific_kwargs or {{}}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    """The conversation up to its last question, each image where its <image> stood (chat model classes)."""
    images = iter(doc_to_visual(doc))
    messages = json.loads(doc["messages"])
    for m in messages:
        for part in m["content"]:
            if part["type"] == "image":
                part["url"] = next(images)
    return messages


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    pred = results[0] if results else ""
    return {{"exact_match": float(_vqa(pred) == _vqa(doc["answer"])),
            "alignti_exact_match": float(_norm(pred) == _norm(doc["answer"]))}}
'''

_YAML = """# lmms-eval task made by `alignti export-task` from {data} ({n} samples)
task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_messages: !function utils.doc_to_messages
doc_to_target: !function utils.doc_to_target
process_results: !function utils.process_results
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: alignti_exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def export_task(data: str, images: str | None, out: str | Path, name: str | None = None,
                max_new_tokens: int = 8, skip_bad: bool = False) -> dict:
    """Write ``data`` (LLaVA JSON/JSONL, parquet, a datasets folder) as the lmms-eval task ``name`` under ``out``.

    The questions are those ``alignti evaluate`` asks: each sample's last assistant turn is the reference, the
    conversation before it the prompt. Samples ``alignti evaluate`` and dump-teacher refuse (``preflight``) are
    refused by name (BadSamples), or with ``skip_bad`` left out and named in the log.
    ``max_new_tokens`` is the task's generation budget (``alignti evaluate``'s default: 8). Returns {"task",
    "yaml", "parquet", "samples"}. Raises DataError naming a sample whose last turn is not an answer or whose
    image does not load, AlignTIError for a name lmms-eval cannot take or a missing ``datasets`` package."""
    try:
        import datasets
    except ImportError:
        raise AlignTIError('export-task writes the task with the datasets package: pip install "alignti[hf]"') from None
    out = Path(out)
    name = name or f"alignti_{re.sub(r'[^A-Za-z0-9_]', '_', Path(str(data).rstrip('/')).stem)}"
    if not _NAME.match(name):
        raise AlignTIError(f"export-task --name '{name}': a task name is letters, digits and _ (not starting "
                           "with a digit); e.g. --name shapes_test")
    rows = {"id": [], "messages": [], "question": [], "answer": [], "images": []}
    checked = preflight(load_records(data), images, skip_bad, "exporting",
                        "fix them, or pass --skip-bad to leave them out (named in the log)")
    skipped = [r for r in checked if not isinstance(r, Record)]
    for rec in checked:
        if not isinstance(rec, Record):
            continue
        if rec.turns[-1][0] != "assistant":
            raise DataError(rec.sample_id, "its last turn is not an answer (the reference an exact match needs)",
                            "end each sample with its gpt turn")
        has_image = bool(rec.image)
        pics = []
        if has_image:
            img, _ = load_image(rec, images)
            for im in (img if isinstance(img, list) else [img]):
                buf = io.BytesIO()
                im.save(buf, format="PNG")  # lossless: lmms-eval sees the pixels alignti evaluate sees
                pics.append({"bytes": buf.getvalue(), "path": None})
        messages = chat_messages(rec, with_images=has_image, generation_prompt=True)
        last_user = [m for m in messages if m["role"] == "user"][-1]
        rows["id"].append(rec.sample_id)
        rows["messages"].append(json.dumps(messages))
        rows["question"].append("".join(p["text"] for p in last_user["content"] if p["type"] == "text"))
        rows["answer"].append(rec.turns[-1][1])
        rows["images"].append(pics)
    if skipped:
        log.warning("export-task: %d sample(s) left out (--skip-bad, as alignti evaluate --skip-bad leaves them "
                    "out): %s", len(skipped), "; ".join(r.error for r in skipped[:10]))
    if not rows["id"]:
        raise AlignTIError(f"export-task: {data} holds no usable sample")
    features = datasets.Features({"id": datasets.Value("string"), "messages": datasets.Value("string"),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "images": datasets.Sequence(datasets.Image())})
    out.mkdir(parents=True, exist_ok=True)
    parquet = (out / f"{name}.parquet").resolve()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(parquet))
    (out / "utils.py").write_text(_UTILS.format(norm=inspect.getsource(_norm)))
    yaml_path = out / f"{name}.yaml"
    yaml_path.write_text(_YAML.format(data=data, n=len(rows["id"]), name=name, parquet=json.dumps(str(parquet)),
                                      max_new_tokens=max_new_tokens))
    return {"task": name, "yaml": str(yaml_path), "parquet": str(parquet), "samples": len(rows["id"])}
