"""What the teacher computes per batch, on its device: top-k, transition statistics, saliency."""

from __future__ import annotations

import numpy as np
import torch

from common.batch import branch_pass, forward, lm_logits

NEG_INF = float("-inf")


def topk_fold(logits: torch.Tensor, k: int, targets: torch.Tensor | None = None, chunk: int = 2048):
    """Top-k log-probs (sorted descending), log of the rest mass, and the target's log-prob.
    Rows are processed in chunks so [rows, vocab] float32 never gets large."""
    ids, lps, tails, tgts = [], [], [], []
    for i in range(0, logits.shape[0], chunk):
        lp = torch.log_softmax(logits[i:i + chunk].float(), dim=-1)
        v, j = lp.topk(k, dim=-1, sorted=True)
        ids.append(j)
        lps.append(v)
        tails.append(lp.scatter(-1, j, NEG_INF).logsumexp(-1))
        if targets is not None:
            tgts.append(lp.gather(-1, targets[i:i + chunk, None].long()).squeeze(-1))
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(ids), cat(lps), cat(tails), cat(tgts)


def candidates(topk_ids: torch.Tensor, n_branch: int, exclude: int) -> torch.Tensor:
    """The teacher's n_branch most likely next tokens, skipping the image placeholder token (a branch
    token must be text). Needs k > n_branch."""
    top = topk_ids[:, :n_branch + 1]
    order = torch.argsort((top == exclude).int(), dim=-1, stable=True)[:, :n_branch]
    return top.gather(-1, order)


@torch.no_grad()
def teacher_batch(adapter, batch: dict, params: dict) -> dict[str, torch.Tensor]:
    """Everything the cache stores for one padded batch, as device tensors in response-token order."""
    k, n_branch, k2 = params["top_k"], params["tpa_branches"], params["tpa_top_k"]
    layer = params.get("saliency_layer")
    out = forward(adapter, batch, capture_layers=[layer] if layer is not None else (), use_cache=n_branch > 0)
    logits = lm_logits(adapter, out.resp_hidden)
    ids, lps, tail, target = topk_fold(logits, k, batch["targets"])
    res = {"topk_ids": ids, "topk_logprobs": lps, "tail_logmass": tail, "target_logprob": target}
    if n_branch > 0:
        cands = candidates(ids, n_branch, adapter.image_token_id)
        counts = [len(p) for p in batch["resp_pos"]]
        bh = branch_pass(adapter, batch, out, list(torch.split(cands, counts)))
        b_ids, b_lps, b_tail, _ = topk_fold(lm_logits(adapter, bh.reshape(-1, bh.shape[-1])), k2)
        res.update(tpa_cand_ids=cands, tpa_ids=b_ids.view(-1, n_branch, k2),
                   tpa_logprobs=b_lps.view(-1, n_branch, k2), tpa_tail=b_tail.view(-1, n_branch))
    if layer is not None and out.sal_groups is not None:
        res["saliency"] = out.saliency[layer]
        res["sal_group_batch"] = out.sal_groups.group_batch
    return res


def split_per_sample(res: dict[str, torch.Tensor], batch: dict) -> list[dict[str, np.ndarray]]:
    """Move a batch's results to the host once and cut them per sample (runs on the writer side)."""
    host = {n: t.detach().to("cpu") for n, t in res.items()}
    counts = [len(p) for p in batch["resp_pos"]]
    out = [{} for _ in counts]
    for name, t in host.items():
        if name in ("saliency", "sal_group_batch"):
            continue
        for b, piece in enumerate(torch.split(t, counts)):
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
