"""``train-student --trainable`` and LoRA (``--lora-r``): which of the student's weights train.

``--trainable SPEC`` selects the weights that train fully; every other parameter gets ``requires_grad`` False
and stays out of the optimizer (so it has no AdamW state either). SPEC is

- ``all`` (the default without LoRA);
- a group, ``projector``, ``lm`` or ``vision``, or several comma-separated (``projector,lm``). Which modules
  form each group is the family's business: ``common.adapters.ModelAdapter.parameter_group`` (LLaVA's
  ``multi_modal_projector``, Qwen2-VL's ``visual.merger``; the LM is everything outside the vision encoder and
  the projector, LLaVA-NeXT's ``mm_tunable_parts`` rule). LLaVA's stage 1 (feature alignment) is ``projector``;
- ``none`` (with LoRA only: the adapters alone train);
- never, whatever SPEC says: the family's ``frozen`` group (``ModelAdapter.frozen_prefixes``: Gemma 4's audio tower
  and its projection), a modality distillation does not feed; it stays as loaded and is saved with the student;
- otherwise a regular expression, searched (``re.search``) in every parameter name as transformers 5 names it in
  memory (``model.named_parameters()``: ``model.language_model.layers.3.mlp.up_proj.weight``; LLaVA's
  ``model.safetensors`` keeps older key names, ``language_model.model.layers...``, mapped on load).

``--lora-r R`` adds LoRA adapters through peft (Hu et al. 2021, arXiv 2106.09685: a target linear layer computes
``W x + (alpha / r) B A x`` with A [r, in] (Kaiming-uniform) and B [out, r] (zeros at the start), W frozen) to
the target modules: by default every linear layer of the language model (``ModelAdapter.language_model``), never
the LM head, whose weight the memory-flat loss head (``common.losses.head_loss``) reads directly. With LoRA,
``--trainable`` names what trains fully *besides* the adapters (default ``none``; LLaVA-LoRA's recipe is
``--lora-r 128 --trainable projector``): whole modules, which peft keeps as ``modules_to_save`` (a trainable copy
beside the frozen original, saved with the adapter). A selection holding a LoRA target is refused (a weight
trains fully or through LoRA, not both), as is ``all``.

``RUN/final`` is always the merged model (peft's ``merge_and_unload``: ``W + (alpha / r) B A`` written into W),
which plain transformers loads without peft; ``--save-adapter`` also writes ``RUN/adapter`` (peft's
``save_pretrained``: the adapter weights, the modules trained fully, ``adapter_config.json``), loaded with
``PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(BASE), "RUN/adapter")``, BASE being the
weights the run started from (the --student folder, or with --init the earlier run's final/), as
``adapter_config.json``'s ``base_model_name_or_path`` names it.
"""

from __future__ import annotations

from pathlib import Path

import difflib
import logging
import re
from dataclasses import dataclass

from torch import nn

from alignti.common.errors import AlignTIError

log = logging.getLogger("alignti.train")

GROUPS = ("projector", "lm", "vision")
LORA_ADAPTER = "default"  # peft's adapter name; its weights are named ...lora_A.default.weight


class TrainableError(AlignTIError, ValueError):
    """A ``--trainable`` or LoRA setting that selects nothing, or a combination that cannot train."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA's settings: rank ``r``, scale numerator ``alpha`` (the update is scaled by alpha / r), ``targets``
    (None: the LM's linear layers; else a regex full-matched against module names, or a list of module names
    each matching the modules whose name ends with it, as peft's ``target_modules`` takes them) and the dropout
    on the adapter's input."""
    r: int
    alpha: float
    targets: str | list[str] | None = None
    dropout: float = 0.0


def lora_settings(r: int | None, alpha: float | None, targets: str | None, dropout: float) -> LoraSettings | None:
    """The run's LoRA settings from its options (None: no LoRA). ``alpha`` unset: 2 r (LLaVA-1.5's LoRA recipe,
    r 128 with alpha 256). ``targets``: a value made of names only (letters, digits, ``_``, ``.``, commas) is a
    list of module names, anything else a regular expression."""
    if r is None:
        if alpha is not None or targets is not None or dropout:
            given = [f for f, v in (("--lora-alpha", alpha), ("--lora-targets", targets), ("--lora-dropout", dropout))
                     if v]
            raise TrainableError(f"{', '.join(given)} without --lora-r: LoRA is off; add --lora-r R (e.g. 16) or "
                                 f"drop {', '.join(given)}")
        return None
    if targets is not None and re.fullmatch(r"[\w.,\s]+", targets):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraSettings(r=int(r), alpha=float(alpha) if alpha is not None else 2.0 * r, targets=targets,
                        dropout=float(dropout or 0.0))


def selected_parameters(model: nn.Module, adapter, spec: str | None, freeze_vision: bool = False,
                        lora: bool = False) -> list[str]:
    """The names of the parameters ``spec`` trains fully (see the module docstring), in ``named_parameters``
    order; ``freeze_vision`` removes the vision group. Raises TrainableError naming the value and the groups when
    it selects nothing."""
    names = [n for n, _ in model.named_parameters()]
    spec = (spec or ("none" if lora else "all")).strip()
    words = [w.strip() for w in spec.split(",")]
    if spec == "all":
        if lora:
            raise TrainableError("--trainable all with --lora-r would train every weight fully, so the adapters add "
                                 "nothing: name what trains besides the adapters (e.g. --trainable projector), or "
                                 "drop --lora-r")
        chosen = names
    elif spec == "none":
        if not lora:
            raise TrainableError("--trainable none trains nothing; it goes with --lora-r (the adapters alone "
                                 "train): add --lora-r R or choose all, projector, lm, vision or a regex")
        chosen = []
    elif all(w in GROUPS for w in words):
        chosen = [n for n in names if adapter.parameter_group(n) in words]
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise TrainableError(f"--trainable '{spec}' is neither a group ({', '.join(('all',) + GROUPS)}) nor a "
                                 f"valid regular expression ({e})") from None
        chosen = [n for n in names if pattern.search(n)]
        if not chosen:
            close = difflib.get_close_matches(spec, ["all", *GROUPS], n=1, cutoff=0.6)
            hint = f"; did you mean the group '{close[0]}'?" if close else ""
            raise TrainableError(
                f"--trainable '{spec}' is neither a group ({', '.join(('all',) + GROUPS)}) nor a regular expression "
                f"matching any of the student's {len(names)} parameter names (e.g. {names[len(names) // 2]}){hint}")
    frozen = [n for n in chosen if adapter.parameter_group(n) == "frozen"]
    if frozen:  # towers of modalities alignti does not feed (Gemma 4's audio): never trained, saved as they are
        chosen = [n for n in chosen if adapter.parameter_group(n) != "frozen"]
        if not chosen and not lora:
            raise TrainableError(f"--trainable '{spec}' selects only {frozen[0]} and the like, parameters of "
                                 f"{', '.join(adapter.frozen_prefixes)}, a modality distillation does not feed: they "
                                 "never train; choose projector, lm, vision or a regex of those")
        log.info("%d parameters under %s stay frozen: alignti feeds that modality nothing, so they are saved as "
                 "loaded", len(frozen), ", ".join(sorted({p.rstrip(".") for p in adapter.frozen_prefixes
                                                          if any(n.startswith(p) for n in frozen)})))
    if freeze_vision:
        chosen = [n for n in chosen if adapter.parameter_group(n) != "vision"]
        if not chosen and not lora:
            raise TrainableError(f"--trainable '{spec}' with --freeze-vision leaves nothing to train: drop "
                                 "--freeze-vision or choose more than the vision encoder")
    return chosen


def set_trainable(model: nn.Module, names: list[str]) -> None:
    """``requires_grad`` True on the parameters ``names``, False on every other one."""
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def _owner_modules(model: nn.Module, names: list[str]) -> list[str]:
    """The largest modules all of whose parameters are in ``names`` (peft's modules_to_save take modules, not
    parameters); TrainableError naming the module when ``names`` holds a part of a module's own parameters."""
    chosen = set(names)
    full: dict[str, bool] = {}
    for mname, module in model.named_modules():
        params = [f"{mname}.{p}" if mname else p for p, _ in module.named_parameters()]
        full[mname] = bool(params) and all(p in chosen for p in params)
    owners = [m for m, ok in full.items() if ok and m and not full.get(m.rpartition(".")[0] if "." in m else "", False)]
    covered = {f"{m}.{p}" for m in owners for p, _ in model.get_submodule(m).named_parameters()}
    stray = [n for n in names if n not in covered]
    if stray:
        owner = stray[0].rpartition(".")[0]
        raise TrainableError(f"with --lora-r, --trainable trains whole modules (peft's modules_to_save), but it "
                             f"selects {stray[0]} and not every other parameter of {owner or 'the model'}: select "
                             "whole modules (e.g. --trainable projector) or drop --lora-r")
    return owners


def lora_config(model: nn.Module, adapter, lora: LoraSettings, full_names: list[str]):
    """peft's LoraConfig for ``model``: the targets (default: the LM's linear layers as one regex), and the modules
    ``full_names`` select as modules_to_save. Raises TrainableError when the targets match no module, match the LM
    head, or overlap the modules trained fully."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = lora.targets
    if targets is None:  # every linear layer of the language model, by its leaf names under the LM's prefix
        prefix = next(n for n, m in model.named_modules() if m is adapter.language_model)
        leaves = sorted({n.rpartition(".")[2] for n, m in adapter.language_model.named_modules()
                         if isinstance(m, nn.Linear)})
        targets = rf"{re.escape(prefix)}\..*\.(?:{'|'.join(map(re.escape, leaves))})"
    saved = _owner_modules(model, full_names)
    settings = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none")
    # the targets as peft matches them (its own function), before modules_to_save hides the modules inside those
    probe = LoraConfig(**settings)
    matched = [n for n, _ in model.named_modules() if n and check_target_module_exists(probe, n)]
    shown = targets if isinstance(targets, str) else ",".join(targets)
    if not matched:
        raise TrainableError(f"--lora-targets '{shown}' matches no module of the student (names match the modules "
                             "whose name ends with one of them, e.g. q_proj,v_proj; a regex must match a whole "
                             "module name, e.g. .*language_model.*\\.(q_proj|v_proj))")
    head = next(n for n, m in model.named_modules() if m is adapter.model.lm_head)
    if head in matched:
        raise TrainableError(f"--lora-targets '{shown}' matches the LM head ({head}): the memory-flat loss head reads "
                             "its weight directly, so it takes no adapter; leave it out (train it fully with "
                             f"--trainable {re.escape(head)} if it must move)")
    for m in saved:
        inside = [t for t in matched if t == m or t.startswith(m + ".")]
        if inside:
            raise TrainableError(f"--trainable selects {m} fully and --lora-targets '{shown}' puts an adapter on "
                                 f"{inside[0]} inside it: a weight trains fully or through LoRA, not both; narrow "
                                 "one of them")
    return LoraConfig(**settings, modules_to_save=saved or None), matched, saved


def apply_trainable(model: nn.Module, adapter, spec: str | None, freeze_vision: bool = False,
                    lora: LoraSettings | None = None):
    """Freeze what ``spec`` does not select and, with ``lora``, add the adapters (in place: the model's linear
    layers become peft's lora.Linear, its fully trained modules peft's ModulesToSaveWrapper). Returns the
    PeftModel around ``model`` (None without LoRA); ``model`` itself stays the module to train and checkpoint.
    Logs the trainable count."""
    full = selected_parameters(model, adapter, spec, freeze_vision, lora is not None)
    peft_model = None
    if lora is None:
        set_trainable(model, full)
    else:
        import warnings

        from peft import get_peft_model
        cfg, matched, saved = lora_config(model, adapter, lora, full)
        with warnings.catch_warnings():  # peft asks transformers 5 the deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = get_peft_model(model, cfg, adapter_name=LORA_ADAPTER)  # freezes all but adapters and saved
        log.info("LoRA r=%d alpha=%g on %d modules%s", lora.r, lora.alpha, len(matched),
                 f"; trained fully: {', '.join(saved)}" if saved else "")
    n_train, n_all = count_parameters(model)
    log.info("trainable parameters: %d of %d (%.2f%%)", n_train, n_all, 100.0 * n_train / max(n_all, 1))
    return peft_model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter elements of ``model``."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def merge(peft_model) -> nn.Module:
    """The plain transformers model with the adapters merged into their layers' weights and the fully trained
    modules in place of the originals (peft's merge_and_unload, in place; ``safe_merge`` refuses a non-finite
    result)."""
    return peft_model.merge_and_unload(safe_merge=True)


def save_adapter(peft_model, folder, base: str) -> None:
    """peft's own adapter folder: adapter_model.safetensors (the A and B matrices and the modules trained fully)
    and adapter_config.json, whose ``base_model_name_or_path`` is ``base``: the weights the adapters were trained
    on (the --student folder, or the --init run's final/ the run started from), the folder to load them onto."""
    import json
    peft_model.save_pretrained(str(folder))
    cfg_path = Path(folder) / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def has_lora(state: dict) -> bool:
    """Whether a model state dict holds LoRA adapters (peft's key names)."""
    return any(f".lora_A.{LORA_ADAPTER}." in k for k in state)

