"""What the teacher computes per batch, on its device: top-k, transition statistics, saliency."""

from __future__ import annotations

import math

import numpy as np
import torch

from alignti.common.batch import branch_pass, forward, image_token_positions, lm_head, tpa_layout
from alignti.common.losses import chunk_rows
from alignti.common.schema import IVAK_ARRAYS, tpa_positions_layout

NEG_INF = float("-inf")


def topk_fold_hidden(hidden: torch.Tensor, head: torch.nn.Module, k: int,
                     targets: torch.Tensor | None = None, chunk: int | None = None, entropy: bool = False,
                     temperature: float = 1.0, ids_below: int | None = None):
    """Top-k log-probs (sorted descending), log of the rest mass and the target's log-prob, straight from
    hidden states [R, H] through the LM head ``head`` (V rows), one row chunk at a time, so [rows, V] logits never
    exist for the whole batch (the same chunking as the student's loss head, common.losses.chunk_rows).

    ``temperature`` tau: the distribution is softmax(z / tau) over the whole head (the tempered teacher, exact: its
    rest mass sums every tempered member, docs/method.md "Temperature"); the target's log-prob stays the model's own
    (tau = 1). ``ids_below`` N: the top-k is taken among ids < N only (the ids a tokenizer of N ids produces; an LM
    head padded past it has rows no text maps to), and the mass of the ids >= N stays in the rest bucket. Returns
    (ids [R, k] int64, log-probs [R, k], rest log-mass [R], target log-prob [R] or None, the tempered
    distribution's entropy [R] in nats or None)."""
    if chunk is None:
        chunk = chunk_rows(head.weight.shape[0], None, hidden.device)
    ids, lps, tails, tgts, ents = [], [], [], [], []
    for i in range(0, hidden.shape[0], chunk):
        z = head(hidden[i:i + chunk]).float()
        lp = torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)
        if targets is not None:  # the model's own log-prob of its realised token, at temperature 1
            tgt = targets[i:i + chunk, None].long().to(z.device)  # with a device map the head may sit on another GPU
            tgts.append(lp.gather(-1, tgt).squeeze(-1) if temperature == 1.0 else
                        z.gather(-1, tgt).squeeze(-1) - z.logsumexp(-1))
        del z
        v, j = (lp if ids_below is None or ids_below >= lp.shape[-1] else lp[:, :ids_below]).topk(k, dim=-1,
                                                                                                   sorted=True)
        ids.append(j)
        lps.append(v)
        if entropy:  # -sum p log p with one [rows, V] temporary, updated in place (the same ops, bit for bit)
            plp = lp.exp().mul_(lp).nan_to_num_(0.0)
            ents.append(-plp.sum(-1))
            del plp
        tails.append(lp.scatter_(-1, j, NEG_INF).logsumexp(-1))
        del lp
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(ids), cat(lps), cat(tails), cat(tgts), cat(ents)


def candidates(topk_ids: torch.Tensor, n_branch: int, exclude: int) -> torch.Tensor:
    """The teacher's n_branch most likely next tokens, skipping the image placeholder token (a branch
    token must be text). Needs k > n_branch."""
    top = topk_ids[:, :n_branch + 1]
    order = torch.argsort((top == exclude).int(), dim=-1, stable=True)[:, :n_branch]
    return top.gather(-1, order)


def select_tpa_positions(entropy: torch.Tensor | None, counts: list[int], fraction: float) -> list[torch.Tensor]:
    """Per sample, the response-token indices that get TPA statistics: all of them at fraction 1, else the
    ceil(fraction * n) positions where the teacher's next-token distribution has the highest entropy (where
    the teacher hesitates between continuations, the transitions carry the most), in position order."""
    out, at = [], 0
    for n in counts:
        if fraction >= 1.0 or n == 0:
            out.append(torch.arange(n, device=entropy.device if entropy is not None else None))
        else:
            keep = max(1, math.ceil(fraction * n))
            e = entropy[at:at + n]
            top = torch.topk(e, keep, sorted=False).indices  # ties: topk's order is not stable; sort after
            out.append(torch.sort(top).values)
        at += n
    return out


@torch.no_grad()
def teacher_batch(adapter, batch: dict, params: dict) -> dict[str, torch.Tensor]:
    """Everything the cache stores for one padded batch, as device tensors in response-token order
    (TPA arrays in TPA-row order, with tpa_pos / tpa_counts saying which response tokens they belong to)."""
    k, n_branch, k2 = params["top_k"], params["tpa_branches"], params["tpa_top_k"]
    layer = params.get("saliency_layer")
    fraction = float(params.get("tpa_positions", 1.0))
    out = forward(adapter, batch, capture_layers=[layer] if layer is not None else (), use_cache=n_branch > 0,
                  keep_hidden=bool(params.get("iva_token_kl")))
    head = lm_head(adapter)
    fold = dict(temperature=float(params.get("temperature", 1.0)), ids_below=params.get("ids_below"))
    ids, lps, tail, target, ent = topk_fold_hidden(out.resp_hidden, head, k, batch["targets"],
                                                   entropy=n_branch > 0 and fraction < 1.0, **fold)
    res = {"topk_ids": ids, "topk_logprobs": lps, "tail_logmass": tail, "target_logprob": target}
    if n_branch > 0:
        counts = [len(p) for p in batch["resp_pos"]]
        sel = select_tpa_positions(ent, counts, fraction)
        rows, pos = tpa_layout(batch["resp_pos"], sel)
        cands = candidates(ids.index_select(0, rows.to(ids.device)), n_branch, adapter.image_token_id)
        if batch.get("student_cands") is not None:  # on-policy rows: the student's candidates where they apply
            student = batch["student_cands"].to(ids.device).index_select(0, rows.to(ids.device))
            use = student[:, 0] >= 0
            cands = torch.where(use[:, None], student, cands)
            res["tpa_student"] = use
        tpa_counts = [len(s) for s in sel]
        bh = branch_pass(adapter, batch, out, list(torch.split(cands, tpa_counts)), branch_pos=pos)
        b_ids, b_lps, b_tail, _, _ = topk_fold_hidden(bh.reshape(-1, bh.shape[-1]), head, k2, **fold)
        res.update(tpa_cand_ids=cands, tpa_ids=b_ids.view(-1, n_branch, k2),
                   tpa_logprobs=b_lps.view(-1, n_branch, k2), tpa_tail=b_tail.view(-1, n_branch))
        if tpa_positions_layout(params):
            res["tpa_pos"] = torch.cat(sel).to(ids.device, torch.int32)
        res["tpa_counts"] = torch.tensor(tpa_counts)
    if layer is not None and out.sal_groups is not None:
        res["saliency"] = out.saliency[layer]
        res["sal_group_batch"] = out.sal_groups.group_batch
        if params.get("iva_token_kl"):
            res.update(token_kl_stats(adapter, batch, out, res["saliency"], res["sal_group_batch"], k,
                                      float(params["iva_token_ratio"]), **fold))
    return res


def token_kl_stats(adapter, batch: dict, main, saliency: torch.Tensor, group_batch: torch.Tensor, k: int,
                   ratio: float, temperature: float = 1.0, ids_below: int | None = None) -> dict[str, torch.Tensor]:
    """IVA's token-KL reading: per (sample, turn) group, the r = ceil(ratio * n_image_tokens) image tokens the
    teacher's saliency ranks highest (in image-token order), their saliency renormalised over the r, and the
    teacher's output distribution at each (top-k + tail of the LM head on its final hidden state there, from the
    same forward: ``main.hidden``)."""
    dev = saliency.device
    gb = group_batch.tolist()
    pos, weight, rows_b, rows_p, counts = [], [], [], [], [0] * len(batch["resp_pos"])
    for g, b in enumerate(gb):
        n_v = int(batch["n_image_tokens"][b])
        r = max(1, math.ceil(ratio * n_v))
        s = saliency[g, :n_v].float()
        idx = torch.sort(torch.topk(s, r).indices).values
        pos.append(idx)
        weight.append(s[idx] / s[idx].sum().clamp_min(1e-30))
        rows_b.append(torch.full((r,), b, dtype=torch.long, device=dev))
        rows_p.append(image_token_positions(batch, b).to(dev)[idx])
        counts[b] += r
    at = main.hidden.device  # with a device map, the last layer's GPU
    hidden = main.hidden[torch.cat(rows_b).to(at), torch.cat(rows_p).to(at)]
    ids, lps, tail, _, _ = topk_fold_hidden(hidden, lm_head(adapter), k, temperature=temperature,
                                            ids_below=ids_below)
    return {"ivak_pos": torch.cat(pos).to(torch.int32), "ivak_weight": torch.cat(weight), "ivak_ids": ids,
            "ivak_logprobs": lps, "ivak_tail": tail, "ivak_counts": torch.tensor(counts)}


TPA_ROW_ARRAYS = ("tpa_pos", "tpa_cand_ids", "tpa_ids", "tpa_logprobs", "tpa_tail", "tpa_student")


def split_per_sample(res: dict[str, torch.Tensor], batch: dict) -> list[dict[str, np.ndarray]]:
    """Move a batch's results to the host once and cut them per sample (runs on the writer side)."""
    host = {n: t.detach().to("cpu") for n, t in res.items()}
    counts = [len(p) for p in batch["resp_pos"]]
    tpa_counts = host["tpa_counts"].tolist() if "tpa_counts" in host else counts
    out = [{} for _ in counts]
    ivak_counts = host["ivak_counts"].tolist() if "ivak_counts" in host else None
    for name, t in host.items():
        if name in ("saliency", "sal_group_batch", "tpa_counts", "ivak_counts"):
            continue
        sizes = tpa_counts if name in TPA_ROW_ARRAYS else ivak_counts if name in IVAK_ARRAYS else counts
        for b, piece in enumerate(torch.split(t, sizes)):
            out[b][name] = piece.numpy()
    for b in range(len(counts)):
        out[b]["saliency"] = np.zeros(0, np.float16)
    if "saliency" in host:
        gb = host["sal_group_batch"]
        for b in range(len(counts)):
            n_v = batch["n_image_tokens"][b]
            rows = host["saliency"][gb == b][:, :n_v]
            out[b]["saliency"] = rows.reshape(-1).numpy().astype(np.float16)
    return out


BLIND_TOLERANCE = 1e-4  # nats: an fp32 forward with another image moves a seeing teacher's log-probs by far more


@torch.no_grad()
def image_dependence(adapter, processor, records: list, images: str | None, device, max_length: int | None = None,
                     n: int = 2) -> list[tuple[str, float]]:
    """Whether the teacher's outputs depend on the image at all: for the first ``n`` one-image samples, the largest
    difference (nats) between its next-token log-probs at the response tokens with the sample's image and with a
    blank (mid-grey) image of the same size. A teacher whose vision tower or projector is random, zeroed or
    disconnected gives (near) 0 on every sample. Returns [(sample id, max |difference|)]; samples that cannot be
    read are passed over (the dump names them itself)."""
    from PIL import Image

    from alignti.common.batch import collate, to_device
    from alignti.common.conversation import encode
    from alignti.common.records import Record
    from alignti.common.sources import load_image
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    out = []
    for r in records:
        if len(out) >= n:
            break
        if not isinstance(r, Record) or len(r.images) != 1 or isinstance(r.image, list):
            continue
        try:
            img, sha = load_image(r, images)
            blank = Image.new("RGB", img.size, (128, 128, 128))
            encs = [encode(processor, r, im, sha, max_length=max_length) for im in (img, blank)]
        except Exception:  # noqa: BLE001 - a bad sample is the dump's to name, not this check's
            continue
        lps = []
        for enc in encs:
            batch = to_device(collate([enc.__dict__], pad, type(adapter)), device)
            hidden = forward(adapter, batch).resp_hidden
            lps.append(torch.log_softmax(lm_head(adapter)(hidden).float(), -1))
        out.append((r.sample_id, float((lps[0] - lps[1]).abs().max())))
    return out
