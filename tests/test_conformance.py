"""The conformance suite: every family of the registry (common/adapters.py FAMILIES, the rows with a demo kit) against
the model's own transformers code, on its demo kit saved with save_pretrained and reloaded (tokenizer, processor,
chat template) — one kit, one dump and one rollout per family per test session.

The references are plain transformers: the checkpoint loaded with ``AutoModelForImageTextToText`` (its default
attention) and run as ``model(**processor(text=chat_template(messages), images=...))``, the conversation written
as chat messages here from the LLaVA-format record (not through alignti's conversation code). What each check holds:

* ids: the cached ``input_ids`` are the processor's on the template-rendered conversation (single-turn, multi-turn,
  multi-image where the family takes several images);
* top-k: the cached top-k ids, their log-probs, the rest mass and the target's log-prob are the model's own
  forward's (catches a mask, a position or an image input that alignti builds differently from the model);
* TPA: each cached next-step distribution is the model's own forward on prefix + candidate, and the candidates are
  the top-B of the model's distribution at that position (image token excluded);
* saliency: the cached rows are the softmax attention of the chosen layer, computed by the model with eager
  attention (``output_attentions``), averaged over heads and instruction queries, over the image tokens;
* KD step: the gradients of alignti's training step (``--loss kd``: SFT + forward KL on top-k + rest) are plain
  autograd through the student's own forward on the same samples;
* rollout: the stored candidates are the top-B of the student's own logits on prompt + generation;
* make-student --from-teacher builds a student that trains on the cache, and the run folder loads with the plain
  Auto classes, processor included, and generates.

Tolerances (conftest.py, "Exactness policy"): the dump runs the samples in a padded batch with its own 4-D masks,
the reference unpadded with the model's: fp32 log-probs move by up to 1e-5, so ids are equal up to near-ties
(tests/exactness.py) and every value gets 1e-5 on top of its encoding's rounding (float16: 2^-11 relative);
gradients summed in another order: 1e-5 of the tensor's largest element.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignti.common.adapters import DEMO_FAMILIES, FAMILIES, adapter_class
from alignti.common.batch import span_image_positions
from alignti.common.cache import CacheReader
from tests.exactness import EPS32, assert_topk_ids_of

FP16_REL = 2.0 ** -11  # float16 keeps 11 significant bits: half an ulp of relative rounding
FP32_MOVE = 1e-5       # fp32 log-probs of a padded batch with alignti's masks vs the model's own unpadded forward


@dataclass
class Kit:
    family: str
    root: Path
    data: list[dict]
    cache: CacheReader

    @property
    def images(self) -> Path:
        return self.root / "kit/data/images"


def _conversations(kit: Path, multi_image: bool) -> list[dict]:
    """Single-turn, multi-turn and (families that take several images) multi-image samples from the kit's data."""
    items = json.loads((kit / "data/train.json").read_text())
    single = [it for it in items if len(it["conversations"]) == 2]
    multi = dict(single[1], id="multi-turn", conversations=single[1]["conversations"] + [
        {"from": "human", "value": "Is that certain?"}, {"from": "gpt", "value": "yes"}])
    out = [single[0], multi]
    if multi_image:
        a, b = single[2], single[3]
        out.append({"id": "two-images", "image": [a["image"], b["image"]], "conversations": [
            a["conversations"][0], a["conversations"][1],
            {"from": "human", "value": "<image>\n" + b["conversations"][0]["value"].replace("<image>\n", "")},
            b["conversations"][1]]})
    return out


@pytest.fixture(scope="session", params=DEMO_FAMILIES)
def fkit(request, tmp_path_factory) -> Kit:
    """The family's demo kit (untrained: only the arithmetic matters), its conformance samples and their dump
    (float16 log-probs in rank order at k = 16, 3 TPA branches with their top 8, saliency at the IRS layer)."""
    from alignti.demo.kit import make_demo
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    family = request.param
    root = tmp_path_factory.mktemp(f"conformance_{family}")
    make_demo(root / "kit", n_train=6, n_val=1, n_test=1, train_teacher=False, family=family)
    data = _conversations(root / "kit", FAMILIES[family].adapter.multi_image)
    (root / "data.json").write_text(json.dumps(data))
    dump_teacher(DumpConfig(teacher=str(root / "kit/teacher"), data=str(root / "data.json"),
                            images=str(root / "kit/data/images"), out=str(root / "cache"), top_k=16, tpa_top_k=8,
                            tpa_branches=3, logprob_encoding="float16", irs_samples=len(data), batch_size=8,
                            progress=False))
    return Kit(family, root, data, CacheReader(str(root / "cache")))


# --- the references: plain transformers ------------------------------------------------------------------------
def messages_of(item: dict) -> list[dict]:
    """The LLaVA-format conversation as chat messages: human -> user, gpt -> assistant, each ``<image>`` (and the line
    break after it) an image part in its place."""
    msgs = []
    for c in item["conversations"]:
        parts = []
        for j, piece in enumerate(c["value"].split("<image>")):
            if j:
                parts.append({"type": "image"})
                piece = piece[1:] if piece.startswith("\n") else piece
            if piece:
                parts.append({"type": "text", "text": piece})
        msgs.append({"role": "user" if c["from"] == "human" else "assistant", "content": parts})
    return msgs


def own_inputs(proc, item: dict, images: Path) -> dict:
    """``processor(text=chat_template(messages), images=...)`` for one sample, as a user of transformers calls it."""
    refs = item["image"] if isinstance(item["image"], list) else [item["image"]]
    pics = [Image.open(images / r).convert("RGB") for r in refs]
    text = proc.apply_chat_template(messages_of(item), tokenize=False)
    return dict(proc(text=[text], images=[pics], return_tensors="pt"))


def _auto(folder, **kw):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    try:
        proc = AutoProcessor.from_pretrained(folder)
    except ImportError:  # the video half of some processors needs torchvision; alignti reads the image half
        from alignti.common.models import load_processor
        proc = load_processor(str(folder))
    return model, proc


@pytest.fixture(scope="session")
def teacher_of():
    loaded = {}

    def get(k: Kit):
        if k.family not in loaded:
            loaded[k.family] = _auto(k.root / "kit/teacher")
        return loaded[k.family]
    return get


def _row(k: Kit, sample_id: str) -> dict:
    return next(k.cache[i] for i in range(len(k.cache)) if k.cache[i]["sample_id"] == sample_id)


def _logprobs(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(**inputs).logits[0].float(), -1)


def _seq_keys(inputs: dict) -> list[str]:
    """The processor outputs laid out along the sequence ([1, S]: ids, mask, token type ids)."""
    s = inputs["input_ids"].shape
    return [k for k, v in inputs.items() if torch.is_tensor(v) and v.shape[:2] == s]


# --- the checks ------------------------------------------------------------------------------------------------
def test_ids_are_the_processors_on_the_rendered_conversation(fkit, teacher_of):
    _, proc = teacher_of(fkit)
    assert len(fkit.cache) == len(fkit.data)
    for item in fkit.data:
        x = _row(fkit, item["id"])
        want = own_inputs(proc, item, fkit.images)["input_ids"][0].numpy()
        assert np.array_equal(x["input_ids"], want), item["id"]
        # the loss sits on each assistant turn's tokens: as many runs of response tokens as assistant turns
        runs = np.flatnonzero(np.diff(np.concatenate([[0], x["response_mask"].astype(int), [0]])) == 1)
        assert len(runs) == sum(c["from"] == "gpt" for c in item["conversations"]), item["id"]


def test_encoding_runs_the_image_processor_once_per_sample(fkit):
    """``encode`` gives each sample's images to the family's processor once: a family whose placeholder expands into
    more than image tokens (Gemma's <start_of_image> markup, SmolVLM's sub-image tags, Mistral 3's row ends,
    InternVL's <img> ... </img>) takes its text offsets from the expansion observed in that same call, not from a
    second run of the image processor; the ids and spans are those the dump cached."""
    from alignti.common.conversation import encode
    from alignti.common.models import load_processor
    from alignti.common.sources import load_image, load_records
    proc = load_processor(str(fkit.root / "kit/teacher"))
    calls = []
    own = proc.image_processor.preprocess

    def preprocess(*a, **kw):
        calls.append(1)
        return own(*a, **kw)
    proc.image_processor.preprocess = preprocess
    for rec in load_records(fkit.root / "data.json"):
        calls.clear()
        enc = encode(proc, rec, *load_image(rec, fkit.images))
        assert len(calls) == 1, (rec.sample_id, len(calls))
        row = _row(fkit, rec.sample_id)
        assert np.array_equal(enc.input_ids, row["input_ids"]) and np.array_equal(enc.response_mask,
                                                                                   row["response_mask"])


def test_the_cache_schema_version_is_the_lowest_that_describes_it(fkit):
    """A family whose tiled images' thumbnails may have a grid of their own (7-value image_tiles entries: LFM2-VL)
    writes its caches as v8, so a v7 reader refuses them by version instead of misreading the entries; every other
    family's cache stays v7, and only a v8 cache holds a 7-value entry."""
    from alignti.common.tiles import layouts_of
    v8 = FAMILIES[fkit.family].adapter.thumb_grid_tiles
    assert fkit.cache.manifest["schema_version"] == (8 if v8 else 7)
    assert fkit.cache.params.get("thumb_grid_tiles", False) == v8
    own_thumb = any(lay.thumb_grid is not None for r in fkit.cache.samples if r.get("image_tiles")
                    for lay in layouts_of([], r["image_tiles"]))
    assert v8 or not own_thumb


def _check_topk(x: dict, lp: torch.Tensor, name: str) -> None:
    """One sample's cached top-k rows against the log-probs ``lp`` [T, V] of the reference at its response tokens."""
    ids = torch.as_tensor(x["topk_ids"]).long()
    assert ids.shape[0] == lp.shape[0]
    assert_topk_ids_of(ids, lp, FP32_MOVE, f"{name} topk_ids")
    np.testing.assert_allclose(x["topk_logprobs"].astype(np.float64), lp.gather(-1, ids).double().numpy(),
                               rtol=FP16_REL, atol=FP32_MOVE, err_msg=name)
    rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1).numpy()
    np.testing.assert_allclose(x["tail_logmass"], rest, rtol=0, atol=FP32_MOVE, err_msg=name)


def test_topk_and_rest_mass_are_the_models_own_forward(fkit, teacher_of):
    model, proc = teacher_of(fkit)
    assert model.config._attn_implementation == model.config.text_config._attn_implementation  # the default
    for item in fkit.data:
        x = _row(fkit, item["id"])
        inputs = own_inputs(proc, item, fkit.images)
        lp = _logprobs(model, inputs)
        pos = np.flatnonzero(x["response_mask"])
        _check_topk(x, lp[pos - 1], item["id"])
        tgt = torch.as_tensor(x["input_ids"][pos]).long()
        np.testing.assert_allclose(x["target_logprob"], lp[pos - 1].gather(-1, tgt[:, None])[:, 0].numpy(),
                                   rtol=0, atol=FP32_MOVE)


def test_tpa_distributions_are_the_model_on_prefix_plus_candidate(fkit, teacher_of):
    _check_tpa(fkit, *teacher_of(fkit))


def _check_tpa(fkit: Kit, model, proc) -> None:
    """Each cached TPA row (every third) against the model's own forward on prefix + candidate."""
    image_token = int(model.config.image_token_id)
    checked = 0
    for item in fkit.data[:2]:
        x = _row(fkit, item["id"])
        inputs = own_inputs(proc, item, fkit.images)
        lp_main = _logprobs(model, inputs)
        pos = np.flatnonzero(x["response_mask"])
        keys = _seq_keys(inputs)
        tpa_pos = x["tpa_pos"]
        for r, t in enumerate(tpa_pos[::3]):  # every third TPA row: the branch forwards are the suite's cost
            r *= 3
            p = int(pos[t])  # the response token t sits at p; its candidates replace it after prefix [0, p)
            main = lp_main[p - 1].clone()
            main[image_token] = float("-inf")
            assert_topk_ids_of(x["tpa_cand_ids"][r][None], main[None], FP32_MOVE, "tpa_cand_ids")
            for b, cand in enumerate(x["tpa_cand_ids"][r].tolist()):
                branch = {k: v for k, v in inputs.items() if k not in keys}
                for k in keys:
                    v = inputs[k][:, :p]
                    last = torch.tensor([[cand if k == "input_ids" else (1 if k == "attention_mask" else 0)]],
                                        dtype=v.dtype)
                    branch[k] = torch.cat([v, last], 1)
                q = _logprobs(model, branch)[-1][None]
                ids = torch.as_tensor(x["tpa_ids"][r, b])[None].long()
                assert_topk_ids_of(ids, q, FP32_MOVE, f"{item['id']} tpa row {r} branch {b}")
                np.testing.assert_allclose(x["tpa_logprobs"][r, b].astype(np.float64),
                                           q.gather(-1, ids)[0].double().numpy(), rtol=FP16_REL, atol=FP32_MOVE)
                rest = q.scatter(-1, ids, float("-inf")).logsumexp(-1)[0]
                np.testing.assert_allclose(x["tpa_tail"][r, b], float(rest), rtol=0, atol=FP32_MOVE)
                checked += 1
    assert checked >= 6


def test_tree_mask_forced_on_a_hybrid_decoder_is_caught(fkit, teacher_of, tmp_path, monkeypatch):
    """The leak the mask-free path exists for: with the tree-mask path forced on a hybrid decoder (a linear-attention
    or convolution layer takes no mask), the branch tokens flow into the sequence's recurrent / conv states and the
    cached branch distributions are no longer the model on prefix + candidate; the TPA check above says so."""
    from alignti.common.adapters import ModelAdapter
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    model, proc = teacher_of(fkit)
    if adapter_class(model.config.model_type)(model).tpa_tree_mask:
        pytest.skip("an attention-only decoder: the tree mask is its TPA path")
    monkeypatch.setattr(ModelAdapter, "tpa_tree_mask", property(lambda self: True))
    dump_teacher(DumpConfig(teacher=str(fkit.root / "kit/teacher"), data=str(fkit.root / "data.json"),
                            images=str(fkit.images), out=str(tmp_path / "cache"), top_k=16, tpa_top_k=8,
                            tpa_branches=3, logprob_encoding="float16", saliency_layer="none", batch_size=8,
                            progress=False))
    leaky = Kit(fkit.family, fkit.root, fkit.data, CacheReader(str(tmp_path / "cache")))
    with pytest.raises(AssertionError):
        _check_tpa(leaky, model, proc)


def test_saliency_is_the_eager_attention_of_the_chosen_layer(fkit):
    model, proc = _auto(fkit.root / "kit/teacher", attn_implementation="eager")
    layer = int(fkit.cache.params["saliency_layer"])
    # the model returns the attention of its softmax-attention layers only (a hybrid decoder's linear-attention and
    # convolution layers have none): the chosen layer's place among them
    lm = getattr(model.model, "language_model", None) or model.model.text_model  # Idefics3 / SmolVLM: text_model
    at = sum(hasattr(m, "self_attn") for m in lm.layers[:layer])
    assert hasattr(lm.layers[layer], "self_attn")
    for item in fkit.data:
        x = _row(fkit, item["id"])
        inputs = own_inputs(proc, item, fkit.images)
        with torch.no_grad():
            att = model(**inputs, output_attentions=True).attentions[at][0]
        cols = np.flatnonzero(inputs["input_ids"][0].numpy() == int(model.config.image_token_id))  # the model's
        # the cache's: its image spans, one per image, each from an image token to one past an image token; their
        # image tokens (Mistral 3: without the row ends between an image's rows) are the saliency's columns
        spans = x["image_spans"]
        assert len(spans) == (len(item["image"]) if isinstance(item["image"], list) else 1)
        assert all(x["input_ids"][s] == x["input_ids"][e - 1] == model.config.image_token_id for s, e in spans)
        assert np.array_equal(cols, span_image_positions(x["input_ids"], spans).numpy())
        rows = []
        for qs, qe in x["instr_spans"]:
            a = att[:, qs:qe][:, :, cols].mean(0).mean(0).double()
            rows.append((a / a.sum()).numpy())
        np.testing.assert_allclose(x["saliency"].astype(np.float64), np.stack(rows), rtol=FP16_REL, atol=FP32_MOVE,
                                   err_msg=item["id"])


def test_student_branches_are_the_model_on_prefix_plus_candidate_with_its_gradients(fkit):
    """The student side of TPA on a hybrid decoder (mask-free: common/branch_states.py ``snapshot_branch_hidden``): the
    final hidden state after each cached candidate equals the student's own forward on prefix + candidate, and a loss
    on them back-propagates the same gradients as through that forward (vision tower included)."""
    from alignti.common.adapters import adapter_for
    from alignti.common.batch import forward, tpa_layout
    from alignti.common.models import load_vlm
    from alignti.student_train.data import CacheDataset, StudentCollator
    student = fkit.root / "kit/student"
    model, proc = load_vlm(str(student), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    if adapter.tpa_tree_mask:
        pytest.skip("an attention-only decoder: its branches take the tree mask (checked through the KD/TPA steps)")
    data = CacheDataset(fkit.cache, proc)
    idx = [i for i in range(len(fkit.cache)) if fkit.cache[i]["sample_id"] in ("multi-turn", fkit.data[0]["id"])]
    items = [data[i] for i in idx]
    batch = StudentCollator(proc, type(adapter))([dict(x) for x in items])
    sel = [torch.as_tensor(fkit.cache[i]["tpa_pos"]).long() for i in idx]
    _, pos = tpa_layout(batch["resp_pos"], sel)
    cands = [torch.as_tensor(fkit.cache[i]["tpa_cand_ids"]).long() for i in idx]
    out = forward(adapter, batch, branch_cands=cands, branch_pos=pos)
    torch.manual_seed(0)
    probe = torch.randn_like(out.branch_hidden)
    (out.branch_hidden * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref_model, ref_proc = _auto(student)
    ref_model.train()
    total, row = 0.0, 0
    want_h = []
    for b, i in enumerate(idx):
        item = next(it for it in fkit.data if it["id"] == fkit.cache[i]["sample_id"])
        inputs = own_inputs(ref_proc, item, fkit.images)
        keys = _seq_keys(inputs)
        for j, p in enumerate(pos[b].tolist()):
            for c, cand in enumerate(cands[b][j].tolist()):
                branch = {k: v for k, v in inputs.items() if k not in keys}
                for k in keys:
                    last = torch.tensor([[cand if k == "input_ids" else (1 if k == "attention_mask" else 0)]],
                                        dtype=inputs[k].dtype)
                    branch[k] = torch.cat([inputs[k][:, :p], last], 1)
                h = ref_model.model(**branch).last_hidden_state[0, -1]
                want_h.append(h.detach())
                total = total + (h * probe[row // probe.shape[1], row % probe.shape[1]]).sum()
                row += 1
    assert row == probe.shape[0] * probe.shape[1] and row >= 6
    torch.testing.assert_close(out.branch_hidden.detach().reshape(row, -1), torch.stack(want_h), rtol=0, atol=1e-4)
    total.backward()
    want = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    tower = adapter.vision_prefixes + adapter.projector_prefixes
    assert any(n.startswith(tower) for n in got)  # the image features carry the branches' gradient too
    assert set(got) == set(want)
    # the same sums in another order and other kernels (branch_states: the prefix once, in segments, through the
    # chunked Gated DeltaNet kernel; each candidate through the recurrent one), fp32: every gradient within 5e-5 of
    # the largest gradient element of the module it belongs to (a layer's kernel rounding moves all of that layer's
    # gradients on one scale). Not of its own largest element: the gated decay's parameters (dt_bias, A_log) have
    # gradients that are sums over every token with cancellation, their elements far below the module's scale
    # (measured: A_log 8.4e-5 of its own largest element; every parameter <= 5.3e-6 of its module's, qwen3_5 and
    # qwen3_5_moe). Plus eps32 of the largest gradient of all for gradients that are zero in exact arithmetic (a
    # softmax attention's key bias: adding it shifts each query's scores by one constant, which the softmax cancels;
    # LFM2-VL's SigLIP2 tower has separate k_proj biases: 6.5e-8 apart, measured, under eps32 of a largest gradient
    # above 0.5)
    largest = {n: float(g.abs().max()) for n, g in want.items()}
    top = max(largest.values())
    for n in want:
        module = n.rsplit(".", 1)[0] + "."
        scale = max(v for m, v in largest.items() if m.startswith(module)) or 1.0  # its module's, submodules included
        bound = 5e-5 * scale + EPS32 * top
        assert float((got[n] - want[n]).abs().max()) <= bound, (n, float((got[n] - want[n]).abs().max()), scale)


def test_kd_step_gradients_are_plain_autograd(fkit):
    """alignti's step (loss kd, memory-flat head, its own masks and positions) against autograd of SFT + forward
    KL(teacher top-k + rest || student on the same buckets) through the student's own forward; a MoE student adds
    its load-balancing loss as the model's own training loss does (the library's ``load_balancing_loss_func`` over
    the step's tokens, times the config's ``router_aux_loss_coef``)."""
    import sys
    from tests.grad_probe import step_gradients
    student = fkit.root / "kit/student"
    got = step_gradients(str(student), str(fkit.root / "cache"), "kd", per_micro=8)
    model, proc = _auto(student)
    model.train()
    moe = getattr(model.config.text_config, "num_experts", None)
    n_tokens = sum(int(_row(fkit, it["id"])["response_mask"].sum()) for it in fkit.data)
    total, routers = 0.0, []
    for item in fkit.data:
        x = _row(fkit, item["id"])
        out = model(**own_inputs(proc, item, fkit.images), **({"output_router_logits": True} if moe else {}))
        routers.append(out.router_logits if moe else None)
        pos = np.flatnonzero(x["response_mask"])
        ls = torch.log_softmax(out.logits[0].float(), -1)[pos - 1]
        ids = torch.as_tensor(x["topk_ids"]).long()
        sft = -ls.gather(-1, torch.as_tensor(x["input_ids"][pos]).long()[:, None]).sum()
        lt = torch.log_softmax(torch.cat([torch.as_tensor(x["topk_logprobs"]).float(),
                                          torch.as_tensor(x["tail_logmass"]).float()[:, None]], -1), -1)
        lsb = torch.cat([ls.gather(-1, ids), ls.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)], -1)
        total = total + ((lt.exp() * (lt - lsb)).sum() + sft) / n_tokens
    if moe:  # one micro-batch: the load-balancing loss over all its tokens
        balance = sys.modules[type(model).__module__].load_balancing_loss_func
        layers = tuple(torch.cat(per_layer) for per_layer in zip(*routers))
        cfg = model.config.text_config
        total = total + cfg.router_aux_loss_coef * balance(layers, cfg.num_experts, cfg.num_experts_per_tok)
    total.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) <= set(want) and len(got) > 0
    for n, g in got.items():
        scale = float(want[n].abs().max())
        torch.testing.assert_close(g, want[n], rtol=0, atol=1e-5 * scale + EPS32, msg=n)
    assert any(float(g.abs().max()) > 0 for g in got.values())


def test_rollout_candidates_are_the_top_b_of_the_generations_logits(fkit, tmp_path):
    from tests.test_rollout import _check_candidates, _rollout
    _rollout(fkit.root / "kit", fkit.root / "data.json", tmp_path / "r", temperature=1.3, top_b=4, max_new_tokens=4)
    assert _check_candidates(fkit.root / "kit", tmp_path / "r", fkit.images) >= 4


def test_pruned_student_trains_and_its_run_loads_with_the_auto_classes(fkit, tmp_path, monkeypatch):
    """... and a tower of a modality distillation does not feed (the adapter's ``frozen_prefixes``: Gemma 4's audio)
    is neither run nor trained: it comes back from the saved run bit for bit the teacher's."""
    from alignti.student_build.prune import prune_student
    from alignti.student_train.trainer import TrainConfig, train_student
    from tests.helpers import generate_once
    from transformers import AutoConfig
    types = getattr(AutoConfig.from_pretrained(fkit.root / "kit/teacher").text_config, "layer_types", None) or []
    keep = next((i for i, t in enumerate(types) if t == "full_attention"), 0)  # IVA needs a global layer
    info = prune_student(str(fkit.root / "kit/teacher"), str(keep), tmp_path / "student")
    assert info["student_params"] < info.get("teacher_params", float("inf"))
    frozen = FAMILIES[fkit.family].adapter.frozen_prefixes
    teacher = dict(_auto(fkit.root / "kit/teacher")[0].named_parameters()) if frozen else {}
    modules = teacher_modules(fkit) if frozen else []
    for prefix in frozen:  # its top module's forward, run, fails the training (where no other module has its class)
        module = next(m for n, m in modules if n + "." == prefix)
        if any(type(m) is type(module) for n, m in modules if not (n + ".").startswith(frozen)):
            continue  # (Gemma 4's embed_audio is the class of embed_vision too; it runs only on the tower's output)

        def never(*args, _prefix=prefix, **kwargs):
            raise AssertionError(f"{_prefix} ran")
        monkeypatch.setattr(type(module), "forward", never)
    run = train_student(TrainConfig(student=str(tmp_path / "student"), cache=str(fkit.root / "cache"),
                                    out=str(tmp_path / "run"), loss="alignti", max_steps=2, batch_size=4,
                                    progress=False))
    monkeypatch.undo()
    generate_once(run["final"])
    if frozen:
        saved = dict(_auto(run["final"])[0].named_parameters())
        names = [n for n in teacher if n.startswith(frozen)]
        assert names and all(torch.equal(saved[n], teacher[n]) for n in names)


def teacher_modules(fkit: Kit):
    """The teacher's named modules (built on the meta device: their classes only)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText
    with init_empty_weights():
        return list(AutoModelForImageTextToText.from_config(
            AutoConfig.from_pretrained(fkit.root / "kit/teacher")).named_modules())


def _family_lm(fkit, out: Path, lm_type: str) -> Path:
    """A causal LM of ``lm_type`` (the family's decoder kind) at the kit student's text dimensions, with the kit's
    tokenizer, saved: the --lm of a composed student."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from alignti.common.models import load_processor
    text = AutoConfig.from_pretrained(fkit.root / "kit/student").text_config.to_dict()
    rope = {k: v for k, v in (text.get("rope_parameters") or {}).items() if not k.startswith("mrope")}
    keys = set(AutoConfig.for_model(lm_type).to_dict()) - {"model_type", "architectures", "transformers_version"}
    cfg = AutoConfig.for_model(lm_type, **{k: v for k, v in dict(text, rope_parameters=rope).items() if k in keys})
    torch.manual_seed(3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    load_processor(str(fkit.root / "kit/teacher")).tokenizer.save_pretrained(out)
    return out


def test_composed_student_trains_and_its_folder_loads_with_the_auto_classes(fkit, tmp_path):
    """make-student --vision (the kit teacher's tower) --lm (a causal LM of the family's decoder kind, narrower than
    the teacher's) --like (the kit teacher): the student holds the LM's weights and the tower's bit for bit, the
    family's projectors start fresh (named in the marker), it trains a step on the teacher's cache and its run folder
    loads with the Auto classes, processor included, and generates. Families whose adapter composes no student are
    skipped, saying so."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from alignti.common.models import FRESH_MARKER
    from alignti.student_build.compose import compose_student
    from alignti.student_train.trainer import TrainConfig, train_student
    from tests.helpers import generate_once
    comp = FAMILIES[fkit.family].adapter.composition
    if comp is None:
        pytest.skip(f"{fkit.family}: its adapter composes no student (make-student --vision/--lm refuses it; "
                    "--from-teacher builds one)")
    teacher = fkit.root / "kit/teacher"
    lm_type = comp.lm_types[0] if comp.lm_types else AutoConfig.from_pretrained(teacher).text_config.model_type
    lm = _family_lm(fkit, tmp_path / "lm", lm_type)
    out = tmp_path / "student"
    info = compose_student(str(teacher), str(lm), str(teacher), out)
    student, _ = _auto(out)
    st = student.state_dict()
    for k, v in AutoModelForCausalLM.from_pretrained(lm).state_dict().items():
        want = "model.language_model." + k[len("model."):] if k.startswith("model.") else k
        assert torch.equal(st[want], v), k
    tower = "model." + comp.tower + "."
    fresh = tuple("model." + f + "." for f in comp.fresh)
    src = {k: v for k, v in _auto(teacher)[0].state_dict().items() if k.startswith(tower) and not k.startswith(fresh)}
    assert src and all(torch.equal(st[k], v) for k, v in src.items())
    assert json.loads((out / FRESH_MARKER).read_text())["fresh"] == ["model." + f for f in comp.fresh]
    assert info["projector_params"] == sum(v.numel() for k, v in st.items() if k.startswith(fresh))
    run = train_student(TrainConfig(student=str(out), cache=str(fkit.root / "cache"), out=str(tmp_path / "run"),
                                    loss="alignti", max_steps=1, batch_size=4, progress=False))
    generate_once(run["final"])


# --- the registry ----------------------------------------------------------------------------------------------
def test_every_model_type_of_the_registry_has_its_adapter_and_transformers_class():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    for model_type, fam in FAMILIES.items():
        assert adapter_class(model_type) is fam.adapter and model_type in fam.adapter.model_types
        assert model_type in CONFIG_MAPPING and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        if fam.kit is not None:
            assert fam.kit.chat_template and fam.kit.image_tokens > 0



def test_the_readme_table_is_the_registry():
    from alignti.common.adapters import families_table
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index("<!-- families-table")
    block = text[text.index("\n", start) + 1:text.index("<!-- /families-table -->")].strip()
    assert block == families_table(), "README's families table differs from the registry: paste families_table()"


def test_sliding_layers_are_refused_for_saliency():
    """IVA's saliency comes from a layer whose attention reaches every earlier token: a Gemma 3 sliding-window layer
    is refused by name, a student without a global layer too, and the proportional choice lands on a global one."""
    from alignti.student_train.trainer import student_layer_for
    assert student_layer_for(None, 1, 2, 4, allowed=[1, 3]) == 1
    assert student_layer_for(None, 0, 2, 2, allowed=[1]) == 1
    with pytest.raises(ValueError, match="not a full-attention layer of the student"):
        student_layer_for(0, 1, 2, 2, allowed=[1])
    with pytest.raises(ValueError, match="no full-attention layer"):
        student_layer_for(None, 1, 2, 1, allowed=[])


def test_dump_refuses_a_sliding_saliency_layer(tmp_path):
    from alignti.demo.kit import make_demo
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    if "gemma3" not in DEMO_FAMILIES:
        pytest.skip("no sliding-window family in the registry")
    make_demo(tmp_path / "kit", n_train=2, n_val=1, n_test=1, train_teacher=False, family="gemma3")
    with pytest.raises(ValueError, match=r"--saliency-layer 0 is a sliding-window layer of the gemma3 teacher.*\[1\]"):
        dump_teacher(DumpConfig(teacher=str(tmp_path / "kit/teacher"), data=str(tmp_path / "kit/data/train.json"),
                                images=str(tmp_path / "kit/data/images"), out=str(tmp_path / "c"), saliency_layer="0",
                                progress=False))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_dump_refuses_a_saliency_layer_without_attention(fkit):
    """A hybrid teacher's linear-attention / convolution layer has no attention probabilities: --saliency-layer naming
    one is refused by name and kind, before the teacher runs; a student pruned to such layers only says so."""
    from alignti.common.adapters import adapter_for
    from alignti.common.models import load_vlm
    from alignti.student_build.prune import prune_model
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    model, _ = load_vlm(str(fkit.root / "kit/teacher"), torch.device("cpu"), "float32")
    adapter = adapter_for(model)
    bare = [i for i, t in enumerate(adapter.layer_types()) if t not in ("full_attention", "sliding_attention")]
    if not bare:
        pytest.skip("every layer of this decoder is softmax attention")
    kind = adapter.layer_types()[bare[0]]
    out = fkit.root / "refused"
    with pytest.raises(ValueError, match=rf"--saliency-layer {bare[0]} is a {kind} layer of the {fkit.family} teacher"
                                         rf".*{adapter.saliency_layers()}".replace("[", r"\[").replace("]", r"\]")):
        dump_teacher(DumpConfig(teacher=str(fkit.root / "kit/teacher"), data=str(fkit.root / "data.json"),
                                images=str(fkit.images), out=str(out), saliency_layer=str(bare[0]), progress=False))
    assert not (out / "manifest.json").exists()
    notes = prune_model(model, [bare[0]])
    assert any("no full-attention layer is left for IVA" in n for n in notes)
    assert model.config.text_config.layer_types == [kind]


# LFM2-VL's kit tiles a 48-px scene (2x2 tiles of 4 tokens + a 2x2-token thumbnail); these sizes give other tilings:
# 1x2 tiles + a 1x2-token thumbnail (its patches padded in the tower's input), 3x1 tiles + a 3x1-token thumbnail,
# one untiled 2x2 grid
LFM2_VL_SIZES = {"wide": ((96, 48), (1, 2), (1, 2)), "tall": ((48, 144), (3, 1), (3, 1)),
                 "small": ((24, 24), (1, 1), None)}


@pytest.mark.parametrize("fkit", ["lfm2_vl"], indirect=True)
def test_lfm2_vl_tilings_in_one_batch_are_the_models_own(fkit, teacher_of, tmp_path):
    """LFM2-VL images of several tilings in one padded batch (the kit's scenes resized: 2x2 tiles + thumbnail, 1x2 +
    thumbnail, 3x1 + thumbnail, untiled; 4 to 5 tiles per sample): the dump's ids, top-k and rest mass, TPA
    distributions and saliency (over every tile's and the thumbnail's tokens) and the KD step's gradients are the
    model's own, by the suite's checks above; each image's recorded layout is the processor's own tiling
    (``return_row_col_info``), its token count the image's; show-saliency draws each tiled image per view."""
    from alignti.common.tiles import layouts_of
    from alignti.teacher_dump.dump import DumpConfig, dump_teacher
    _, proc = teacher_of(fkit)
    (tmp_path / "kit").symlink_to(fkit.root / "kit")  # the kit's checkpoints and images, this test's data and cache
    scenes = {}
    for name, ((w, h), _, _) in LFM2_VL_SIZES.items():
        src = fkit.data[0]["image"]
        Image.open(fkit.images / src).convert("RGB").resize((w, h)).save(fkit.images / f"tiling_{name}.png")
        scenes[name] = f"tiling_{name}.png"
    single, multi, two = (json.loads(json.dumps(it)) for it in fkit.data)
    single["image"], multi["image"] = scenes["wide"], scenes["small"]
    two["image"] = [scenes["tall"], two["image"][1]]
    data = [single, multi, two]
    (tmp_path / "data.json").write_text(json.dumps(data))
    dump_teacher(DumpConfig(teacher=str(tmp_path / "kit/teacher"), data=str(tmp_path / "data.json"),
                            images=str(fkit.images), out=str(tmp_path / "cache"), top_k=16, tpa_top_k=8,
                            tpa_branches=3, logprob_encoding="float16", batch_size=8, progress=False,
                            saliency_layer=str(fkit.cache.params["saliency_layer"])))  # IRS: no two same-size images
    k = Kit(fkit.family, tmp_path, data, CacheReader(str(tmp_path / "cache")))
    image_token = proc.tokenizer.convert_tokens_to_ids("<image>")
    tilings = set()
    for item in data:
        x = _row(k, item["id"])
        refs = item["image"] if isinstance(item["image"], list) else [item["image"]]
        pics = [Image.open(fkit.images / r).convert("RGB") for r in refs]
        own = proc.image_processor(pics, return_row_col_info=True)
        lays = layouts_of(x.get("image_grids") or [], x.get("image_tiles"))
        for j, (lay, (s, e)) in enumerate(zip(lays, x["image_spans"])):
            tiles = (own["image_rows"][j], own["image_cols"][j])
            assert lay.tiles == tiles and lay.thumbnail == (tiles != (1, 1)), (item["id"], j, lay)
            assert lay.n_tokens == int((x["input_ids"][s:e] == image_token).sum())
            tilings.add(lay.tiles)
    assert tilings == {(2, 2), (1, 2), (3, 1), (1, 1)}
    from alignti.student_train.show_saliency import show_saliency  # each tiled image's map per view, as InternVL's
    shown = show_saliency(str(tmp_path / "cache"), two["id"], tmp_path / "s.png", images=str(fkit.images))
    assert shown["panels"] == [f"teacher (layer {k.cache.params['saliency_layer']}), image {i}{v}" for i, tiles in
                               ((1, "3x1"), (2, "2x2")) for v in (f", {tiles} tiles", ", thumbnail")]
    test_ids_are_the_processors_on_the_rendered_conversation(k, teacher_of)
    test_topk_and_rest_mass_are_the_models_own_forward(k, teacher_of)
    _check_tpa(k, *teacher_of(k))
    test_saliency_is_the_eager_attention_of_the_chosen_layer(k)
    test_kd_step_gradients_are_plain_autograd(k)


def test_lfm2_vl_layout_places_each_token_on_its_pixels():
    """The layout alignti records for an LFM2-VL image (common/tiles.py ``split_layouts``) puts each image token
    where the processor put its pixels: on an image whose red channel grows left to right and green top to bottom,
    each token's mean pixel (its 2x2 patches of the processor's ``pixel_values``, unshuffled row-major as the model's
    ``get_image_features``) grows along the columns, resp. rows, of the mosaic view (the tiles put back in place)
    and of the thumbnail view; the tiles are the processor's own (``return_row_col_info``). The shipped settings
    without a thumbnail (LFM2-VL-450M) and the kit's with one."""
    pytest.importorskip("torchvision")
    from transformers import Lfm2VlImageProcessor

    from alignti.common.tiles import ImageLayout, layouts_of, split_layouts
    from alignti.demo import kit
    kit_ip = kit.build_processor(kit.build_tokenizer("lfm2_vl"), "lfm2_vl").image_processor
    shipped = Lfm2VlImageProcessor(use_thumbnail=False)  # LFM2-VL-450M's processor_config: 512-px tiles, no thumbnail
    for ip, sizes in ((kit_ip, ((48, 48), (96, 48), (48, 144), (24, 24), (40, 16))),
                      (shipped, ((1024, 768), (1600, 400), (300, 200)))):
        for w, h in sizes:
            yy, xx = np.mgrid[0:h, 0:w]
            rgb = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.zeros_like(xx)], -1).astype(np.uint8)
            own = ip(Image.fromarray(rgb), return_row_col_info=True, return_tensors="pt")
            (lay,) = split_layouts(ip, [(h, w)], own["spatial_shapes"])
            assert lay.tiles == (own["image_rows"][0], own["image_cols"][0]) and lay.known, (w, h, lay)
            assert lay.thumbnail == (ip.use_thumbnail and lay.tiles != (1, 1))
            assert layouts_of([(0, 0)], lay.flat()) == [lay]  # the cache's entry reads back
            p, f = ip.encoder_patch_size, ip.downsample_factor
            means = []
            for t, (ph, pw) in enumerate(own["spatial_shapes"].tolist()):
                n = ph * pw
                px = own["pixel_values"][t, :n].reshape(ph, pw, p, p, 3).float().mean((2, 3))  # [ph, pw, rgb]
                tok = px.reshape(ph // f, f, pw // f, f, 3).mean((1, 3))  # each token's 2x2 patches
                means.append(tok.reshape(-1, 3))
            means = torch.cat(means)
            assert means.shape[0] == lay.n_tokens

            def ordered(layout):  # red grows along the columns, green along the rows, in every view
                return all(bool((v.diff(dim=axis) > 0).all()) for ch, axis in ((0, 1), (1, 0))
                           for v in layout.views(means[:, ch]) if v.shape[axis] > 1)
            assert ordered(lay), (w, h, lay)
            if lay.tiles[0] != lay.tiles[1]:  # the tiles read the other way round: not ordered (the check can fail)
                assert not ordered(ImageLayout(lay.grid, lay.tiles[::-1], lay.thumbnail, lay.thumb_grid))


def test_lfm2_vl_shipped_template_and_processor_settings(tmp_path):
    """LFM2-VL's shipped files (tests/data/tokenizers/lfm2-vl-450m: LiquidAI/LFM2-VL-450M's chat template, processor
    settings and special tokens; no public copy of its tokenizer.json was found, so the kit's byte-level BPE stands in
    for the ordinary vocabulary): the kit's chat template is the shipped one verbatim and names the shipped special
    tokens; with the shipped processor settings (16-px patches, 2x2 unshuffle, 64-256 image tokens, 512-px tiles, no
    thumbnail) at real image sizes, alignti's ids are the processor's own on the template-rendered conversation,
    single-turn, multi-turn, two images of other sizes, and a 1024x768 photo split into 2x3 tiles beside an untiled
    image; each image's recorded layout holds its image tokens."""
    pytest.importorskip("torchvision")
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

    from alignti.common.conversation import encode
    from alignti.common.kit_recipes import LFM2_VL_CHAT_TEMPLATE
    from alignti.common.sources import load_image, load_records
    from alignti.common.tiles import layouts_of
    from alignti.demo.kit import build_tokenizer
    ship = Path(__file__).parent / "data/tokenizers/lfm2-vl-450m"
    template = (ship / "chat_template.jinja").read_text()
    assert LFM2_VL_CHAT_TEMPLATE == template
    tok = build_tokenizer("lfm2_vl")
    specials = json.loads((ship / "special_tokens_map.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        assert getattr(tok, key) == specials[key]["content"]
    for key in ("image_token", "image_start_token", "image_end_token", "image_thumbnail"):
        assert specials[key] in tok.get_vocab()
    settings = json.loads((ship / "processor_config.json").read_text())
    pre = json.loads((ship / "preprocessor_config.json").read_text())
    keys = ("do_image_splitting", "downsample_factor", "encoder_patch_size", "max_image_tokens", "min_image_tokens",
            "max_pixels_tolerance", "max_tiles", "min_tiles", "tile_size", "use_thumbnail")
    ip = Lfm2VlImageProcessor(**{k: settings[k] for k in keys}, image_mean=pre["image_mean"],
                              image_std=pre["image_std"], resample=pre["resample"])
    proc = Lfm2VlProcessor(image_processor=ip, tokenizer=tok, chat_template=template)
    (tmp_path / "img").mkdir()
    for name, size in (("a.png", (512, 384)), ("b.png", (300, 200)), ("c.png", (640, 480)), ("d.png", (1024, 768))):
        Image.effect_noise(size, 40).convert("RGB").save(tmp_path / "img" / name)
    q = lambda text: {"from": "human", "value": text}  # noqa: E731
    a = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    items = [{"id": "single", "image": "a.png", "conversations": [q("<image>\nWhat is in the picture?"), a("A cat.")]},
             {"id": "multi-turn", "image": "c.png", "conversations": [
                 q("<image>\nWhat colour is it?"), a("red"), q("Is that certain?"), a("yes")]},
             {"id": "two-images", "image": ["a.png", "b.png"], "conversations": [
                 q("<image>\nHow many squares?"), a("2"), q("<image>\nAnd here?"), a("3")]},
             {"id": "tiled", "image": ["d.png", "b.png"], "conversations": [  # 2x3 tiles of 256 tokens, no thumbnail
                 q("<image>\nWhat is in the picture?"), a("A dog."), q("<image>\nAnd here?"), a("3")]}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    counts = set()
    image_token = tok.convert_tokens_to_ids("<image>")
    for rec, item in zip(load_records(tmp_path / "d.json"), items):
        enc = encode(proc, rec, *load_image(rec, tmp_path / "img"))
        want = own_inputs(proc, item, tmp_path / "img")["input_ids"][0].numpy()
        assert np.array_equal(enc.input_ids, want), item["id"]
        assert len(enc.image_spans) == len(rec.images)
        n = [int((want[s:e] == image_token).sum()) for s, e in enc.image_spans]
        assert sum(n) == int((want == image_token).sum())
        assert [lay.n_tokens for lay in layouts_of(enc.image_grids, enc.image_tiles)] == n
        counts.update(n)
    assert 6 * 256 in counts  # the tiled image
    assert len(counts - {6 * 256}) >= 2 and counts - {6 * 256} <= set(range(64, 257))  # untiled: the shipped bounds
