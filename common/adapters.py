"""Model-family adapters: everything that differs between LLaVA, LLaVA-OneVision and Qwen2-VL.

The rest of alignti talks to a VLM only through `ModelAdapter`: which modules are the decoder's
attention layers, which token id stands for an image token, what the processor needs to turn an
image into model inputs, and how position ids are built (1-D for LLaVA, 3-D M-RoPE for Qwen2-VL).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from .errors import DataError
from .models import torchvision_needed
from .kit_recipes import (GEMMA3_KIT, GEMMA4_KIT, IDEFICS3_KIT, INTERNVL_KIT, LFM2_VL_KIT, LLAVA_KIT, MISTRAL3_KIT,
                          ONEVISION1_5_KIT, ONEVISION_KIT, QWEN2_5_VL_KIT, QWEN2_VL_KIT, QWEN3_5_KIT, QWEN3_5_MOE_KIT,
                          QWEN3_VL_KIT, QWEN3_VL_MOE_KIT, SMOLVLM_KIT, KitRecipe)


@dataclass(frozen=True)
class Composition:
    """How ``make-student --vision V --lm L --like TEACHER`` (student_build/compose.py) composes a student of a family:
    the teacher's model class and multimodal settings, a pretrained vision tower, a pretrained causal LM and fresh
    projector modules.

    ``tower``: the attribute of the VLM's inner model holding the vision tower (``vision_tower``; ``visual``, whose
    merger is inside it). ``fresh``: the module paths under the inner model built fresh (transformers' own
    initialisation under the seed), the projectors sized to the LM; those inside the tower are not taken from V.
    ``tower_from``: the model types whose VLM checkpoints V may be (the tower taken whole, less ``fresh``); None: V
    may also be a vision model (CLIP, SigLIP) or a dual encoder (its vision half). ``lm_types``: the causal-LM model
    types whose weights load into the family's decoder (the first is the one a test builds); None: any causal LM,
    whose config becomes the student's text config. ``lm_note``: what that decoder is, for the refusal.
    ``teacher_text``: the student's text config is the teacher's with the LM's architecture fields (M-RoPE settings
    and the multimodal rope kept); else the LM's own config. ``merged_grid``: the image-token count is fixed by the
    processor's patch, merge and temporal sizes (Qwen-VL towers), checked against the tower's config; else by the
    tower's image and patch size, checked against the teacher's tower. ``other_tokenizer``: an LM of another
    tokenizer gives a student that keeps it (student_build/compose.py ``student_processor``), trained with
    --cross-tokenizer gold; else it is refused."""
    tower: str
    fresh: tuple[str, ...]
    tower_from: tuple[str, ...] | None = None
    lm_types: tuple[str, ...] | None = None
    lm_note: str = ""
    teacher_text: bool = False
    merged_grid: bool = False
    other_tokenizer: bool = False


LLAVA_COMPOSITION = Composition(tower="vision_tower", fresh=("multi_modal_projector",), other_tokenizer=True)


# the ``layer_types`` of softmax-attention layers (the rest: linear attention, convolutions, state-space layers)
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


def cat_zero_padded(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The image inputs of several samples (``items``: one dict per sample, empty for a sample without images)
    concatenated along dim 0, each tensor first zero-padded at the end of every other dim to the batch's largest
    size there (LLaVA-OneVision's patch axis, Mistral 3's image sides, Idefics3 / SmolVLM's sub-image axis); equal
    shapes are concatenated as they are."""
    items = [it for it in items if it]
    if not items:
        return {}
    out = {}
    for k in items[0]:
        tensors = [it[k] for it in items]
        shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
        padded = []
        for t in tensors:
            if list(t.shape[1:]) == shape:
                padded.append(t)
                continue
            z = t.new_zeros(t.shape[0], *shape)
            z[(slice(None),) + tuple(slice(0, n) for n in t.shape[1:])] = t
            padded.append(z)
        out[k] = torch.cat(padded, dim=0)
    return out


class ModelAdapter:
    family = "base"
    model_types: tuple[str, ...] = ()  # filled from FAMILIES (the registry at the end of this module)
    multi_image = False  # whether the family's processor and model take several images in one sample
    # whether a tiled image's thumbnail has a token grid of its own (7-value image_tiles entries: cache schema v8)
    thumb_grid_tiles = False
    # the model config's ids of the family's image/video special tokens: typed literally in a message, each would
    # be read as (part of) an image by the processor and the model, so such text is refused (media_tokens)
    media_token_keys: tuple[str, ...] = ("image_token_id",)

    # make-student --vision/--lm: how the family's student is composed; None: not offered (--from-teacher is)
    composition: Composition | None = None

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def lmms_eval_model(cls, model_type: str) -> str:
        """lmms-eval's model name for a checkpoint of ``model_type`` (e.g. ``llava_hf``); ValueError naming the
        model types that have one otherwise."""
        fam = FAMILIES.get(model_type)
        if fam is None or fam.lmms_eval_model is None:
            known = ", ".join(t for t, f in FAMILIES.items() if f.lmms_eval_model)
            raise ValueError(f"lmms-eval has no model class for model_type '{model_type}' (alignti maps {known})")
        return fam.lmms_eval_model

    @classmethod
    def lmms_eval_args(cls, image_processor: dict) -> dict:
        """Extra ``model_args`` for lmms-eval's class, from the checkpoint's saved image processor settings, so that
        lmms-eval prepares images as the checkpoint's own processor does."""
        return {}

    @classmethod
    def lmms_eval_folder(cls, folder, scratch):
        """The path lmms-eval's class is given (its ``pretrained``) for the checkpoint folder ``folder`` (a Path);
        ``scratch``: a folder that lives as long as the evaluation, for a link where one is needed. The folder
        itself for the base families."""
        return folder

    # --- structure -------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (LLaVA: vision_tower; Qwen2-VL: visual, its merger included)."""
        inner = self.model.model
        return inner.vision_tower if hasattr(inner, "vision_tower") else inner.visual

    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @classmethod
    def prune_layers(cls, model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
        """Family-specific settings after make-student --from-teacher kept the decoder layers ``keep`` (and vision
        layers ``keep_vision``) of ``model``, in place; returns notes on what the pruning dropped beyond the layers
        (logged). The base families have nothing more."""
        return []

    # --- parameter groups (train-student --trainable) -------------------------------------------
    # name prefixes of the family's multimodal projector and vision encoder, as transformers 5.x names the
    # parameters in memory (model.named_parameters()); the projector is matched first, so a
    # projector inside the vision module (Qwen2-VL's merger) is the projector's
    projector_prefixes: tuple[str, ...] = ("model.multi_modal_projector.",)
    vision_prefixes: tuple[str, ...] = ("model.vision_tower.",)
    # parameters no distillation run trains, whatever --trainable says (group "frozen"): towers of modalities alignti
    # does not feed (Gemma 4's audio tower and its projection), kept as they are in every saved student
    frozen_prefixes: tuple[str, ...] = ()

    def parameter_group(self, name: str) -> str:
        """"projector", "vision" or "lm": the group of the parameter ``name`` (a ``model.named_parameters()`` name).
        Everything outside the projector and the vision encoder is the language model (embeddings, decoder layers,
        final norm, LM head, LLaVA-OneVision's ``image_newline``): LLaVA-NeXT's ``mm_tunable_parts`` rule, where
        ``mm_language_model`` is every parameter not in the vision tower or the projector. "frozen" for the
        ``frozen_prefixes`` (Gemma 4's audio tower), which never train."""
        if self.frozen_prefixes and name.startswith(self.frozen_prefixes):
            return "frozen"
        if name.startswith(self.projector_prefixes):
            return "projector"
        if name.startswith(self.vision_prefixes):
            return "vision"
        return "lm"

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def layer_types(self) -> list[str]:
        """Each decoder layer's kind, from the text config's ``layer_types`` (``full_attention``, Gemma 3's
        ``sliding_attention``, Qwen3.5's Gated DeltaNet ``linear_attention``, LFM2's short-convolution ``conv``);
        ``full_attention`` for every layer where the config lists none."""
        types = getattr(self.text_config, "layer_types", None)
        n = self.num_layers
        if not isinstance(types, (list, tuple)) or len(types) != n:
            return ["full_attention"] * n
        return list(types)

    @property
    def tpa_tree_mask(self) -> bool:
        """How TPA's next-step distributions after each candidate are computed, chosen here from the layer types:
        True when every decoder layer is softmax attention (full or sliding), which takes the tree-shaped 4-D mask
        (branch tokens appended to the sequence, each seeing only its prefix: common/attention.py). False for hybrid
        decoders (Qwen3.5's Gated DeltaNet, LFM2's short convolutions): a recurrent or convolutional layer takes no
        mask, so a branch token in the sequence would flow into every later token's state; their branches run as
        one-token continuations from the model's own states at their positions instead (common/branch_states.py
        ``snapshot_branch_hidden``, with ``branch_state_cache``)."""
        return all(t in ATTENTION_LAYER_TYPES for t in self.layer_types())

    def branch_state_cache(self):
        """The cache TPA without masks runs the language model with (``tpa_tree_mask`` False): transformers'
        ``DynamicCache`` laid out by the text config's ``layer_types`` (attention KV; the conv / recurrent states of
        linear-attention and convolution layers), those states updated out of place so that each one read after a
        segment of the prefix stays valid (common/branch_states.py ``snapshot_cache``). A family whose language model
        keeps its state in another cache class overrides this."""
        from .branch_states import snapshot_cache
        return snapshot_cache(self.language_model.config)

    def delta_rule_modules(self) -> list:
        """The modeling modules whose module-level gated-delta-rule kernels (transformers' names:
        common/delta_rule.py ``CHUNK_KERNEL``, ``RECURRENT_KERNEL``) this decoder's layers call: what TPA without
        masks replaces for the duration of a call (common/branch_states.py: the states at the TPA positions read from
        the main pass's chunked kernel; the candidates of one position run from one shared state). Found here from the
        decoder layers' own modeling files (Qwen3.5's, Qwen3.5-MoE's own copy; none for an LFM2 or attention-only
        decoder); a family whose kernels go by other names overrides this."""
        import sys
        from .delta_rule import CHUNK_KERNEL, RECURRENT_KERNEL
        names = {type(m).__module__ for layer in self.decoder_layers() for m in layer.modules()}
        return [sys.modules[n] for n in sorted(names)
                if hasattr(sys.modules.get(n), CHUNK_KERNEL) and hasattr(sys.modules.get(n), RECURRENT_KERNEL)]

    def saliency_layers(self) -> list[int]:
        """The decoder layers IVA's saliency may come from (select-layer's choice, an explicit --saliency-layer):
        softmax-attention layers that see every earlier token (``layer_types`` ``full_attention``). Not a
        sliding-window layer, whose window may leave the image out of an instruction's sight (Gemma 3), nor a
        linear-attention or convolution layer, which has no attention probabilities (Qwen3.5, LFM2); empty when no
        layer is left."""
        return [i for i, t in enumerate(self.layer_types()) if t == "full_attention"]

    def attention_modules(self) -> list[nn.Module | None]:
        """Each decoder layer's softmax-attention module, None for a layer that has none (a linear-attention or
        convolution layer of a hybrid decoder), indexed by layer."""
        return [getattr(layer, "self_attn", None) for layer in self.decoder_layers()]

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config.vocab_size)

    # the cap of the model's final logit soft-capping (cap * tanh(logits / cap) after the LM head), None for none:
    # common/batch.py ``lm_head`` applies it (Gemma 4)
    softcap: float | None = None

    # --- data checks (classmethods: the pre-flight runs them with the config and processor, before the model) -
    @classmethod
    def media_tokens(cls, config, tokenizer) -> list[str]:
        """The family's image/video special tokens as text (e.g. Qwen2-VL's ``<|image_pad|>``,
        ``<|vision_start|>``), from the ids the model config names in ``media_token_keys``."""
        ids = [getattr(config, k, None) for k in cls.media_token_keys]
        return [tokenizer.convert_ids_to_tokens(int(i)) for i in ids if i is not None]

    @classmethod
    def check_text(cls, config, tokenizer, sample_id: str, turns: list[tuple[str, str]]) -> None:
        """A DataError naming the sample, the turn and the token when a message holds one of the family's
        image/video special tokens typed as text."""
        tokens = cls.media_tokens(config, tokenizer)
        for j, (role, text) in enumerate(turns):
            found = [t for t in tokens if t and t in text]
            if found:
                raise DataError(sample_id, f"{role} turn {j} holds the {cls.family} family's special token "
                                f"'{found[0]}' typed as text (the processor and the model would read it as part of "
                                "an image)", "remove it (mark an image's place with <image>), or pass --skip-bad")

    @classmethod
    def check_image_size(cls, image_processor, sample_id: str, what: str, width: int, height: int) -> None:
        """A DataError naming the sample when the family's image processor cannot take an image of this size
        (upright, in pixels); the base families resize any size."""

    # --- inputs ----------------------------------------------------------------------------
    @staticmethod
    def image_inputs(processor_out: dict) -> dict[str, torch.Tensor]:
        """The processor outputs the vision tower needs (everything but the text ids)."""
        return {k: v for k, v in processor_out.items()
                if k not in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")}

    @staticmethod
    def collate_image_inputs(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        items = [it for it in items if it]
        if not items:
            return {}
        return {k: torch.cat([it[k] for it in items], dim=0) for k in items[0]}

    @classmethod
    def generation_inputs(cls, input_ids: torch.Tensor, image_inputs: dict, image_token_id: int | None) -> dict:
        """The image inputs of a ``generate`` batch (input_ids [B, S]) with whatever else the family's ``generate``
        takes from its processor beside them; the base families need nothing more."""
        return image_inputs

    def position_ids(self, input_ids: torch.Tensor, valid: torch.Tensor, image_inputs: dict) -> torch.Tensor:
        """[B, S] (or [3, B, S]) position ids of the real tokens; padding gets 0."""
        pos = valid.long().cumsum(-1) - 1
        return pos.clamp_min(0) * valid

    def forward(self, input_ids, image_inputs: dict, mask4d, position_ids, cache=None, use_cache=False):
        """The base model (no LM head): hidden states only, the caller applies the head where needed."""
        return self.model.model(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids,
                                cache=cache, use_cache=use_cache, **image_inputs)

    # --- mixture-of-experts decoders ---------------------------------------------------------------------
    @property
    def router_aux_coef(self) -> float:
        """The weight of the decoder's load-balancing loss in training (the model config's own
        ``router_aux_loss_coef``); 0 for dense decoders."""
        return 0.0

    def router_aux_loss(self, out, rows_valid: torch.Tensor) -> torch.Tensor | None:
        """The decoder's load-balancing loss over the rows ``rows_valid`` [B, S] (True: a real token) of the forward
        ``out`` (``forward``'s result); None for dense decoders."""
        return None


class LlavaAdapter(ModelAdapter):
    family = "llava"
    composition = LLAVA_COMPOSITION


class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    composition = LLAVA_COMPOSITION
    multi_image = True  # several images of a sample: base resolution each (batch_num_images), as the model trains
    media_token_keys = ("image_token_id", "video_token_id")

    # [1, n_patches, 3, H, W] per sample: the patch axis padded to the longest
    collate_image_inputs = staticmethod(cat_zero_padded)


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"

    @classmethod
    def lmms_eval_args(cls, image_processor):
        """lmms-eval's qwen2_vl / qwen2_5_vl resize every image between their own min_pixels / max_pixels (3136,
        602112 by default), not the processor's: pass the processor's (``size`` shortest_edge / longest_edge)."""
        size = image_processor.get("size") or {}
        lo = image_processor.get("min_pixels") or size.get("shortest_edge")
        hi = image_processor.get("max_pixels") or size.get("longest_edge")
        return {k: int(v) for k, v in (("min_pixels", lo), ("max_pixels", hi)) if v}
    multi_image = True
    media_token_keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    projector_prefixes = ("model.visual.merger.",)  # the patch merger, LLaVA's projector in Qwen2-VL's terms
    vision_prefixes = ("model.visual.",)
    composition = Composition(tower="visual", fresh=("visual.merger",), tower_from=("qwen2_vl", "qwen2_5_vl"),
                              lm_types=("qwen2",), lm_note="Qwen2's architecture (q/k/v with bias, M-RoPE): pick a "
                              "Qwen2 (Qwen2.5) checkpoint", teacher_text=True, merged_grid=True)

    @classmethod
    def check_image_size(cls, image_processor, sample_id, what, width, height):
        """Qwen2-VL's processor resizes every image to a multiple of its patch grid (``smart_resize``, the
        library's own function and limits: an aspect ratio below 200)."""
        size = getattr(image_processor, "size", None)
        edge = (lambda k: size.get(k) if isinstance(size, dict) else getattr(size, k, None))
        factor = int(image_processor.patch_size) * int(image_processor.merge_size)
        try:
            smart_resize(height, width, factor=factor, min_pixels=edge("shortest_edge") or 56 * 56,
                         max_pixels=edge("longest_edge") or 28 * 28 * 1280)
        except (ValueError, ZeroDivisionError) as e:
            raise DataError(sample_id, f"image {what} is {width}x{height} pixels, which the {cls.family} image "
                            f"processor refuses ({e})", "crop or pad the image (its longer side at most 200 times "
                            "its shorter), or pass --skip-bad") from None

    @classmethod
    def generation_inputs(cls, input_ids, image_inputs, image_token_id):
        """The image tokens' ``mm_token_type_ids`` [B, S], as the processor returns them: without them ``generate``
        gives the image tokens text positions (its get_rope_index reads them)."""
        if image_token_id is None:
            return image_inputs
        return {**image_inputs, "mm_token_type_ids": (input_ids == image_token_id).int()}

    def position_ids(self, input_ids, valid, image_inputs):
        mm = (input_ids == self.image_token_id).int()
        pos, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=image_inputs.get("image_grid_thw"),
            attention_mask=valid.long())
        return pos * valid.unsqueeze(0)


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's inputs and M-RoPE index (its own ``get_rope_index``, interleaved sections), plus
    **deepstack**: the tower's blocks ``vision_config.deepstack_visual_indexes`` each feed, through their own merger
    (``visual.deepstack_merger_list``), the hidden states of the image tokens at the input of LM layer j (the j-th
    of them into layer j; ``Qwen3VLTextModel._deepstack_process``). The deepstack mergers are projectors (they map
    vision features into the LM) for ``--trainable``."""
    family = "qwen3_vl"
    projector_prefixes = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    # a student: a Qwen3-VL (or Qwen3-VL-MoE) checkpoint's tower (patch embedding, position table, blocks) and a
    # Qwen3 LM; the merger and the deepstack mergers map into the LM's width, so both start fresh (prune_layers drops
    # the deepstack features of LM layers the LM does not have)
    composition = Composition(tower="visual", fresh=("visual.merger", "visual.deepstack_merger_list"),
                              tower_from=("qwen3_vl", "qwen3_vl_moe"), lm_types=("qwen3",),
                              lm_note="Qwen3's architecture (q/k norms, no q/k/v bias): pick a Qwen3 checkpoint",
                              teacher_text=True, merged_grid=True)

    @classmethod
    def prune_layers(cls, model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
        """Deepstack after pruning (make-student --from-teacher): the j-th deepstack feature goes to the pruned
        model's layer j, which is the teacher's layer ``keep[j]``. Kept while ``keep`` starts 0, 1, ..., j (the
        layers deepstack writes to); the features past the first layer it does not keep are dropped with their
        mergers (``deepstack_visual_indexes`` shortened), and the notes say which. With ``keep_vision`` the kept
        features' source blocks are renumbered; a dropped source block is an AlignTIError naming it."""
        vision = model.config.vision_config
        idx = list(vision.deepstack_visual_indexes)
        n = 0
        while n < len(idx) and n < len(keep) and keep[n] == n:
            n += 1
        notes = []
        if n < len(idx):
            notes.append(f"deepstack features from vision blocks {idx[n:]} into LM layers {list(range(n, len(idx)))} "
                         f"dropped: the kept layers {keep} do not start with layers 0..{len(idx) - 1}, which deepstack "
                         "writes to")
            model.model.visual.deepstack_merger_list = nn.ModuleList(list(model.model.visual.deepstack_merger_list)[:n])
            idx = idx[:n]
        if keep_vision is not None:
            lost = [i for i in idx if i not in keep_vision]
            if lost:
                from .errors import AlignTIError
                raise AlignTIError(f"--keep-vision-layers drops vision blocks {lost}, which feed deepstack features "
                                   f"into LM layers {[idx.index(i) for i in lost]}: keep them")
            idx = [keep_vision.index(i) for i in idx]
        vision.deepstack_visual_indexes = idx
        model.model.visual.deepstack_visual_indexes = idx
        return notes


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE: Qwen3-VL with sparse mixture-of-experts MLPs. In training the base model also returns each
    layer's router logits, and ``router_aux_loss`` is the library's own Switch-Transformer load-balancing loss
    (``load_balancing_loss_func`` of the family's modeling file, Fedus et al. 2021 eqs. 4-6) over the batch's real
    tokens, weighed by the config's ``router_aux_loss_coef`` as the model's own training loss does."""
    family = "qwen3_vl_moe"
    composition = Composition(tower="visual", fresh=("visual.merger", "visual.deepstack_merger_list"),
                              tower_from=("qwen3_vl", "qwen3_vl_moe"), lm_types=("qwen3_moe",),
                              lm_note="Qwen3-MoE's architecture (sparse MoE MLPs): pick a Qwen3-MoE checkpoint, or "
                              "compose a dense student under a Qwen3-VL --like", teacher_text=True, merged_grid=True)

    def forward(self, input_ids, image_inputs, mask4d, position_ids, cache=None, use_cache=False):
        return self.model.model(input_ids=input_ids, attention_mask=mask4d, position_ids=position_ids, cache=cache,
                                use_cache=use_cache, output_router_logits=self.model.training, **image_inputs)

    @classmethod
    def lmms_eval_folder(cls, folder, scratch):
        """lmms-eval's qwen3_vl class (0.7.3, ``Qwen3_VL.__init__``) takes the MoE model class only when its
        ``pretrained`` path names the active parameters (``re.search(r"A\\d+B", pretrained)``, as in
        Qwen3-VL-30B-A3B-Instruct); any other path of a MoE checkpoint it loads as a dense Qwen3-VL whose MLPs
        transformers initialises at random, and scores that. A folder whose path does not name them is given
        through a link in ``scratch`` whose name ends in ``-A0B``."""
        import re
        from pathlib import Path
        if re.search(r"A\d+B", str(folder)):
            return folder
        link = Path(scratch) / f"{Path(folder).name}-moe-A0B"
        link.symlink_to(Path(folder).resolve(), target_is_directory=True)
        return link

    @property
    def router_aux_coef(self) -> float:
        return float(self.text_config.router_aux_loss_coef)

    # the family's modeling module, whose load_balancing_loss_func the student's router loss is
    balancing_module = "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe"

    def router_aux_loss(self, out, rows_valid):
        logits = getattr(out, "router_logits", None)
        if not logits:
            return None
        import importlib
        balancing = importlib.import_module(self.balancing_module).load_balancing_loss_func
        cfg = self.text_config
        return balancing(tuple(logits), cfg.num_experts, cfg.num_experts_per_tok, rows_valid.long())


class Qwen3_5Adapter(Qwen2VLAdapter):
    """Qwen3.5: Qwen3-VL's processor and M-RoPE index (no deepstack), a hybrid decoder of Gated DeltaNet layers
    (``linear_attention``: a recurrent state and a short causal convolution, no mask) and a minority of softmax
    ``full_attention`` layers (``text_config.layer_types``). Hence, from ``layer_types`` (ModelAdapter): TPA without
    the tree mask (``tpa_tree_mask`` False) and IVA's saliency from the full-attention layers only."""
    family = "qwen3_5"
    composition = None  # make-student --vision/--lm not offered for the hybrid decoder: --from-teacher is

    @classmethod
    def prune_layers(cls, model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
        """After make-student --from-teacher (``layer_types`` already pruned in step with the layers): a released
        config's ``full_attention_interval`` (every N-th layer full attention, the rest linear attention; the config
        derives ``layer_types`` from it when it has none) is set to the interval the kept pattern follows, or
        removed with a note when it follows none (``layer_types`` then says which layer is which)."""
        text = model.config.text_config
        interval = getattr(text, "full_attention_interval", None)
        if interval is None:
            return []
        types = list(text.layer_types)
        fits = [k for k in range(1, len(types) + 1)
                if types == ["linear_attention" if (i + 1) % k else "full_attention" for i in range(len(types))]]
        if fits:
            text.full_attention_interval = fits[0]
            return []
        del text.full_attention_interval
        return [f"full_attention_interval {interval} removed: the kept layers' pattern {types} is not every N-th layer "
                "full attention (layer_types holds it)"]


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    """Qwen3.5-MoE: Qwen3.5 with sparse mixture-of-experts MLPs; in training the load-balancing loss of the family's
    own ``load_balancing_loss_func`` (as Qwen3VLMoeAdapter's)."""
    family = "qwen3_5_moe"
    forward = Qwen3VLMoeAdapter.forward
    router_aux_coef = Qwen3VLMoeAdapter.router_aux_coef
    router_aux_loss = Qwen3VLMoeAdapter.router_aux_loss
    balancing_module = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe"


class Gemma3Adapter(ModelAdapter):
    """Gemma 3: SigLIP tower, average-pooled projector, a decoder of sliding-window and global layers
    (``text_config.layer_types``) whose image tokens attend to each other bidirectionally within an image.

    The model builds its own per-layer-type masks from ``token_type_ids`` (``create_masks_for_vision_model``: global
    layers OR(causal, same image block), sliding layers AND(q - kv < sliding_window, that)); alignti's masks
    (padding, causal, TPA trees) are one additive 4-D mask, so ``forward`` turns it into the model's
    ``{"full_attention", "sliding_attention"}`` mapping by the same rules: the image blocks (the model's own
    ``get_block_sequence_ids_for_mask`` on the image-token positions) opened both ways, and the sliding window
    measured in position ids, so a TPA branch token appended after the sequence is windowed from the position of the
    token it replaces. A KV cache that alignti asks for keeps every layer's keys (the sliding layers' own cache
    would drop those the branch pass's mask indexes)."""
    family = "gemma3"
    multi_image = True
    # a student: a SigLIP tower (a vision model, a SigLIP dual encoder's vision half or a Gemma 3 checkpoint's) and a
    # Gemma 3 text LM (Gemma3ForCausalLM, the 1B's kind); the pooled projector starts fresh
    composition = Composition(tower="vision_tower", fresh=("multi_modal_projector",), lm_types=("gemma3_text",),
                              lm_note="Gemma 3's text decoder (sliding-window and global layers): pick a Gemma 3 text "
                              "checkpoint (Gemma3ForCausalLM)")
    media_token_keys = ("image_token_id", "boi_token_id", "eoi_token_id")

    def __init__(self, model: nn.Module):
        super().__init__(model)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:
            raise NotImplementedError(f"a {self.family} checkpoint with final_logit_softcapping={cap}: alignti's loss "
                                      "head applies the LM head alone (Gemma 3's released checkpoints have none)")

    @classmethod
    def generation_inputs(cls, input_ids, image_inputs, image_token_id):
        """The image tokens' ``token_type_ids`` [B, S], as the processor returns them: ``generate`` gives the image
        tokens their bidirectional mask from them."""
        if image_token_id is None:
            return image_inputs
        return {**image_inputs, "token_type_ids": (input_ids == image_token_id).long()}

    global_images_bidirectional = True  # Gemma 3: each image's block opens in the global layers too

    def image_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, Q] the image block each query token belongs to (-1: none), by the model's own
        ``get_block_sequence_ids_for_mask``; None where the images attend causally."""
        from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask
        return get_block_sequence_ids_for_mask((input_ids == self.image_token_id).long())

    def layer_masks(self, input_ids: torch.Tensor, mask4d: torch.Tensor, position_ids: torch.Tensor) -> dict:
        """{"full_attention", "sliding_attention"} additive masks [B, 1, Q, K] from alignti's ``mask4d`` for the
        queries ``input_ids`` [B, Q] at ``position_ids`` [B, Q]: the keys are the queries when Q = K, else (a
        branch pass on a cache) the cached sequence's K - Q right-padded tokens at positions 0.. K - Q - 1, then
        the queries. Each image's block opens both ways (``image_blocks``) in the sliding layers, and in the global
        ones where ``global_images_bidirectional``; the sliding layers then close what lies ``sliding_window``
        positions or more back."""
        bsz, q = input_ids.shape
        kv = mask4d.shape[-1]
        opened = mask4d
        if q == kv:  # the queries hold the images: each image's tokens see each other
            blocks = self.image_blocks(input_ids)
            if blocks is not None:
                same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
                opened = mask4d.masked_fill(same[:, None], 0.0)
            kpos = position_ids
        else:
            kpos = torch.cat([torch.arange(kv - q, device=position_ids.device).expand(bsz, -1), position_ids], 1)
        outside = position_ids[:, :, None] - kpos[:, None, :] >= int(self.text_config.sliding_window)
        sliding = opened.masked_fill(outside[:, None], torch.finfo(opened.dtype).min)
        return {"full_attention": opened if self.global_images_bidirectional else mask4d, "sliding_attention": sliding}

    def forward(self, input_ids, image_inputs, mask4d, position_ids, cache=None, use_cache=False):
        if use_cache and cache is None:
            from transformers import DynamicCache
            cache = DynamicCache()
        return self.model.model(input_ids=input_ids, attention_mask=self.layer_masks(input_ids, mask4d, position_ids),
                                position_ids=position_ids, cache=cache, use_cache=use_cache, **image_inputs)


class Mistral3Adapter(ModelAdapter):
    """Mistral 3 (Mistral-Small-3.1 / 3.2): a Pixtral tower at native resolution (each image keeps its
    aspect ratio, resized only to fit the processor's ``longest_edge``, so images differ in size), a projector that
    merges ``spatial_merge_size``^2 patches into one image token, a Mistral LM with 1-D positions.

    The processor lays out each image as rows of ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]`` and the last by
    ``[IMG_END]`` (``PixtralProcessor.replace_image_token``); the model puts an image feature on the ``[IMG]`` tokens
    only (``get_placeholder_mask``), the two markers keep their text embeddings. An image's span
    (common/conversation.py) runs over its rows, breaks included; its image tokens (saliency, IVA) are the ``[IMG]`` ones
    (common/batch.py ``span_image_positions``), and its grid (rows, cols) is read from the rows."""
    family = "mistral3"
    multi_image = True

    # pixel_values [n_images, 3, H, W] of images that differ in size: zero-padded at the bottom and right, as the
    # image processor pads the images of one call (``_pad_for_batching``); the tower reads each image's own
    # ``image_sizes`` and crops the padding away
    collate_image_inputs = staticmethod(cat_zero_padded)


class LlavaOnevision1_5Adapter(Qwen2VLAdapter):
    """LLaVA-OneVision-1.5: a RICE-ViT tower (2-D RoPE, a class token per image, a patch merger into the LM's width),
    a Qwen3 LM. Its processor is Qwen2-VL's layout (``image_grid_thw``, ``<|image_pad|>`` tokens between
    ``<|vision_start|>`` / ``<|vision_end|>``, the same ``smart_resize`` limits), but the LM's positions are 1-D
    (``LlavaOnevision15Model.forward``: ``arange`` over the sequence; ``generate`` takes the default positions), not
    Qwen2-VL's M-RoPE: the base position ids. (``generate`` ignores the ``mm_token_type_ids`` Qwen2-VL's
    ``generation_inputs`` adds.)"""
    family = "llava_onevision1_5"
    position_ids = ModelAdapter.position_ids
    composition = None  # Qwen2-VL's recipe would build a Qwen2-VL model, not this family's: --from-teacher instead


class Lfm2VlAdapter(ModelAdapter):
    """LFM2-VL: a SigLIP2 NaFlex tower (each image at its own aspect ratio, as a padded sequence of patches with
    ``spatial_shapes`` and ``pixel_attention_mask``), a pixel-unshuffle projector (2x2 patches per image token), and
    the LFM2 hybrid decoder: gated short convolutions (``conv`` layers: a causal depthwise convolution over the last
    ``conv_L_cache`` tokens, no mask, a conv state in the cache) interleaved with ``full_attention`` layers
    (``text_config.layer_types``). Hence, from ``layer_types`` (ModelAdapter): TPA without the tree mask
    (``tpa_tree_mask`` False; the branches run from the model's own cache at the TPA positions, conv states
    included: common/branch_states.py) and IVA's saliency from the attention layers only.

    1-D positions; the processor expands each ``<image>`` into ``<|image_start|>`` + image tokens +
    ``<|image_end|>``. An image of more than ``max_image_tokens`` x ``max_pixels_tolerance`` tokens' worth of pixels
    (with ``do_image_splitting``, as the released checkpoints ship) is split into a grid of tiles, each tile's tokens
    after a ``<|img_row_R_col_C|>`` marker, plus with ``use_thumbnail`` ``<|img_thumbnail|>`` and the thumbnail's
    tokens: one image's tokens are several runs with markup between them, grouped by the placeholder they replaced
    (common/conversation.py, as Idefics3's), IVA's saliency over its image tokens only (common/batch.py
    ``image_token_positions``) and its layout (tiles, each tile's and the thumbnail's token grid) from the
    processor's ``spatial_shapes`` (common/tiles.py ``split_layouts``). Inputs: ``pixel_values`` [n tiles, max
    patches, 3 * patch^2], ``pixel_attention_mask`` [n tiles, max patches], ``spatial_shapes`` [n tiles, 2], the
    tiles of image after image, every tile padded to the processor's one ``max_num_patches``, so a batch concatenates
    them along the tile axis (the base ``collate_image_inputs``) in the order the model fills the image tokens."""
    family = "lfm2_vl"
    multi_image = True  # several images per sample: one <image> each, their features in order (the model's own)
    thumb_grid_tiles = True  # its thumbnail keeps the image's aspect: a token grid of its own

    @classmethod
    def lmms_eval_args(cls, image_processor):
        """lmms-eval's ``lfm2_5_vl`` class loads the model in bfloat16 unless told (its ``dtype`` argument): ``auto``
        loads the checkpoint's own dtype, as alignti's evaluate does."""
        return {"dtype": "auto"}

    @classmethod
    def prune_layers(cls, model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
        """After make-student --from-teacher (``layer_types`` already pruned in step with the layers): the LFM2
        config's ``full_attn_idxs`` (the attention layers' indices, from which it derives ``layer_types`` when it has
        none) renumbered to the kept layers."""
        text = model.config.text_config
        if getattr(text, "full_attn_idxs", None) is not None:
            text.full_attn_idxs = [i for i, t in enumerate(text.layer_types) if t == "full_attention"]
        return []


class InternVLAdapter(ModelAdapter):
    """InternVL (2.5, 3, 3.5 in transformers' -hf layout): InternViT tower, pixel-shuffle projector, a Qwen2 / Qwen3
    (or Llama) LM with 1-D positions and a causal mask, so the base adapter's forward.

    Dynamic tiling: the image processor (GotOcr2's ``crop_to_patches``) cuts each image into a cols x rows mosaic of
    tiles on the canvas whose aspect is nearest the image's (``get_optimal_tiled_canvas``), plus a thumbnail of the
    whole image when there are several; ``pixel_values`` is [all tiles of the batch, 3, tile, tile], the tiles of
    image after image, and each tile is ``image_seq_length`` image tokens (its patch grid pixel-shuffled at
    ``downsample_ratio``), so image inputs concatenate along the tile axis (the base ``collate_image_inputs``)."""
    family = "internvl"
    multi_image = True
    media_token_keys = ("image_token_id",)


class Idefics3Adapter(ModelAdapter):
    """Idefics3 and SmolVLM (transformers' smolvlm is modular on idefics3; one adapter, the difference is
    configuration): a SigLIP-style tower run on each sub-image, a pixel-shuffle connector, a Llama decoder with 1-D
    positions. The processor splits an image into a grid of sub-images plus a downscaled global image and frames each
    in the text with markup tokens (``<fake_token_around_image><row_r_col_c>`` + image tokens per sub-image, a line
    break after each row, ``<fake_token_around_image><global-img>`` + image tokens + ``<fake_token_around_image>``),
    so one image's image tokens are several runs with markup between them (common/conversation.py groups them by the
    placeholder they replaced; IVA's saliency covers the image tokens only, common/batch.py
    ``image_token_positions``). Inputs: ``pixel_values`` [1, n_sub_images, 3, H, W] and ``pixel_attention_mask``
    [1, n_sub_images, H, W] per sample; the model drops all-zero sub-images, which is how a batch pads them."""
    family = "idefics3"
    multi_image = True
    projector_prefixes = ("model.connector.",)
    vision_prefixes = ("model.vision_model.",)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    # pixel_values [B, max sub-images, 3, H, W] and pixel_attention_mask [B, max sub-images, H, W]: the sub-image axis
    # zero-padded, the padding the family's own image processor gives a batch (``do_pad``; the model skips all-zero
    # sub-images)
    collate_image_inputs = staticmethod(cat_zero_padded)


class Gemma4Adapter(Gemma3Adapter):
    """Gemma 4: its own ViT (2-D patch positions, ``image_position_ids``; patches average-pooled into soft tokens,
    ``embed_vision`` the projector), a decoder of sliding-window and global layers with per-layer input embeddings
    (read from ``input_ids``, image tokens as padding: the model's own ``get_per_layer_inputs``, run inside its
    forward from the ids alignti passes), KV-shared layers (the last ``num_kv_shared_layers`` reuse the keys and values
    of the last earlier layer of their type: within one forward, so a branch pass on a cache reads them from that
    pass's own producer layer, which holds the cached keys too), and final logit soft-capping (the loss head's
    ``softcap``, common/batch.py ``lm_head``). An audio tower (``audio_tower``, ``embed_audio``) that alignti neither
    runs nor trains (``frozen_prefixes``) and keeps in every saved student.

    Masks (``create_masks_for_vision_model``): with ``use_bidirectional_attention`` "vision" the image tokens
    (``mm_token_type_ids``) see each other within an image in the **sliding** layers only, AND(q - kv <
    sliding_window, OR(causal, same image block)), and the global layers stay causal (unlike Gemma 3); without it
    (the small checkpoints) every layer is causal, the sliding ones windowed."""
    family = "gemma4"
    composition = None  # Gemma 3's recipe would build a Gemma 3 model, not this family's: --from-teacher instead
    media_token_keys = ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id",
                        "boa_token_id", "eoa_token_index")
    projector_prefixes = ("model.embed_vision.",)
    vision_prefixes = ("model.vision_tower.",)
    frozen_prefixes = ("model.audio_tower.", "model.embed_audio.")

    def __init__(self, model: nn.Module):
        ModelAdapter.__init__(self, model)
        mode = getattr(self.text_config, "use_bidirectional_attention", None)
        if mode not in (None, "vision"):
            raise NotImplementedError(f"a {self.family} checkpoint with use_bidirectional_attention={mode!r} (every "
                                      "token sees every other: an encoder, not a generative model alignti distils)")

    @classmethod
    def lmms_eval_args(cls, image_processor):
        """lmms-eval's gemma4 class asks the processor for its own soft-token budget per image (``max_soft_tokens``,
        280 by default): pass the checkpoint's."""
        budget = image_processor.get("max_soft_tokens")
        return {"max_soft_tokens": int(budget)} if budget else {}

    @property
    def softcap(self) -> float | None:
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return float(cap) if cap else None

    @classmethod
    def generation_inputs(cls, input_ids, image_inputs, image_token_id):
        """The image tokens' ``mm_token_type_ids`` [B, S] (1: image), as the processor returns them: ``generate``
        builds the image tokens' bidirectional sliding mask from them."""
        if image_token_id is None:
            return image_inputs
        return {**image_inputs, "mm_token_type_ids": (input_ids == image_token_id).long()}

    global_images_bidirectional = False  # the global layers stay causal (Gemma3Adapter.layer_masks)

    def image_blocks(self, input_ids):
        """Each image's block (the model's own ``get_block_sequence_ids_for_mask``) where
        ``use_bidirectional_attention`` is "vision": the sliding layers open it both ways; else None."""
        if getattr(self.text_config, "use_bidirectional_attention", None) != "vision":
            return None
        from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask
        return get_block_sequence_ids_for_mask((input_ids == self.image_token_id).long(), input_ids.device)

    @classmethod
    def prune_layers(cls, model, keep: list[int], keep_vision: list[int] | None) -> list[str]:
        """Per-layer inputs and KV sharing after make-student --from-teacher kept the decoder layers ``keep``: the
        packed per-layer embedding table and projection (``embed_tokens_per_layer`` [V, L x d],
        ``per_layer_model_projection`` [L x d, H]) keep the kept layers' d-wide slices, in order; the kept KV-shared
        layers (the teacher's last ``num_kv_shared_layers``, which have no key/value projections) stay shared,
        which needs each one's producer (the teacher's last earlier layer of its type that is not shared) kept: an
        AlignTIError names the layer to keep otherwise."""
        from .errors import AlignTIError
        text = model.config.text_config  # already pruned: the kept layers' types
        lm = model.model.language_model
        attn = [layer.self_attn for layer in lm.layers]  # still flagged as in the teacher
        reuse = [a.is_kv_shared_layer for a in attn]
        for j, a in enumerate(attn):
            if a.is_kv_shared_layer and not any(b.store_full_length_kv and b.layer_type == a.layer_type for b in attn):
                raise AlignTIError(f"--keep-layers keeps the teacher's layer {keep[j]}, which reuses the keys and values "
                                   f"of the teacher's last unshared {a.layer_type} layer (KV sharing: it has no key/value "
                                   "projections of its own), but drops that layer: keep it too, or drop the KV-shared "
                                   "layers")
        shared = sum(reuse)
        text.num_kv_shared_layers = shared
        notes: list[str] = []
        d = int(getattr(text, "hidden_size_per_layer_input", 0) or 0)
        if d:
            cols = torch.cat([torch.arange(i * d, (i + 1) * d) for i in keep])
            table = lm.embed_tokens_per_layer
            new = type(table)(table.num_embeddings, len(keep) * d, table.padding_idx, embed_scale=table.scalar_embed_scale)
            new.weight = nn.Parameter(table.weight.data[:, cols].clone(), requires_grad=table.weight.requires_grad)
            new.to(table.weight.device)
            lm.embed_tokens_per_layer = new
            proj = lm.per_layer_model_projection
            lin = nn.Linear(proj.in_features, len(keep) * d, bias=False, device=proj.weight.device,
                            dtype=proj.weight.dtype)
            lin.weight = nn.Parameter(proj.weight.data[cols].clone(), requires_grad=proj.weight.requires_grad)
            lm.per_layer_model_projection = lin
        lm.first_kv_shared_layer_idx = len(keep) - shared
        lm.unique_layer_types = set(text.layer_types)
        modes = text.kv_sharing_modes
        for layer, mode in zip(lm.layers, modes):
            layer.self_attn.is_kv_shared_layer = mode == "reuse"
            layer.self_attn.store_full_length_kv = mode == "store"
        return notes


@dataclass(frozen=True)
class Family:
    """One row of the family registry: a model type (a config's ``model_type``, also ``make-demo --family``'s name
    where it has a kit), the adapter that runs it, its demo-kit recipe (common/kit_recipes.py; None: no demo kit),
    and lmms-eval's model class for its transformers-format folders (``evaluate --lmms-eval``; None: lmms-eval has
    none). Its ``--trainable`` groups are the adapter's ``projector_prefixes`` / ``vision_prefixes``. ``requires``:
    the Python modules the family's processor needs beyond alignti's own dependencies (LFM2-VL's image processor
    has a torchvision backend only); ``missing_requirements`` names those not installed."""
    model_type: str
    adapter: type[ModelAdapter]
    kit: KitRecipe | None = None
    lmms_eval_model: str | None = None
    requires: tuple[str, ...] = ()

    def missing_requirements(self) -> list[str]:
        """The modules of ``requires`` that do not import here (found by ``importlib.util.find_spec``)."""
        import importlib.util
        return [m for m in self.requires if importlib.util.find_spec(m) is None]

    def requirement_error(self) -> str | None:
        """What to tell a user whose environment lacks ``requires`` (None: nothing lacks): the packages and the pip
        command (torchvision pinned to the release built for the installed torch: ``models.torchvision_needed``)."""
        missing = self.missing_requirements()
        if not missing:
            return None
        if missing == ["torchvision"]:
            return torchvision_needed(f"the {self.model_type} family")
        return f"the {self.model_type} family needs {', '.join(missing)}, which is not installed: pip install " \
               f"{' '.join(missing)}"

    @property
    def projector_prefixes(self) -> tuple[str, ...]:
        return self.adapter.projector_prefixes

    @property
    def vision_prefixes(self) -> tuple[str, ...]:
        return self.adapter.vision_prefixes


# The one list of the families alignti runs: every family test parametrises over it (tests/test_conformance.py),
# make-demo --family takes the rows with a kit, the README's table is held equal to it (tests/test_conformance.py).
# lmms-eval: llava_hf loads transformers-format LLaVA, LLaVA-NeXT and OneVision folders (its `llava_onevision` class
# loads the LLaVA-NeXT repository's own layout through that repository's `llava` package, not these folders; its
# `llava_onevision1_5` class loads the lmms-lab remote-code layout with AutoModelForCausalLM, not transformers'
# LlavaOnevision15ForConditionalGeneration folders); lmms-eval has no class for Mistral 3.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", LlavaAdapter, LLAVA_KIT, "llava_hf"),
    Family("llava_next", LlavaOnevisionAdapter, None, "llava_hf"),
    Family("llava_onevision", LlavaOnevisionAdapter, ONEVISION_KIT, "llava_hf"),
    Family("qwen2_vl", Qwen2VLAdapter, QWEN2_VL_KIT, "qwen2_vl"),
    Family("qwen2_5_vl", Qwen2VLAdapter, QWEN2_5_VL_KIT, "qwen2_5_vl"),
    Family("qwen3_vl", Qwen3VLAdapter, QWEN3_VL_KIT, "qwen3_vl"),
    Family("qwen3_vl_moe", Qwen3VLMoeAdapter, QWEN3_VL_MOE_KIT, "qwen3_vl"),
    Family("gemma3", Gemma3Adapter, GEMMA3_KIT, "gemma3"),
    Family("gemma4", Gemma4Adapter, GEMMA4_KIT, "gemma4"),
    Family("qwen3_5", Qwen3_5Adapter, QWEN3_5_KIT),
    Family("qwen3_5_moe", Qwen3_5MoeAdapter, QWEN3_5_MOE_KIT),
    Family("mistral3", Mistral3Adapter, MISTRAL3_KIT),
    Family("llava_onevision1_5", LlavaOnevision1_5Adapter, ONEVISION1_5_KIT),
    Family("lfm2_vl", Lfm2VlAdapter, LFM2_VL_KIT, "lfm2_5_vl", requires=("torchvision",)),
    Family("internvl", InternVLAdapter, INTERNVL_KIT, "internvl_hf"),
    Family("idefics3", Idefics3Adapter, IDEFICS3_KIT),
    Family("smolvlm", Idefics3Adapter, SMOLVLM_KIT),
)}
# the model types with a demo kit (make-demo --family), in the registry's order
DEMO_FAMILIES: tuple[str, ...] = tuple(t for t, f in FAMILIES.items() if f.kit is not None)
ADAPTERS: list[type[ModelAdapter]] = list(dict.fromkeys(f.adapter for f in FAMILIES.values()))
for _cls in ADAPTERS:
    _cls.model_types = tuple(t for t, f in FAMILIES.items() if f.adapter is _cls)


def families_table() -> str:
    """The README's supported-families table (markdown), one row per model type of FAMILIES; tests/test_conformance.py
    holds the README's copy equal to it (regenerate: ``python -c "from alignti.common.adapters import families_table;
    print(families_table())"``)."""
    rows = ["| model type | adapter | `make-demo --family` | images per sample | `evaluate --lmms-eval` model | "
            "`--trainable projector` / `vision` |", "|---|---|---|---|---|---|"]
    for t, f in FAMILIES.items():
        prefixes = " ".join(f"`{p}`" for p in f.projector_prefixes) + " / " + " ".join(
            f"`{p}`" for p in f.vision_prefixes)
        demo = ("yes" + (f" (needs {', '.join(f.requires)})" if f.requires else "")) if f.kit else "-"
        rows.append(f"| `{t}` | `{f.adapter.__name__}` | {demo} | "
                    f"{'several' if f.adapter.multi_image else 'one'} | {f'`{f.lmms_eval_model}`' if f.lmms_eval_model else '-'} "
                    f"| {prefixes} |")
    return "\n".join(rows)


def check_images_per_sample(adapter: ModelAdapter | type[ModelAdapter], sample_id: str, n_images: int) -> None:
    """A multi-image sample for a family that takes one image per sample: a DataError naming the sample."""
    if n_images > 1 and not adapter.multi_image:
        takes = ", ".join(c.family for c in ADAPTERS if c.multi_image)
        raise DataError(sample_id, f"{n_images} images, but the {adapter.family} family takes one image per sample",
                        f"use a family that takes several ({takes}), keep one image per sample, or pass --skip-bad")


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class of a model type (a config's ``model_type``); NotImplementedError naming the supported
    ones otherwise."""
    if model_type in FAMILIES:
        return FAMILIES[model_type].adapter
    supported = ", ".join(FAMILIES)
    raise NotImplementedError(f"no alignti adapter for model_type '{model_type}' (supported: {supported})")


def adapter_for(model: nn.Module) -> ModelAdapter:
    return adapter_class(model.config.model_type)(model)
