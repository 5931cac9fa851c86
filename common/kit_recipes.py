"""Each family's demo-kit recipe: the tiny configs ``alignti make-demo --family F`` builds, as data.

A recipe is configuration only (the tokenizer's special tokens and chat template, the model config and the processor
settings of a tiny checkpoint of the family); the code that trains a tokenizer, builds the models and writes the kit
is demo/kit.py. The registry that ties a recipe to its family's adapter is ``FAMILIES`` in common/adapters.py.

Sizes: ``text`` is the language model's dimensions (demo/kit.py's TEACHER / STUDENT: hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads); ``image_size`` is the scenes'
side in pixels (demo/shapes.py's IMAGE_SIZE, 48), ``patch`` the LLaVA vision patch in pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

LLAVA_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|end|>")
QWEN_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
GRID_PINPOINTS = [[48, 48], [48, 96], [96, 48], [96, 96]]
PATCH = 16  # one image token per grid cell (LLaVA, OneVision); Qwen2-VL merges 2x2 patches of 8 px
QWEN_PATCH = 8


@dataclass(frozen=True)
class KitRecipe:
    """A family's tiny demo checkpoint as configuration.

    ``special_tokens`` open the trained BPE vocabulary (ids 0..n-1, in this order); ``tokens`` are the
    ``PreTrainedTokenizerFast`` settings naming them (pad, eos: the template's end of turn, where generation stops;
    harnesses that stop at the tokenizer's eos, as lmms-eval's llava_hf, would otherwise run past the answer);
    ``added_tokens`` are added as extra special tokens after training (OneVision's ``<video>``).
    ``config(tokenizer, text, image_size, patch)`` gives the model config (transformers' class for the model type),
    ``processor(tokenizer, image_size, patch)`` the processor. ``image_tokens``: image tokens per scene image
    (48 px). ``resizable``: the recipe takes another ``image_size`` / ``patch`` (LLaVA's CLIP tower).
    ``position_embedding_std``: the vision tower's patch position embeddings drawn at this std (LLaVA: 1.0, so each
    image token says which grid cell it is; with the default 0.02 the tiny teacher stays at the answer prior).
    ``text_tokens``: added as ordinary (not special) tokens after those, as a shipped tokenizer lists them among its
    added tokens with ``"special": false`` (Qwen3's ``<think>``)."""
    special_tokens: tuple[str, ...]
    tokens: dict
    chat_template: str
    config: Callable
    processor: Callable
    image_tokens: int
    added_tokens: tuple[str, ...] = ()
    text_tokens: tuple[str, ...] = ()
    resizable: bool = False
    position_embedding_std: float | None = None
    extra: dict = field(default_factory=dict)


# ---- LLaVA (CLIP tower, Llama LM) -------------------------------------------------------------------------------
def _llava_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=image_size, patch_size=patch, projection_dim=64)
    n_image = (image_size // patch) ** 2
    tc = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512 if n_image < 256 else 1024,
                     tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"), **text)
    return LlavaConfig(vision_config=vc, text_config=tc, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def _llava_processor(tokenizer, image_size: int, patch: int = PATCH):
    """``patch``: vision patch size; 16 gives one image token per grid cell, 2 gives LLaVA-1.5's 576 image tokens per
    image at 48 px; ``image_size``: the size the image processor resizes to, so (image_size // patch)^2 tokens."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token="<image>")


LLAVA_KIT = KitRecipe(
    special_tokens=LLAVA_SPECIAL_TOKENS,
    tokens=dict(pad_token="<pad>", bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
                extra_special_tokens={"image_token": "<image>"}),
    chat_template=CHAT_TEMPLATE, config=_llava_config, processor=_llava_processor, image_tokens=9, resizable=True,
    position_embedding_std=1.0)


# ---- LLaVA-OneVision (SigLIP tower, Qwen2 LM, anyres tiles) -----------------------------------------------------
def _onevision_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vc = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=PATCH)
    eos = tokenizer.convert_tokens_to_ids("<|end|>")
    tc = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **text)
    return LlavaOnevisionConfig(vision_config=vc, text_config=tc,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                image_grid_pinpoints=GRID_PINPOINTS)


def _onevision_processor(tokenizer, image_size: int, patch: int = PATCH):
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from .models import image_only_processor_class
    ip = LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                         image_grid_pinpoints=GRID_PINPOINTS, do_pad=True)
    return image_only_processor_class(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_token="<image>",
        video_token="<video>", num_image_tokens=(image_size // PATCH) ** 2, vision_feature_select_strategy="full")


ONEVISION_KIT = KitRecipe(
    special_tokens=LLAVA_SPECIAL_TOKENS, tokens=LLAVA_KIT.tokens, added_tokens=("<video>",),
    chat_template=CHAT_TEMPLATE, config=_onevision_config, processor=_onevision_processor, image_tokens=21)


# ---- Qwen2-VL / Qwen2.5-VL (own tower with patch merger, M-RoPE) -------------------------------------------------
def _mrope_section(text: dict) -> list[int]:
    head_half = text["hidden_size"] // text["num_attention_heads"] // 2
    return [head_half - 2 * (head_half // 3), head_half // 3, head_half // 3]


def _qwen_ids(tokenizer) -> dict:
    cid = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=cid("<|image_pad|>"), video_token_id=cid("<|video_pad|>"),
                vision_start_token_id=cid("<|vision_start|>"), vision_end_token_id=cid("<|vision_end|>"))


def _qwen2_vl_config(tokenizer, text: dict, image_size: int, patch: int = PATCH, v25: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vision = (dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"], num_heads=4,
                   patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                   fullatt_block_indexes=[1]) if v25 else
              dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=4, patch_size=QWEN_PATCH,
                   spatial_merge_size=2, temporal_patch_size=2))
    return (Qwen2_5_VLConfig if v25 else Qwen2VLConfig)(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, eos_token_id=eos, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": _mrope_section(text)},
                         **text),
        vision_config=vision, **_qwen_ids(tokenizer))


def _qwen_processor(cls_name: str):
    def build(tokenizer, image_size: int, patch: int = PATCH):
        import transformers
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from .models import image_only_processor_class
        n = image_size ** 2
        ip = Qwen2VLImageProcessorPil(min_pixels=n, max_pixels=n, patch_size=QWEN_PATCH, merge_size=2,
                                      temporal_patch_size=2)
        return image_only_processor_class(getattr(transformers, cls_name))(
            image_processor=ip, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)
    return build


QWEN_TOKENS = dict(pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                   extra_special_tokens={"image_token": "<|image_pad|>"})
QWEN2_VL_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                         config=_qwen2_vl_config, processor=_qwen_processor("Qwen2VLProcessor"), image_tokens=9)
def _qwen2_5_vl_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    return _qwen2_vl_config(tokenizer, text, image_size, patch, v25=True)


QWEN2_5_VL_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                           config=_qwen2_5_vl_config, processor=_qwen_processor("Qwen2_5_VLProcessor"), image_tokens=9)


# ---- Qwen3-VL (own tower with patch merger and deepstack mergers, interleaved M-RoPE, Qwen3 LM) -----------------
def _qwen3_vl_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """Deepstack: the tower's block 0 feeds the LM's layer 0 (``deepstack_visual_indexes`` [0]); its patch position
    table is the 6x6 grid of a 48-px scene in 8-px patches (``num_position_embeddings`` 36, interpolated to other
    grids by the tower itself)."""
    from transformers import Qwen3VLConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=text["hidden_size"],
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=(image_size // QWEN_PATCH) ** 2, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, eos_token_id=eos, head_dim=head_dim,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                          "mrope_section": _mrope_section(text)},
                         **text),
        vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tokenizer))


# Qwen3's tokenizer is Qwen2.5's with 4 more added tokens, ids 151665-151668 after Qwen2.5's last (151664),
# "special": false (Qwen/Qwen3-VL-*-Instruct tokenizer_config.json, added_tokens_decoder): the Qwen3-VL kits' tokenizer
# is the Qwen2.5-VL kit's plus these, so a Qwen2.5-VL teacher and a Qwen3-VL student differ as the released ones do
QWEN3_TEXT_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN3_VL_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                         config=_qwen3_vl_config, processor=_qwen_processor("Qwen3VLProcessor"), image_tokens=9,
                         text_tokens=QWEN3_TEXT_TOKENS)


# ---- Qwen3-VL-MoE (Qwen3-VL with a mixture-of-experts decoder) --------------------------------------------------
def _qwen3_vl_moe_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """Qwen3-VL's recipe with every decoder MLP a sparse MoE block: 4 experts of width intermediate_size / 4, 2 per
    token (``num_experts_per_tok``), the load-balancing coefficient left at the library's default."""
    from transformers import Qwen3VLMoeConfig

    dense = _qwen3_vl_config(tokenizer, text, image_size, patch).to_dict()
    dense["text_config"].update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                                moe_intermediate_size=max(text["intermediate_size"] // 4, 8))
    for k in ("model_type", "architectures", "transformers_version"):
        dense.pop(k, None)
        dense["text_config"].pop(k, None)
        dense["vision_config"].pop(k, None)
    return Qwen3VLMoeConfig(**dense)


QWEN3_VL_MOE_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                             config=_qwen3_vl_moe_config, processor=_qwen_processor("Qwen3VLProcessor"), image_tokens=9,
                             text_tokens=QWEN3_TEXT_TOKENS)


# ---- Qwen3.5 (Qwen3-VL's tower without deepstack, a hybrid decoder: Gated DeltaNet and full attention) ----------
def _qwen3_5_config(tokenizer, text: dict, image_size: int, patch: int = PATCH, moe: bool = False):
    """Layer 0 Gated DeltaNet (``linear_attention``), layer 1 ``full_attention`` (3:1 from 4 layers, as the released
    checkpoints interleave them): both kinds are
    exercised, and one full-attention layer is left for IVA's saliency. ``moe``: every MLP a sparse MoE block
    (4 experts, 2 per token) with a shared expert."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    n = text["num_hidden_layers"]
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=text["hidden_size"],
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=(image_size // QWEN_PATCH) ** 2)
    lm = dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=None, eos_token_id=eos, head_dim=head_dim, tie_word_embeddings=False,
              linear_conv_kernel_dim=4, linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
              linear_num_key_heads=text["num_key_value_heads"], linear_num_value_heads=text["num_attention_heads"],
              layer_types=["full_attention" if (i + 1) % (4 if n >= 4 else 2) == 0 else "linear_attention"
                           for i in range(n)],
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                               "mrope_section": _mrope_section(text), "partial_rotary_factor": 1.0},
              **text)
    if moe:
        lm.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=max(text["intermediate_size"] // 4, 8),
                  shared_expert_intermediate_size=max(text["intermediate_size"] // 4, 8))
        lm.pop("intermediate_size")
    return (Qwen3_5MoeConfig if moe else Qwen3_5Config)(text_config=lm, vision_config=vision,
                                                          tie_word_embeddings=False, **_qwen_ids(tokenizer))


def _qwen3_5_moe_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    return _qwen3_5_config(tokenizer, text, image_size, patch, moe=True)


QWEN3_5_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                        config=_qwen3_5_config, processor=_qwen_processor("Qwen3VLProcessor"), image_tokens=9)
QWEN3_5_MOE_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                            config=_qwen3_5_moe_config, processor=_qwen_processor("Qwen3VLProcessor"), image_tokens=9)


# ---- Gemma 3 (SigLIP tower, avg-pooled projector, Gemma 3 LM: sliding-window and global layers, bidirectional
# attention among each image's tokens) -------------------------------------------------------------------------
GEMMA_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                        "<end_of_image>", "<image_soft_token>")
# Gemma 3's template (the shipped one's structure: <bos>, <start_of_turn>user / model, <end_of_turn>, an image as
# <start_of_image>, which the processor expands to "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
GEMMA_TOKENS = dict(pad_token="<pad>", bos_token="<bos>", eos_token="<end_of_turn>", unk_token="<unk>",
                    extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                          "eoi_token": "<end_of_image>"})
GEMMA_SLIDING_WINDOW = 8  # shorter than every demo sequence: the sliding layers' window is exercised


def _gemma3_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """Layer 0 sliding-window (8 tokens), layer 1 global, as Gemma 3 interleaves them (5:1 at real size); a 6x6 patch
    grid average-pooled to 3x3 = 9 image tokens (``mm_tokens_per_image``)."""
    from transformers import Gemma3Config, SiglipVisionConfig

    cid = tokenizer.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    n = text["num_hidden_layers"]
    vc = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=QWEN_PATCH)
    tc = dict(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=cid("<end_of_turn>"), head_dim=head_dim,
              query_pre_attn_scalar=head_dim, sliding_window=GEMMA_SLIDING_WINDOW,
              layer_types=["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(n)],
              tie_word_embeddings=True, **text)
    return Gemma3Config(text_config=tc, vision_config=vc.to_dict(), mm_tokens_per_image=9,
                        boi_token_index=cid("<start_of_image>"), eoi_token_index=cid("<end_of_image>"),
                        image_token_index=cid("<image_soft_token>"), tie_word_embeddings=True)


def _gemma3_processor(tokenizer, image_size: int, patch: int = PATCH):
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    ip = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, do_pan_and_scan=False)
    return Gemma3Processor(image_processor=ip, tokenizer=tokenizer, chat_template=GEMMA_CHAT_TEMPLATE,
                           image_seq_length=9)


GEMMA3_KIT = KitRecipe(special_tokens=GEMMA_SPECIAL_TOKENS, tokens=GEMMA_TOKENS, chat_template=GEMMA_CHAT_TEMPLATE,
                       config=_gemma3_config, processor=_gemma3_processor, image_tokens=9)
