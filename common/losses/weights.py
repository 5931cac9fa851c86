"""The weights and settings of a loss's terms (``train-student``'s options), read by every term module."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossWeights:
    kd: float = 1.0
    iva: float = 1.0
    tpa: float = 1.0
    temperature: float = 1.0
    iva_ratio: float = 0.25
    tpa_weighting: str = "teacher"  # weights over the cached TPA candidates: the teacher's, or the student's own
    iva_form: str = "attention"  # IVA as attention alignment, or "token-kl" (outputs at the salient image tokens)
    cross_tokenizer: str | None = None  # "uld" | "gold" | "alm": the KD term across tokenizers (None: same tokenizer)
    gold_matched: float | None = None    # GOLD hybrid weights (None: TRL's adaptive ones, see gold_weights)
    gold_unmatched: float | None = None
    alm_distance: str = "binary_ce"      # tokenkit's chunk distance (alm_distance)
    alm_temperature: float = 100.0       # tokenkit's binarisation temperature
    cache_temperature: float = 1.0       # the temperature the cache holds the teacher at (its params.temperature)
    router_aux: float | None = None      # MoE student: its load-balancing loss's weight (None: the model config's
    #                                      router_aux_loss_coef, ModelAdapter.router_aux_coef; 0: off)
