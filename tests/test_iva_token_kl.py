"""IVA's second reading, `--iva-form token-kl`: the dump caches (only when asked, `--iva-token-kl`) each turn's top-r
salient image tokens, their renormalised saliency and the teacher's output distribution there; the student aligns
its own outputs at those tokens. Checked against the teacher model run directly; caches without it still train
with the attention form and refuse the token-KL one by name."""

import math

import numpy as np
import pytest
import torch

from alignti.common.cache import CacheReader, packed_settings
from alignti.common.conversation import encode
from alignti.common.sources import load_image, load_records
from alignti.common.errors import CacheError
from alignti.common.models import load_vlm
from alignti.student_train.trainer import TrainConfig, train_student
from alignti.teacher_dump.dump import DumpConfig, dump_teacher
from tests.exactness import assert_packed_within_bound, assert_topk_ids_of


@pytest.fixture(scope="module")
def tkl_cache(kit, tmp_path_factory):
    out = tmp_path_factory.mktemp("tkl") / "c"
    dump_teacher(DumpConfig(teacher=str(kit / "teacher"), data=str(kit / "data/train.json"),
                            images=str(kit / "data/images"), out=str(out), limit=12, saliency_layer="1",
                            iva_token_kl=True, iva_token_ratio=0.3, progress=False))
    return out


def test_cached_token_kl_statistics_are_the_teachers(kit, tkl_cache):
    reader = CacheReader(str(tkl_cache))  # the default encoding (packed, k = 64)
    assert reader.params["logprob_encoding"] == "packed" and reader.params["top_k"] == 64
    assert reader.params["iva_token_kl"] is True and reader.params["iva_token_ratio"] == 0.3
    model, proc = load_vlm(str(kit / "teacher"), torch.device("cpu"), "float32")
    recs = {r.sample_id: r for r in load_records(kit / "data/train.json")}
    k = reader.params["top_k"]
    for i in range(len(reader)):
        x = reader[i]
        n_v, turns = x["n_image_tokens"], len(x["resp_spans"])
        r = math.ceil(0.3 * n_v)
        assert len(x["ivak_pos"]) == turns * r
        sal = x["saliency"].astype(np.float32)
        for t in range(turns):
            pos = x["ivak_pos"][t * r:(t + 1) * r]
            assert list(pos) == sorted(pos)
            rest = np.setdiff1d(np.arange(n_v), pos)
            assert sal[t, pos].min() >= (sal[t, rest].max() if len(rest) else 0) - 1e-3  # the top-r salient tokens
            np.testing.assert_allclose(x["ivak_weight"][t * r:(t + 1) * r], sal[t, pos] / sal[t, pos].sum(),
                                       rtol=2e-3)
        # the teacher's own output distribution at those tokens (a plain forward of the model)
        rec = recs[x["sample_id"]]
        img, sha = load_image(rec, kit / "data/images")
        enc = encode(proc, rec, img, sha)
        with torch.no_grad():
            logits = model(input_ids=torch.as_tensor(enc.input_ids[None], dtype=torch.long),
                           **enc.image_inputs).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        seq = np.arange(x["image_tok_start"], x["image_tok_start"] + n_v)[x["ivak_pos"]]
        top = lp[seq].topk(k)
        # the dump's batched forward against HF's plain one: fp32 log-probs that may move by a few ulp (1e-5, as in
        # test_cache; 0.0 on this box), so ranks k and k + 1 may trade places where that close; any other id is wrong
        assert_topk_ids_of(x["ivak_ids"], lp[seq], 1e-5, "ivak_ids", ordered=False)
        if reader.params["logprob_encoding"] == "packed":  # the default: the codec's stated bound at the cached ids
            st = packed_settings(reader.params)
            at = lp[seq].gather(-1, torch.as_tensor(x["ivak_ids"]).long()).numpy()
            assert_packed_within_bound(x["ivak_logprobs"], at, st["head"], st["head_step"], st["tail_step"], 1e-5,
                                       "ivak_logprobs")
        else:  # float16
            got = np.take_along_axis(x["ivak_logprobs"].astype(np.float32), np.argsort(x["ivak_ids"], 1), 1)
            want = np.take_along_axis(top.values.numpy(), np.argsort(top.indices.numpy(), 1), 1)
            np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-3)


def test_student_trains_with_either_form(kit, tkl_cache, cache, tmp_path):
    common = dict(student=str(kit / "student"), loss="alignti", max_steps=2, batch_size=4, progress=False)
    tok = train_student(TrainConfig(cache=str(tkl_cache), out=str(tmp_path / "a"), iva_form="token-kl", **common))
    att = train_student(TrainConfig(cache=str(tkl_cache), out=str(tmp_path / "b"), **common))
    assert tok["last"]["iva"] > 0 and att["last"]["iva"] > 0 and tok["last"]["iva"] != att["last"]["iva"]
    with pytest.raises(CacheError, match="re-dump with --iva-token-kl"):
        train_student(TrainConfig(cache=str(cache), out=str(tmp_path / "c"), iva_form="token-kl", **common))
    with pytest.raises(ValueError, match="--iva-form must be one of attention, token-kl"):
        train_student(TrainConfig(cache=str(cache), out=str(tmp_path / "d"), iva_form="kl", **common))
