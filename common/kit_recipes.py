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


# ---- Mistral 3 (Pixtral tower at native resolution, patch merger, Mistral LM) ----------------------------------
MISTRAL_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
                          "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
# Mistral-Small-3.1's template, its structure without the default system prompt: <s>, [SYSTEM_PROMPT]..
# [/SYSTEM_PROMPT], [INST]..[/INST] around a user turn, an image as [IMG] (the processor expands it into rows of [IMG]
# closed by [IMG_BREAK], the last by [IMG_END]), an answer closed by </s>
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}{% elif m['role'] == 'user' %}{{ '[INST]' }}{% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '[IMG]' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if m['role'] == 'system' %}{{ '[/SYSTEM_PROMPT]' }}{% elif m['role'] == 'user' %}{{ '[/INST]' }}"
    "{% else %}{{ eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TOKENS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
MISTRAL_MERGE = 2  # Mistral3Config.spatial_merge_size: 2x2 Pixtral patches per image token


def _mistral3_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """A 2-layer Pixtral tower on 8-px patches whose 2-D RoPE table covers ``image_size`` (the processor's longest
    edge), merged 2x2 (``spatial_merge_size``): a 48-px scene is a 3x3 grid of image tokens, each row closed by
    [IMG_BREAK] (the last by [IMG_END]); a non-square image keeps its aspect ratio (native resolution)."""
    from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

    cid = tokenizer.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vc = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             head_dim=16, image_size=image_size, patch_size=QWEN_PATCH)
    tc = MistralConfig(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=cid("</s>"), head_dim=head_dim,
                       sliding_window=None, tie_word_embeddings=False, **text)
    return Mistral3Config(vision_config=vc, text_config=tc, image_token_index=cid("[IMG]"),
                          spatial_merge_size=MISTRAL_MERGE, vision_feature_layer=-1, tie_word_embeddings=False)


def _mistral3_processor(tokenizer, image_size: int, patch: int = PATCH):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from .models import processor_class
    ip = PixtralImageProcessorPil(size={"longest_edge": image_size},
                                  patch_size={"height": QWEN_PATCH, "width": QWEN_PATCH})
    return processor_class("PixtralProcessor")(image_processor=ip, tokenizer=tokenizer, patch_size=QWEN_PATCH,
                                               spatial_merge_size=MISTRAL_MERGE, chat_template=MISTRAL_CHAT_TEMPLATE,
                                               image_token="[IMG]", image_break_token="[IMG_BREAK]",
                                               image_end_token="[IMG_END]")


MISTRAL3_KIT = KitRecipe(special_tokens=MISTRAL_SPECIAL_TOKENS, tokens=MISTRAL_TOKENS,
                         chat_template=MISTRAL_CHAT_TEMPLATE, config=_mistral3_config, processor=_mistral3_processor,
                         image_tokens=9)


# ---- LLaVA-OneVision-1.5 (RICE-ViT tower with a class token and 2-D RoPE, patch merger, Qwen3 LM, 1-D positions) --
def _onevision1_5_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """A 2-block RICE-ViT on 8-px patches merged 2x2 (a 48-px scene: 3x3 image tokens), its merger into the Qwen3 LM's
    width; Qwen2-VL's processor layout (``<|vision_start|><|image_pad|>..<|vision_end|>``) with one-frame patches
    (``temporal_patch_size`` 1: the tower's patch embedding is a 2-D convolution)."""
    from transformers.models.llava_onevision1_5.configuration_llava_onevision1_5 import LlavaOnevision15Config

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=text["hidden_size"],
                  patch_size=QWEN_PATCH, spatial_merge_size=2)
    lm = dict(model_type="qwen3", vocab_size=len(tokenizer), max_position_embeddings=512,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=eos, head_dim=head_dim,
              tie_word_embeddings=False, **text)
    return LlavaOnevision15Config(text_config=lm, vision_config=vision, tie_word_embeddings=False,
                                  **_qwen_ids(tokenizer))


def _onevision1_5_processor(tokenizer, image_size: int, patch: int = PATCH):
    from transformers.models.exaone4_5.processing_exaone4_5 import Exaone4_5_Processor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from .models import image_only_processor_class
    n = image_size ** 2
    ip = Qwen2VLImageProcessorPil(min_pixels=n, max_pixels=n, patch_size=QWEN_PATCH, merge_size=2,
                                  temporal_patch_size=1)
    return image_only_processor_class(Exaone4_5_Processor)(image_processor=ip, tokenizer=tokenizer,
                                                           chat_template=QWEN_CHAT_TEMPLATE)


ONEVISION1_5_KIT = KitRecipe(special_tokens=QWEN_SPECIAL_TOKENS, tokens=QWEN_TOKENS, chat_template=QWEN_CHAT_TEMPLATE,
                             config=_onevision1_5_config, processor=_onevision1_5_processor, image_tokens=9)


# ---- LFM2-VL (SigLIP2 NaFlex tower at native aspect ratio, pixel-unshuffle projector, LFM2 hybrid decoder: short
# convolutions and full attention) --------------------------------------------------------------------------------
LFM2_VL_TILES = 4  # the kit's most tiles per image (min_tiles 2); the released processors: 2 to 10
# the shipped tokenizer's tile markers (<|img_row_R_col_C|>, R and C 1..10, special) for the kit's grids
LFM2_VL_SPECIAL_TOKENS = ("<|pad|>", "<|startoftext|>", "<|im_start|>", "<|im_end|>", "<unk>", "<image>",
                          "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>") + tuple(
    f"<|img_row_{r}_col_{c}|>" for r in range(1, LFM2_VL_TILES + 1) for c in range(1, LFM2_VL_TILES + 1))
# LFM2-VL's shipped chat template, verbatim (LiquidAI/LFM2-VL-450M chat_template.jinja; tests/data/tokenizers/
# lfm2-vl-450m): ChatML after the bos token; an image part is "<image>", which the processor expands to
# "<|image_start|>" + image tokens + "<|image_end|>"
LFM2_VL_CHAT_TEMPLATE = (
    "{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}{% endif %}"
)
LFM2_VL_TOKENS = dict(pad_token="<|pad|>", bos_token="<|startoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
                      extra_special_tokens={"image_token": "<image>"})
LFM2_VL_PATCH = 8  # the tower's patch side in pixels; 2x2 patches are unshuffled into one image token (16 px)


def _lfm2_vl_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """Layer 0 a short convolution (``conv``, kernel 3 as the released checkpoints), layer 1 ``full_attention``
    (LFM2 interleaves them about 10:6): both kinds are exercised and one attention layer is left for IVA's saliency.
    A 48-px scene is tiled (``_lfm2_vl_processor``): 2x2 tiles of 32 px plus a 32-px thumbnail, each a 4x4 grid of 8-px
    patches unshuffled 2x2 into 2x2 = 4 image tokens (20 per scene); the tower's position table is a 6x6 grid
    (``num_patches`` 36, resized to each tile's grid by the tower itself). The LM head is
    untied (the released checkpoints tie it): an untrained tied head scores each input token highest, so the untrained
    student would only ever repeat the line break before its answer (no answer text for rollouts)."""
    from transformers import Lfm2VlConfig

    cid = tokenizer.convert_tokens_to_ids
    n = text["num_hidden_layers"]
    vision = dict(model_type="siglip2_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=LFM2_VL_PATCH, num_patches=(image_size // LFM2_VL_PATCH) ** 2,
                  vision_use_head=False)
    lm = dict(model_type="lfm2", vocab_size=len(tokenizer), max_position_embeddings=512,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=cid("<|im_end|>"),
              layer_types=["full_attention" if (i + 1) % 2 == 0 else "conv" for i in range(n)], conv_L_cache=3,
              block_auto_adjust_ff_dim=False, tie_word_embeddings=False, **text)
    return Lfm2VlConfig(text_config=lm, vision_config=vision, image_token_id=cid("<image>"), downsample_factor=2,
                        projector_hidden_size=2 * text["hidden_size"], tie_word_embeddings=False)


def _lfm2_vl_processor(tokenizer, image_size: int, patch: int = PATCH):
    """Lfm2VlProcessor with the family's image processor (torchvision: it has no PIL backend), tiling on as the
    released checkpoints ship it, at a small scale: 8-px patches, 32-px tiles (4 image tokens), at most 4 image
    tokens' worth of pixels (x ``max_pixels_tolerance`` 2) in one untiled image, 2 to 4 tiles plus a thumbnail. A
    48-px scene: 2x2 tiles + a 2x2-token thumbnail (20 image tokens); 96x48 px: 1x2 tiles + a 1x2-token thumbnail;
    32 px and below: one untiled grid."""
    from transformers import Lfm2VlImageProcessor, Lfm2VlProcessor

    ip = Lfm2VlImageProcessor(encoder_patch_size=LFM2_VL_PATCH, downsample_factor=2, do_image_splitting=True,
                              min_tiles=2, max_tiles=LFM2_VL_TILES, min_image_tokens=1, max_image_tokens=4,
                              tile_size=4 * LFM2_VL_PATCH, use_thumbnail=True, max_pixels_tolerance=2.0,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Lfm2VlProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=LFM2_VL_CHAT_TEMPLATE)


LFM2_VL_KIT = KitRecipe(special_tokens=LFM2_VL_SPECIAL_TOKENS, tokens=LFM2_VL_TOKENS,
                        chat_template=LFM2_VL_CHAT_TEMPLATE, config=_lfm2_vl_config, processor=_lfm2_vl_processor,
                        image_tokens=20)


# ---- InternVL (InternViT tower, pixel-shuffle projector, Qwen2 LM; dynamic tiling: tiles plus a thumbnail) -------
INTERNVL_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<|im_end|>", "<unk>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>")
# the shipped InternVL3 -hf template (transformers' convert_internvl_weights_to_hf.py): an image is <IMG_CONTEXT>\n,
# which the processor expands into <img> + image_seq_length <IMG_CONTEXT> per tile + </img>
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
INTERNVL_TOKENS = dict(pad_token="<pad>", eos_token="<|im_end|>", unk_token="<unk>",
                       extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
INTERNVL_TILE = 24        # tile side in pixels (InternVL3: 448); a 48-px scene is 2 x 2 tiles plus the thumbnail
INTERNVL_PATCH = 4        # vision patch (InternVL3: 14): a 6 x 6 patch grid per tile,
INTERNVL_TILE_TOKENS = 9  # pixel-shuffled (downsample_ratio 0.5) to 3 x 3 image tokens per tile (InternVL3: 256)


def _internvl_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """A 2-layer InternViT on 24-px tiles in 4-px patches (6 x 6 patches, the CLS token dropped: select strategy
    ``default``), the pixel-shuffle projector at ``downsample_ratio`` 0.5 (2 x 2 neighbouring patches into one token:
    9 tokens per tile), a Qwen2 LM (InternVL3's; InternVL3.5's Qwen3 LMs differ only in the decoder)."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    cid = tokenizer.convert_tokens_to_ids
    vc = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=INTERNVL_TILE, patch_size=INTERNVL_PATCH, use_mean_pooling=True)
    tc = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=cid("<|im_end|>"), **text)
    return InternVLConfig(vision_config=vc, text_config=tc, image_token_id=cid("<IMG_CONTEXT>"),
                          image_seq_length=INTERNVL_TILE_TOKENS, downsample_ratio=0.5, projector_hidden_act="gelu",
                          vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)


def _internvl_processor(tokenizer, image_size: int, patch: int = PATCH):
    """Dynamic tiling as shipped (``crop_to_patches``, the thumbnail added when there are several tiles), 1 to 4
    tiles per image (InternVL3: 1 to 12)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .models import image_only_processor_class
    ip = GotOcr2ImageProcessorPil(size={"height": INTERNVL_TILE, "width": INTERNVL_TILE}, crop_to_patches=True,
                                  min_patches=1, max_patches=4, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    return image_only_processor_class(InternVLProcessor)(
        image_processor=ip, tokenizer=tokenizer, chat_template=INTERNVL_CHAT_TEMPLATE,
        image_seq_length=INTERNVL_TILE_TOKENS)


INTERNVL_KIT = KitRecipe(special_tokens=INTERNVL_SPECIAL_TOKENS, tokens=INTERNVL_TOKENS,
                         chat_template=INTERNVL_CHAT_TEMPLATE, config=_internvl_config, processor=_internvl_processor,
                         image_tokens=5 * INTERNVL_TILE_TOKENS)


# ---- Idefics3 / SmolVLM (SigLIP-style tower at a fixed sub-image size, pixel-shuffle connector, Llama LM; each
# image split into a grid of sub-images plus a global image, framed by row/column markup in the text) -------------
# the shipped tokenizers' image markup: <fake_token_around_image> before each sub-image (and after the global one),
# <row_r_col_c> naming a sub-image, <global-img> the downscaled whole image; row/column tags up to 6 x 6 as shipped
SMOLVLM_IMAGE_TOKENS = ("<fake_token_around_image>", "<image>", "<global-img>") + tuple(
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))
SMOLVLM_SPECIAL_TOKENS = ("<pad>", "<|im_start|>", "<end_of_utterance>", "<unk>") + SMOLVLM_IMAGE_TOKENS
# SmolVLM's shipped template (HuggingFaceTB/SmolVLM-*-Instruct, chat_template.json): "User:" / "Assistant:" turns
# after one <|im_start|>, ':' alone before a turn that opens with an image, each turn closed by <end_of_utterance>
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TOKENS = dict(pad_token="<pad>", bos_token="<|im_start|>", eos_token="<end_of_utterance>", unk_token="<unk>",
                      extra_special_tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                            "global_image_token": "<global-img>",
                                            "end_of_utterance_token": "<end_of_utterance>"})
SMOLVLM_SUB_IMAGE = 24  # pixels: a 48-px scene is split into 2 x 2 sub-images of 24 px plus the global image
SMOLVLM_PATCH = 6  # 4 x 4 patches per sub-image, pixel-shuffled by 2 to 2 x 2 = 4 image tokens
SMOLVLM_SCALE = 2


def _smolvlm_config(tokenizer, text: dict, image_size: int, patch: int = PATCH, idefics3: bool = False):
    """A SigLIP-style tower at the sub-image size (24 px, 6-px patches), the pixel-shuffle connector (scale factor 2:
    4 image tokens per sub-image), a Llama LM; ``idefics3``: the same as an Idefics3Config."""
    from transformers import Idefics3Config, SmolVLMConfig

    cid = tokenizer.convert_tokens_to_ids
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=SMOLVLM_SUB_IMAGE, patch_size=SMOLVLM_PATCH)
    tc = dict(model_type="llama", vocab_size=len(tokenizer), max_position_embeddings=512,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=cid("<end_of_utterance>"), tie_word_embeddings=False, **text)
    return (Idefics3Config if idefics3 else SmolVLMConfig)(
        text_config=tc, vision_config=vision, scale_factor=SMOLVLM_SCALE, image_token_id=cid("<image>"),
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def _idefics3_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    return _smolvlm_config(tokenizer, text, image_size, patch, idefics3=True)


def _smolvlm_image_processor(image_size: int, idefics3: bool = False):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return (Idefics3ImageProcessorPil if idefics3 else SmolVLMImageProcessorPil)(
        size={"longest_edge": image_size}, max_image_size={"longest_edge": SMOLVLM_SUB_IMAGE}, do_image_splitting=True)


def _smolvlm_processor(tokenizer, image_size: int, patch: int = PATCH):
    """SmolVLM's processor without its video processor (which needs torchvision; common/saving.py writes its
    settings), image_seq_len = (24 / 6)^2 / 2^2 = 4 tokens per sub-image."""
    from transformers import SmolVLMProcessor

    from .models import image_only_processor_class
    return image_only_processor_class(SmolVLMProcessor)(
        image_processor=_smolvlm_image_processor(image_size), tokenizer=tokenizer, chat_template=SMOLVLM_CHAT_TEMPLATE,
        image_seq_len=(SMOLVLM_SUB_IMAGE // SMOLVLM_PATCH) ** 2 // SMOLVLM_SCALE ** 2)


def _idefics3_processor(tokenizer, image_size: int, patch: int = PATCH):
    from transformers import Idefics3Processor

    return Idefics3Processor(image_processor=_smolvlm_image_processor(image_size, idefics3=True), tokenizer=tokenizer,
                             chat_template=SMOLVLM_CHAT_TEMPLATE,
                             image_seq_len=(SMOLVLM_SUB_IMAGE // SMOLVLM_PATCH) ** 2 // SMOLVLM_SCALE ** 2)


# image tokens per 48-px scene: 2 x 2 sub-images and the global image, 4 tokens each
SMOLVLM_KIT = KitRecipe(special_tokens=SMOLVLM_SPECIAL_TOKENS, tokens=SMOLVLM_TOKENS,
                        chat_template=SMOLVLM_CHAT_TEMPLATE, config=_smolvlm_config, processor=_smolvlm_processor,
                        image_tokens=20)
IDEFICS3_KIT = KitRecipe(special_tokens=SMOLVLM_SPECIAL_TOKENS, tokens=SMOLVLM_TOKENS,
                         chat_template=SMOLVLM_CHAT_TEMPLATE, config=_idefics3_config, processor=_idefics3_processor,
                         image_tokens=20)


# ---- Gemma 4 (its own ViT with 2-D positions and patch pooling, a Gemma 4 LM: sliding-window and global layers,
# per-layer input embeddings, KV-shared layers, final logit soft-capping; an audio tower the distillation leaves
# alone) ------------------------------------------------------------------------------------------------------------
# the shipped tokenizer's markup (google/gemma-4-*-it): turns <|turn>role ... <turn|>, an image as <|image|>, which
# the processor expands to <|image> + soft tokens + <image|>; the audio and video tokens the processor asks for
GEMMA4_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
                         "<|audio>", "<audio|>", "<|audio|>", "<|video|>")
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<|image|>' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<turn|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|turn>model\n' }}{% endif %}"
)
GEMMA4_TOKENS = dict(pad_token="<pad>", bos_token="<bos>", eos_token="<turn|>", unk_token="<unk>",
                     extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                           "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
GEMMA4_SOFTCAP = 2.0  # the released checkpoints' 30, scaled to the tiny models' logits so that the cap is exercised


def _gemma4_config(tokenizer, text: dict, image_size: int, patch: int = PATCH):
    """Four layers (at least): 0 sliding-window (8 tokens), the rest global (wider heads, their own rope, keys as
    values: ``attention_k_eq_v``), as the large Gemma 4 checkpoints; per-layer input embeddings
    (``hidden_size_per_layer_input``) and the last layer reusing the keys and values of the one before
    (``num_kv_shared_layers`` 1), as the small ones. Two unshared global layers, not one: the first's outputs at the
    image tokens must reach the answer through an unshared layer's keys, or a mask that made the global layers
    bidirectional too would leave every logit unchanged (the sliding window is shorter than the image-to-answer
    distance, and a shared layer reads its producer's keys, made before that producer's attention). Image tokens
    bidirectional within an image (``use_bidirectional_attention`` "vision"); the final logits soft-capped. Vision:
    8-px patches of a 48-px scene (6x6) pooled 2x2 into 9 soft tokens. A one-layer audio tower."""
    from transformers import Gemma4Config

    cid = tokenizer.convert_tokens_to_ids
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    n = max(4, text["num_hidden_layers"])  # see the docstring: a global layer's output must reach an unshared layer
    text = dict(text, num_hidden_layers=n)
    layer_types = ["sliding_attention"] + ["full_attention"] * (n - 1)
    tc = dict(vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), max_position_embeddings=512,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=cid("<turn|>"),
              head_dim=head_dim, global_head_dim=2 * head_dim, num_global_key_value_heads=1, attention_k_eq_v=True,
              sliding_window=GEMMA_SLIDING_WINDOW, layer_types=layer_types, hidden_size_per_layer_input=8,
              num_kv_shared_layers=1, use_bidirectional_attention="vision",
              final_logit_softcapping=GEMMA4_SOFTCAP, tie_word_embeddings=True, **text)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              head_dim=8, patch_size=QWEN_PATCH, pooling_kernel_size=2, position_embedding_size=image_size // QWEN_PATCH)
    ac = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
              output_proj_dims=32, conv_kernel_size=3)
    return Gemma4Config(text_config=tc, vision_config=vc, audio_config=ac, boi_token_id=cid("<|image>"),
                        eoi_token_id=cid("<image|>"), image_token_id=cid("<|image|>"), video_token_id=cid("<|video|>"),
                        boa_token_id=cid("<|audio>"), eoa_token_index=cid("<audio|>"), audio_token_id=cid("<|audio|>"),
                        tie_word_embeddings=True)


def _gemma4_processor(tokenizer, image_size: int, patch: int = PATCH):
    """The 48-px scenes as they are (``do_resize`` off: the shipped resize fills a budget of at least 70 soft tokens),
    8-px patches pooled 2x2: 9 soft tokens; the audio feature extractor at its defaults (kept, not used)."""
    from transformers import Gemma4Processor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    from .models import image_only_processor_class
    ip = Gemma4ImageProcessorPil(do_resize=False, patch_size=QWEN_PATCH, pooling_kernel_size=2, max_soft_tokens=70)
    return image_only_processor_class(Gemma4Processor)(
        feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=ip, tokenizer=tokenizer,
        chat_template=GEMMA4_CHAT_TEMPLATE, image_seq_length=9)


GEMMA4_KIT = KitRecipe(special_tokens=GEMMA4_SPECIAL_TOKENS, tokens=GEMMA4_TOKENS, chat_template=GEMMA4_CHAT_TEMPLATE,
                       config=_gemma4_config, processor=_gemma4_processor, image_tokens=9)
