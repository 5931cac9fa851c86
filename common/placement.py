"""Where a teacher's weights go, decided from its config before any weight loads.

``plan_teacher`` builds the model on the meta device (no memory), sizes every parameter with accelerate's
``compute_module_sizes`` and splits them by the family's own parallel plans (transformers' ``tp_plan`` and, for
MoE families, ``ep_plan``, matched with transformers' ``_get_parameter_plan``): what each rank of a
tensor-parallel replica holds is the replicated part plus 1/T of the tensor-parallel part plus 1/E of the experts.
``check_fits`` compares that with the memory a rank has and refuses, naming the sizes and what to change, before
minutes of loading end in an out-of-memory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch

from .errors import ResourceError, human_bytes

log = logging.getLogger("alignti.placement")

# the share of a device the weights may take: the rest holds a batch's activations and the KV cache the TPA
# branch pass reads (a planning margin, not a measurement: --max-memory states the budget exactly)
WEIGHT_SHARE = 0.85

# model types whose expert-parallel loading fails in the transformers this release pins (tried on a tiny checkpoint
# saved by the same transformers, gloo, 2 ranks): what goes wrong, for the refusal
EXPERT_PARALLEL_FAILS = {
    "qwen3_vl_moe": "transformers 5.25 cannot load qwen3_vl_moe's experts expert-parallel (each rank's share of "
                    "experts.down_proj arrives transposed: a size mismatch, the weights re-initialised)",
}

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str) -> int:
    """Bytes of a size such as ``70GiB``, ``80GB``, ``512MiB`` or ``1e9`` (accelerate's units; ValueError
    naming the text otherwise)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?i?[bB]?)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"--max-memory: '{text}' is not a size (e.g. 70GiB, 80GB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_max_memory(text: str | None) -> dict | None:
    """``--max-memory``: one size (each GPU's, or each rank's under --tp-size) or ``DEVICE=SIZE`` pairs
    separated by commas (``0=70GiB,1=70GiB,cpu=200GiB``: accelerate's ``max_memory``, GPU ordinals as ints).
    Returns {device: bytes}, with the key "each" for a lone size; None for None."""
    if text is None:
        return None
    out = {}
    for item in str(text).split(","):
        if "=" not in item:
            out["each"] = parse_size(item)
            continue
        key, size = (x.strip() for x in item.split("=", 1))
        out[int(key) if key.isdigit() else key] = parse_size(size)
    return out


def accelerate_max_memory(limits: dict | None) -> dict | None:
    """``parse_max_memory``'s dict as accelerate's ``max_memory``: a lone size applies to every visible GPU."""
    if not limits:
        return None
    out = {k: v for k, v in limits.items() if k != "each"}
    if "each" in limits:
        for i in range(torch.cuda.device_count()):
            out.setdefault(i, limits["each"])
        if not torch.cuda.is_available():
            out.setdefault("cpu", limits["each"])
    return out


@dataclass
class TeacherPlan:
    """Bytes of a teacher's weights at a dtype: in all, per rank of a replica, and how they split."""
    model_type: str
    dtype: str
    tp_size: int
    ep_size: int
    total: int            # every weight, once
    tensor_parallel: int  # weights the tp plan shards over the tp_size ranks
    experts: int          # weights the ep plan shards over the ep_size ranks (MoE)
    per_rank: int         # what one rank holds
    has_tp_plan: bool
    heads: tuple[int, int]  # (attention heads, key/value heads) of the language model

    def describe(self) -> str:
        split = f"{human_bytes(self.tensor_parallel)} split over --tp-size {self.tp_size}"
        if self.experts:
            split += f", {human_bytes(self.experts)} of experts over --ep-size {self.ep_size}"
        return (f"the model ({self.model_type}, {self.dtype}) has {human_bytes(self.total)} of weights; each rank "
                f"holds {human_bytes(self.per_rank)} ({split}, the rest on every rank)")


def plan_teacher(config, dtype: torch.dtype, tp_size: int = 1, ep_size: int = 1) -> TeacherPlan:
    """The weights' sizes per rank for ``config`` at ``dtype`` with tensor parallelism over ``tp_size`` ranks and
    expert parallelism over ``ep_size``; no weight is loaded (the model is built on the meta device)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText
    from transformers.distributed.parallel_utils import _get_parameter_plan

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    tp_plan = dict(getattr(model, "tp_plan", None) or {})
    ep_plan = dict(getattr(model, "ep_plan", None) or {})  # the experts, held whole at ep_size 1
    total = sharded = experts = 0
    for name, p in model.named_parameters():
        size = p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
        total += size
        if ep_plan and _get_parameter_plan(name, ep_plan) is not None:
            experts += size
        elif _get_parameter_plan(name, tp_plan) is not None:
            sharded += size
    per_rank = total - sharded - experts + sharded // tp_size + experts // ep_size
    text = getattr(config, "text_config", None) or config
    heads = (int(getattr(text, "num_attention_heads", 0) or 0), _kv_heads(text))
    return TeacherPlan(config.model_type, str(dtype).replace("torch.", ""), tp_size, ep_size, total, sharded,
                       experts, per_rank, bool(tp_plan), heads)


def _kv_heads(text) -> int:
    """The key/value heads a tensor-parallel size must divide: the config's ``num_key_value_heads`` (else its
    attention heads); for a config with per-layer values (transformers' heterogeneous configs: Gemma 4's global layers
    have their own ``num_global_key_value_heads``) their greatest common divisor, which every layer's divides."""
    if getattr(text, "is_heterogeneous", False):
        import math
        return math.gcd(*(int(c.num_key_value_heads or c.num_attention_heads) for c in text.per_layer_config))
    return int(getattr(text, "num_key_value_heads", 0) or getattr(text, "num_attention_heads", 0) or 0)


def rank_memory(device: torch.device) -> int:
    """Bytes one rank may use on ``device``: the GPU's memory, or this node's RAM shared by its ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def check_fits(plan: TeacherPlan, memory: int, source: str, teacher: str, device_map: bool = False) -> None:
    """Refuse (ResourceError naming the sizes and what to change) a plan whose per-rank weights exceed
    WEIGHT_SHARE of ``memory`` bytes (``source`` says where that figure comes from), a --tp-size on a family
    without a tensor-parallel plan, or one that does not divide the attention heads. The changes offered are the
    ones that would fit: a --tp-size (at this dtype, or with --dtype bfloat16 where only both together fit), the
    experts split, --dtype bfloat16 alone where half the bytes fit, and --device-map auto unless ``device_map``
    (already placed so: then a larger --max-memory or disk offload)."""
    n_heads, n_kv = plan.heads
    if plan.tp_size > 1 and not plan.has_tp_plan:
        raise ResourceError(f"{teacher}: transformers has no tensor-parallel plan for {plan.model_type}, so "
                            f"--tp-size {plan.tp_size} cannot split it; use --device-map auto (one process over "
                            f"several GPUs, with --max-memory) instead")
    if plan.tp_size > 1 and n_heads and (n_heads % plan.tp_size or n_kv % plan.tp_size):
        ok = [t for t in (2, 4, 8, 16) if not n_heads % t and not n_kv % t]
        raise ResourceError(f"{teacher}: --tp-size {plan.tp_size} does not divide the teacher's {n_heads} attention "
                            f"heads and {n_kv} key/value heads (each rank takes whole heads); choose --tp-size "
                            f"{' or '.join(map(str, ok)) or 1}")
    if plan.tp_size > 1 and plan.tensor_parallel < (plan.total - plan.experts) / 2:
        log.warning("--tp-size %d splits only %s of the teacher's %s (transformers' tp_plan for %s covers little of "
                    "the decoder): every rank holds the rest; --device-map auto may place it better", plan.tp_size,
                    human_bytes(plan.tensor_parallel), human_bytes(plan.total), plan.model_type)
    budget = int(memory * WEIGHT_SHARE)
    if plan.per_rank <= budget:
        log.info("%s; %s per rank (%s), %.0f%% kept for activations", plan.describe(), human_bytes(memory), source,
                 100 * (1 - WEIGHT_SHARE))
        return
    replicated = plan.total - plan.tensor_parallel - plan.experts
    halve = 2 if plan.dtype == "float32" else 1  # --dtype bfloat16 halves a float32 teacher's (floating) weights

    def tp_fix(scale: int) -> str | None:
        for t in (2, 4, 8, 16, 32, 64):
            held = (replicated + plan.tensor_parallel // t + plan.experts // plan.ep_size) // scale
            if t > plan.tp_size and (not n_heads or (not n_heads % t and not n_kv % t)) and plan.has_tp_plan and \
                    held <= budget:
                return f"--tp-size {t} (about {human_bytes(held)} per rank)"
        return None

    fix = []
    if by_tp := tp_fix(1):
        fix.append(by_tp)
    if plan.experts and plan.ep_size == 1:
        fix.append(f"--ep-size {max(2, plan.tp_size)} with --tp-size {max(2, plan.tp_size)} (the experts split over a "
                   f"replica's ranks), where transformers can load the family so")
    if halve > 1 and plan.per_rank // halve <= budget:
        fix.append(f"--dtype bfloat16 (half the bytes: about {human_bytes(plan.per_rank // halve)} per rank)")
    elif halve > 1 and not by_tp and (both := tp_fix(halve)):
        fix.append(f"--dtype bfloat16 with {both}")
    if device_map:
        fix.append("a larger --max-memory, or one with disk (e.g. --max-memory 0=70GiB,cpu=200GiB,disk=1TiB: "
                   "accelerate offloads the rest to disk)")
    else:
        fix.append("--device-map auto with --max-memory (one process over several GPUs, the rest offloaded to CPU)")
    raise ResourceError(f"{teacher} does not fit: {plan.describe()}, more than {int(WEIGHT_SHARE * 100)}% of the "
                        f"{human_bytes(memory)} a rank has ({source}), which leaves the rest for activations; "
                        f"nothing was loaded. Use " + "; or ".join(fix))


def placement_options(tp_size: int = 1, ep_size: int = 1, device_map: str | None = None,
                      max_memory: str | None = None) -> dict:
    """``common.models.load_model``'s placement keywords from the command's options."""
    return dict(tp_size=tp_size, ep_size=ep_size, device_map=device_map,
                max_memory=accelerate_max_memory(parse_max_memory(max_memory)) if device_map else None)


def check_placement(config, teacher: str, device: torch.device, dtype: str, env, tp_size: int = 1, ep_size: int = 1,
                    device_map: str | None = None, max_memory: str | None = None) -> TeacherPlan:
    """The plan-before-load check of a command that loads ``teacher`` (its ``config``): the options' own
    consistency (ValueError naming them), then ``check_fits`` against ``--max-memory`` (one size: a rank's; with
    --device-map the sum of the devices named, unbounded with ``disk``) or the device's own memory. Returns the
    plan."""
    from .models import torch_dtype_for
    if device_map is not None and device_map != "auto":
        raise ValueError(f"--device-map must be auto (accelerate's placement), not '{device_map}'")
    if device_map and (tp_size > 1 or ep_size > 1 or env.distributed):
        raise ValueError("--device-map auto places one process's teacher over its GPUs: use it without --nproc, "
                         "--tp-size and --ep-size (or use --tp-size under torchrun instead)")
    if ep_size > 1 and ep_size != tp_size:
        raise ValueError(f"--ep-size {ep_size}: transformers splits the experts over the ranks of a tensor-parallel "
                         f"replica, so --ep-size must equal --tp-size ({tp_size}) (or be 1: every expert on every "
                         f"rank)")
    if ep_size > 1 and config.model_type in EXPERT_PARALLEL_FAILS:
        raise ValueError(f"--ep-size {ep_size}: {EXPERT_PARALLEL_FAILS[config.model_type]}; use --tp-size alone (the "
                         f"experts whole on every rank of a replica; the fit check counts them) or --device-map auto")
    limits = parse_max_memory(max_memory)
    plan = plan_teacher(config, torch_dtype_for(dtype, device), tp_size, ep_size)
    if device_map:
        if limits and "disk" in limits:
            return plan
        gpus = {i: torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())}
        budget = accelerate_max_memory(limits) if limits else dict(gpus, cpu=rank_memory(torch.device("cpu")))
        memory = sum(budget.values())
        source = "--max-memory" if limits else f"{len(gpus)} GPU(s) and this machine's RAM"
    elif limits:
        memory = limits.get("each") or sum(limits.values())
        source = "--max-memory"
    else:
        memory = rank_memory(device)
        source = f"{device.type} memory" + (" shared by this node's ranks" if device.type == "cpu" else "")
    check_fits(plan, memory, source, teacher, device_map=bool(device_map))
    return plan
