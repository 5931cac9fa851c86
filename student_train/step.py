"""One student training step as a module: the forward every loss needs, then the memory-flat loss head.

``student_step_outputs`` runs the student (vision tower, decoder with IVA's saliency capture and TPA's branch
tokens) and collects the hidden states and teacher tensors ``common.losses.head_loss`` consumes; ``StudentStep``
wraps both in one ``nn.Module`` so DDP / FSDP2 (``student_train.parallel.wrap``) see a single forward.
"""

from __future__ import annotations

from torch import nn

from alignti.common.batch import forward, lm_head
from alignti.common.losses import StepNorm, head_loss

from .mixture import batch_spec


def student_step_outputs(adapter, batch: dict, spec, layer: int, iva_form: str = "attention") -> dict:
    """The student's hidden states the loss head needs (see common.losses.head_loss), beside the batch's
    teacher tensors: resp_hidden [N, H], branch_hidden [M, B, H] for TPA, and for IVA student_sal (attention
    form) or ivak_hidden [R, H] at the teacher's salient image tokens (token-KL form)."""
    cands = batch.get("tpa_cand_list") if spec.tpa else None
    token_kl = spec.iva and iva_form == "token-kl"
    out = forward(adapter, batch, capture_layers=[layer] if spec.iva and not token_kl else (), branch_cands=cands,
                  branch_pos=batch.get("tpa_pos") if spec.tpa else None,
                  keep_hidden=token_kl)
    res = {k: batch[k] for k in ("targets", "topk_ids", "topk_logprobs", "tail_logmass", "tpa_cand_ids", "tpa_ids",
                                 "tpa_logprobs", "tpa_tail", "tpa_rows", "teacher_sal", "sal_valid", "ivak_weight",
                                 "ivak_ids", "ivak_logprobs", "ivak_tail", "xt_pair", "xt_ids", "xt_chunk_s",
                                 "xt_chunk_t", "xt_n_chunks", "xt_target_logprob", "xt_overlap", "xt_tpa_trows",
                                 "xt_logprobs")
           if k in batch}
    res["resp_hidden"] = out.resp_hidden
    if out.router_aux is not None:
        res["router_aux"] = out.router_aux
    if spec.tpa:
        res["branch_hidden"] = out.branch_hidden
    if token_kl:
        res["ivak_hidden"] = out.hidden[batch["ivak_b"], batch["ivak_p"]]
    elif spec.iva:
        res["student_sal"] = out.saliency.get(layer)
    return res


class StudentStep(nn.Module):
    """One forward of the student returning every tensor the losses need."""

    def __init__(self, model: nn.Module, adapter, spec, layer: int, weights):
        super().__init__()
        self.model = model
        self.adapter, self.spec, self.layer, self.weights = adapter, spec, layer, weights

    def forward(self, batch: dict, norm=None) -> dict:
        """{"loss": the step-normalised loss of this micro-batch, "sums": detached term sums}. The loss head
        runs in here, inside DDP's / FSDP2's forward, where FSDP2 holds the unsharded lm_head weight."""
        spec, weights = batch_spec(self.spec, self.weights, batch)  # terms a (mixed-in) cache lacks are absent
        res = student_step_outputs(self.adapter, batch, spec, self.layer, weights.iva_form)
        out = head_loss(spec, weights, lm_head(self.adapter), res, norm)
        aux = res.get("router_aux")
        coef = self.adapter.router_aux_coef if weights.router_aux is None else weights.router_aux
        if aux is not None and coef:
            # a MoE student's load-balancing loss (this micro-batch's, over its real tokens), weighed by the
            # micro-batch's share of the step's response tokens, so the step's term is their token-weighted mean
            norm = norm or StepNorm.of(res)
            n = float(len(res["targets"]))
            out["loss"] = out["loss"] + norm.scale * coef * aux * n / norm.tokens
            out["sums"]["router_aux"] = aux.detach() * n
        return out
