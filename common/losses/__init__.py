"""Loss math shared by both stages, and the loss registry, one concern per module:

- ``divergences``: folding onto the teacher's (k+1)-way partition; forward / reverse KL, JSD;
- ``terms``: Align-TI's terms (SFT, KD, IVA, TPA);
- ``cross``: the terms across tokenizers (ULD, GOLD, ALM) and saliency across image-token grids;
- ``weights``: the terms' weights and settings (``LossWeights``);
- ``registry``: the named losses, their weights and the unchunked reference total;
- ``head``: the memory-flat loss head (the LM head and every per-token term over row chunks).

Everything is importable from here (``from alignti.common.losses import head_loss``).

Distributions are compared on the teacher's (k+1)-way partition of the vocabulary: the teacher's
top-k ids plus one "rest" bucket. Folding both distributions this way is exact bookkeeping (the
chain rule of KL): ``KL_full = KL_folded + P_T(rest) * KL(P_T(.|rest) || P_S(.|rest))`` for forward
KL, so the folded KL equals the full-vocabulary KL when k = V and is a lower bound that misses only
the divergence inside the teacher's rest bucket otherwise (tests check both).
"""

from .divergences import (  # noqa: F401
    NEG_INF, fold_student, fold_teacher, temperature_bounds, kl, safe_log, jsd, DIVERGENCES,
)
from .terms import (  # noqa: F401
    sft_loss, distill_loss, salient_set, fold_saliency, iva_loss, candidate_weights, TPA_WEIGHTINGS, IVA_FORMS,
    iva_token_kl_loss, student_candidate_weights, tpa_loss,
)
from .cross import (  # noqa: F401
    CROSS_TOKENIZER, ALM_DISTANCES, ALM_EPS, uld_loss, gold_parts, gold_loss, gold_weights, log1mexp,
    alm_distance, chunk_logprobs, alm_loss, xt_terms, xt_counts, resample_saliency, resample_saliency_batch,
)
from .registry import (  # noqa: F401
    LossSpec, REGISTRY, get_loss, total_loss, check_cross_tokenizer,
)
from .weights import LossWeights  # noqa: F401
from .head import (  # noqa: F401
    StepNorm, step_counts, DEFAULT_CHUNK_BYTES, CUDA_CHUNK_BYTES, chunk_rows, fold_rows, _xt_bounds,
    tpa_coverage_fn, head_loss, TERM_COUNT, means,
)
