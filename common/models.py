"""Loading a VLM checkpoint (local path or hub id) with its processor."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import weakref
from pathlib import Path

import torch

from .errors import AlignTIError, ModelPathError

log = logging.getLogger("alignti.models")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def torch_dtype_for(dtype: str, device: torch.device) -> torch.dtype:
    """``dtype`` "auto": bf16 on CUDA, fp32 elsewhere; else the torch dtype of that name."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_model(path: str, device: torch.device, dtype: str = "auto", tp_size: int = 1, ep_size: int = 1,
               device_map: str | None = None, max_memory: dict | None = None):
    """The VLM at ``path`` (local folder or hub id) on ``device``; ``dtype`` "auto": bf16 on CUDA, fp32 on CPU.

    ``tp_size`` T > 1 (under torchrun, the process group initialised): transformers' own tensor parallelism
    (``DistributedConfig(tp_size=T)``, the family's ``base_model_tp_plan``) over the T ranks of this rank's replica
    (consecutive ranks, common.distributed.DistEnv); ``ep_size`` = T adds the family's expert-parallel plan
    (``base_model_ep_plan``, MoE teachers: the experts split over the same ranks). ``device_map``
    "auto": accelerate's placement over the visible GPUs, then the CPU, then disk, each within ``max_memory``
    ({0: "70GiB", "cpu": "200GiB"}, accelerate's format); the inputs go to ``input_device(model)``."""
    from transformers import AutoModelForImageTextToText

    torch_dtype = torch_dtype_for(dtype, device)
    check_processor_files(path)  # first: a folder without processor files is named before the weights load
    if tp_size > 1 or ep_size > 1:
        from transformers.distributed import DistributedConfig
        placing = _replica_meshes()
        options = {"distributed_config": DistributedConfig(tp_size=tp_size, ep_size=ep_size)}
    elif device_map is not None:
        import atexit
        import shutil
        import tempfile
        # layers the map sends to disk live here (accelerate's offload folder) while the process runs
        offload = tempfile.mkdtemp(prefix="alignti-offload-")
        atexit.register(shutil.rmtree, offload, ignore_errors=True)
        placing = contextlib.nullcontext()
        options = {"device_map": device_map, "max_memory": max_memory, "offload_folder": offload}
    else:
        placing, options = contextlib.nullcontext(), {}
    with placing:
        model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, output_loading_info=True,
                                                                  **options)
    # transformers' load report: parameters and buffers the checkpoint lacked (or held in another shape), which it
    # initialised at random; tied weights and the model's own ignore-lists are already taken out of it
    new = sorted(set(info.get("missing_keys") or ()) | {k[0] for k in info.get("mismatched_keys") or ()})
    _NEW_WEIGHTS[model] = new
    if new:
        log.warning("%s: %d weight tensor(s) are not in the checkpoint and were newly initialised at load (%s)", path,
                    len(new), summarise_names(new))
    return model if options else model.to(device)


@contextlib.contextmanager
def _replica_meshes():
    """transformers lays its device mesh over the whole world (``initialize_distributed_mesh``: pp x dp_replicate x
    fsdp x tp ranks). Replicas of a tensor-parallel teacher are that mesh's dp_replicate axis without FSDP, which
    its config cannot say (dp_replicate_size > 1 turns FSDP on): while loading, the mesh is built with the replicas
    as dp_replicate (consecutive ranks share a tp group) and the model's config keeps dp_replicate_size 1, so only
    the tensor (and expert) plans apply, each within its replica."""
    import torch.distributed as tdist
    import transformers.distributed.mixin as mixin
    original = mixin.initialize_distributed_mesh

    def per_replica(cfg):
        group = cfg.pp_size * cfg.fsdp_size * cfg.tp_size
        return original(dataclasses.replace(cfg, dp_replicate_size=tdist.get_world_size() // group))

    mixin.initialize_distributed_mesh = per_replica
    try:
        yield
    finally:
        mixin.initialize_distributed_mesh = original


def input_device(model, default: torch.device) -> torch.device:
    """Where a batch goes: ``default``, or with an accelerate device map the first accelerator the map uses (its
    hooks move activations between the other devices), the CPU when it uses none."""
    placed = getattr(model, "hf_device_map", None)
    if not placed:
        return default
    gpus = [d for d in placed.values() if d not in ("cpu", "disk")]
    if not gpus:
        return torch.device("cpu")
    d = gpus[0]
    return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)


_NEW_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
FRESH_MARKER = "alignti_fresh.json"  # make-student: the parts of a composed student meant to start untrained


def newly_initialised(model) -> list[str]:
    """Names of the weights (parameters, buffers) of a model from ``load_model`` that its checkpoint lacked, so
    transformers initialised them at random while loading (``from_pretrained(output_loading_info=True)``'s
    ``missing_keys`` and ``mismatched_keys``). Empty for a model loaded complete (or not by ``load_model``)."""
    return list(_NEW_WEIGHTS.get(model, ()))


def summarise_names(names: list[str], limit: int = 3) -> str:
    """Weight names for a message: grouped by the module holding them (the name less its last two parts), the first
    ``limit`` groups, then how many more."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:-2]) if len(parts) > 2 else n
        groups[key] = groups.get(key, 0) + 1
    shown = [f"{g} ({c} tensor{'s' if c > 1 else ''})" if c > 1 else g for g, c in list(groups.items())[:limit]]
    more = len(groups) - limit
    return ", ".join(shown) + (f" and {more} more module(s)" if more > 0 else "")


def fresh_parts(path: str) -> list[str]:
    """The parameter-name prefixes a model folder's ``FRESH_MARKER`` names as meant to start untrained (make-student's
    projector); empty for any other folder."""
    marker = Path(path) / FRESH_MARKER
    if not marker.is_file():
        return []
    import json
    return list(json.loads(marker.read_text()).get("fresh", []))


def check_loaded_weights(model, path: str, role: str, fresh: list[str] = ()) -> None:
    """Refuse a teacher or student whose checkpoint lacked weights that transformers then initialised at random
    (``newly_initialised``), except those under a ``fresh`` prefix (make-student's projector, ``fresh_parts``). A
    teacher in that state would write a cache from a model that never learnt those parts (a random vision tower
    never sees the image); a student would train (or, frozen, keep) them random and save them into its final/,
    after which the evidence is gone. Raises AlignTIError naming the folder, the weights and the fix."""
    new = [n for n in newly_initialised(model) if not any(n == f or n.startswith(f + ".") for f in fresh)]
    if not new:
        return
    raise AlignTIError(
        f"the {role} {path} lacks {len(new)} weight tensor(s) its architecture needs, which transformers initialised "
        f"at random when loading it: {summarise_names(new)}. A {role} with random parts "
        + ("would write a cache from a model that never learnt them" if role == "teacher" else
           "would train (or, frozen, keep) them random and save them as if trained")
        + ". Use a checkpoint that holds every weight (check its model.safetensors(.index.json) against the model's "
          "parameter names, e.g. a vision tower saved under another prefix), or convert it with the family's "
          "transformers conversion script")


def load_config(path: str):
    """The checkpoint's model config alone (no weights): its model_type and special-token ids."""
    from transformers import AutoConfig
    if not Path(path).is_dir():
        check_local_path(path)
    return AutoConfig.from_pretrained(path)


def load_vlm(path: str, device: torch.device, dtype: str = "auto", **placement):
    """(model, processor) of the checkpoint at ``path``; the processor first, so a folder without processor files
    is named before any weight loads. ``placement``: ``load_model``'s tp_size, ep_size, device_map, max_memory."""
    processor = load_processor(path)
    return load_model(path, device, dtype, **placement), processor


def text_vocab_size(config) -> int | None:
    """The language model's vocabulary size (rows of its LM head) from a checkpoint's config (``load_config``), no
    weights loaded; None when the config names none."""
    text = getattr(config, "text_config", None) or config
    size = getattr(text, "vocab_size", None)
    return int(size) if size else None


# a processor needs its tokenizer and its image processor: one file of each group must be in a local model folder
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_local_path(path: str) -> None:
    """Refuse, before transformers spends minutes retrying the hub, a model path that is meant as a local folder
    but is not one: an absolute, ``./``, ``../`` or ``~`` path, one with more than one separator, a path to a file,
    or one whose first part is a folder here (``demo/teachr`` beside ``demo/``). A hub id (``org/name``, no such
    local folder) passes. Raises ModelPathError (an AlignTIError and a FileNotFoundError) naming the path and the
    nearest folders that are there."""
    p = Path(path).expanduser()
    first = Path(path).parts[0] if Path(path).parts else ""
    local = (str(path).startswith(("/", "./", "../", "~")) or str(path).count("/") > 1 or p.exists()
             or (len(Path(path).parts) > 1 and Path(first).is_dir()) or len(Path(path).parts) == 1)
    if not local:
        return
    if p.is_file():
        raise ModelPathError(f"{path} is a file, not a model folder: give the folder holding config.json and the "
                           "weights (a save_pretrained folder)")
    parent = p.parent if str(p.parent) else Path(".")
    near = sorted(c.name for c in parent.iterdir() if c.is_dir())[:8] if parent.is_dir() else []
    raise ModelPathError(f"no model folder at {path}" + (f" ({parent} holds {', '.join(near)})" if near else
                                                       f" ({parent} does not exist either)")
                       + ": check the path (a hub id is written org/name)")


def check_processor_files(path: str) -> None:
    """A local model folder must hold its processor's files (tokenizer and image processor), not only weights;
    else the loader falls through to the hub with a network error about huggingface.co. Raises AlignTIError
    naming the folder, the missing files and how to add them. Hub ids (not a local folder) pass."""
    folder = Path(path)
    if not folder.is_dir():
        check_local_path(path)
        return
    missing = [group for group in (TOKENIZER_FILES, IMAGE_PROCESSOR_FILES)
               if not any((folder / name).is_file() for name in group)]
    if missing:
        names = " and ".join("/".join(group[:2]) for group in missing)
        raise AlignTIError(f"the model folder {folder} has no processor files (no {names}): it holds weights only. "
                           f"Copy the processor files from the checkpoint it was trained from, e.g. "
                           f"AutoProcessor.from_pretrained(ORIGINAL).save_pretrained('{folder}')")


def enable_gradient_checkpointing(model, reentrant: bool = False, every_n_layers: int = 1,
                                  reuse_casts: bool = True) -> None:
    """Checkpoint the decoder and vision layers (every ``every_n_layers``-th of each stack; 1 = all).

    Each layer goes through ``checkpoint_layer``: its recompute in backward runs under the saliency capture and
    attention routing of its forward. ``reentrant``: the forward runs without autograd (no graph, no saved-tensor
    hooks: less host work per layer), the backward re-runs it with grad; the layer where IVA captures the
    student's saliency is then left unchecked, since a reentrant checkpoint cannot return a differentiable
    side output. ``reuse_casts``: under autocast the recompute reuses the forward's
    lower-precision casts of the layer's linear weights instead of casting them again (``checkpoint_layer``).
    Every mode gives the same gradients (tests/test_step.py)."""
    fn = functools.partial(checkpoint_layer, use_reentrant=reentrant, preserve_rng_state=has_dropout(model),
                           reuse_casts=reuse_casts)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant},
                                          every_n_layers=every_n_layers)
    for module in model.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn


def has_dropout(model) -> bool:
    """Whether any dropout is live in ``model`` (a dropout module or an attention-dropout setting above 0). Only then
    must a recompute replay the forward's random state (saving and restoring it per layer costs host time)."""
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    configs = [model.config] + [getattr(model.config, k) for k in ("text_config", "vision_config")
                                if getattr(model.config, k, None) is not None]
    return any(float(getattr(c, name, 0) or 0) > 0 for c in configs
               for name in ("attention_dropout", "attention_probs_dropout_prob", "dropout", "hidden_dropout"))


def checkpoint_layer(function, *args, use_reentrant: bool = False, preserve_rng_state: bool = True,
                     reuse_casts: bool = True):
    """``_gradient_checkpointing_func`` of a transformers layer: ``function`` is ``partial(forward, layer, **kwargs)``
    and ``args`` its positional inputs (the hidden states)."""
    from torch.utils.checkpoint import checkpoint

    from .attention import captures_in, forward_context
    layer = function.args[0] if isinstance(function, functools.partial) and function.args else None
    if use_reentrant and layer is not None and captures_in(layer):
        return function(*args)
    reenter = forward_context()
    casts = _LayerCasts(layer) if reuse_casts and layer is not None else None

    def run(*a):
        with reenter():
            if casts is None:
                return function(*a)
            with casts:
                return function(*a)

    if use_reentrant:
        return checkpoint(run, *args, use_reentrant=True, preserve_rng_state=preserve_rng_state)
    # determinism_check="none": no per-saved-tensor metadata recorded for a recompute check (host work that a
    # launch-bound GPU step pays in full; the recompute runs the same ops, tests/test_step.py compares gradients)
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state, determinism_check="none")


_LINEAR_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _linear_slots(layer: torch.nn.Module) -> list:
    """(module, name) of every linear weight and bias in ``layer``, found once per layer."""
    slots = _LINEAR_SLOTS.get(layer)
    if slots is None:
        slots = [(m, n) for m in layer.modules() if isinstance(m, torch.nn.Linear)
                 for n in ("weight", "bias") if m._parameters.get(n) is not None]
        _LINEAR_SLOTS[layer] = slots
    return slots


def _is_fsdp(module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without distributed
        return False
    return isinstance(module, FSDPModule)


class _LayerCasts:
    """A checkpointed layer's linear weights in autocast's lower precision, cast once in its forward and lent to
    the layer again for its recompute in backward.

    Autocast caches the casts of fp32 weights only until its outermost region exits, which is before backward,
    and a recompute on the autograd engine's device thread clears that cache on every exit; so each recompute
    would cast every weight again (516 of the 1,892 operations a recompute added to the benchmark student's
    step, bench/README.md).
    Here the forward makes the same casts itself (``Tensor.to``, exactly what autocast runs, with the same
    ``ToCopyBackward`` to the fp32 weight), and the recompute swaps the very same tensors in. They live while the
    checkpoint does (until the layer's backward), as an unchecked layer's saved casts would. Nothing is done
    outside autocast, for weights not in fp32 (a bf16 model, FSDP's mixed precision) or for sharded ones."""

    __slots__ = ("layer", "tensors", "swapped")

    def __init__(self, layer):
        self.layer, self.tensors, self.swapped = layer, None, []

    def __enter__(self):
        if self.tensors is None:  # the forward: cast now, if autocast would
            self.tensors = self._cast()
        for (m, n), t in zip(_linear_slots(self.layer), self.tensors):
            if t is not None:
                self.swapped.append((m, n, m._parameters[n]))
                m._parameters[n] = t  # a plain tensor in the slot: Linear.forward reads it as its weight
        return self

    def __exit__(self, *exc):
        for m, n, p in reversed(self.swapped):
            m._parameters[n] = p
        self.swapped.clear()
        return False

    def _cast(self) -> list:
        slots = _linear_slots(self.layer)
        if not slots:
            return []
        device = slots[0][0]._parameters[slots[0][1]].device.type
        if not torch.is_autocast_enabled(device) or _is_fsdp(self.layer):
            return [None] * len(slots)
        dtype = torch.get_autocast_dtype(device)
        out = []
        # a reentrant checkpoint's forward runs without grad: the casts still get their ToCopyBackward, for the
        # recompute's graph to reach the fp32 weights through them
        with torch.enable_grad():
            for m, n in slots:
                p = m._parameters[n]
                plain = type(p) in (torch.nn.Parameter, torch.Tensor)  # not a DTensor (FSDP) or other subclass
                out.append(p.to(dtype) if plain and p.dtype == torch.float32 and p.device.type == device else None)
        return out


def image_only_processor_class(base):
    """A family's processor without its video processor. Qwen2-VL's processor insists on a video
    processor, which needs torchvision; image-text distillation never uses it. Its other parts stay (Gemma 4's
    audio feature extractor: the saved processor keeps the audio half, which a distillation run leaves alone).

    The class keeps the family's name (so save_pretrained records the family's processor class) and is
    registered in this module under a unique qualified name, so DataLoader workers can pickle it."""
    qualname = f"ImageOnly_{base.__name__}"
    cls = globals().get(qualname)
    if cls is None:
        import inspect

        from transformers.processing_utils import ProcessorMixin
        sig = inspect.signature(base.__init__)
        takes_video = "video_processor" in sig.parameters

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            if takes_video:
                kwargs.setdefault("video_processor", None)
            base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                          **kwargs)

        def apply_chat_template(self, conversation, chat_template=None, **kwargs):
            """ProcessorMixin's rendering: a family's own override adds video settings only (SmolVLM's frame count
            and rate, read from its video processor), which an image-only processor has none of."""
            return ProcessorMixin.apply_chat_template(self, conversation, chat_template, **kwargs)

        # save_pretrained writes the settings named in __init__'s signature (num_image_tokens, patch_size...):
        # show it the family's own, without the video processor
        __init__.__signature__ = sig.replace(parameters=[p for n, p in sig.parameters.items()
                                                         if n != "video_processor"])
        parts = [a for a in base.get_attributes() if a != "video_processor"]
        # between the family's processor and ProcessorMixin: drops the video_processor=None that a family's own
        # __init__ hands on by keyword (Gemma 4; Qwen-VL's and SmolVLM's hand it on by position, past the attributes)
        def _no_video_init(self, *args, video_processor=None, **kwargs):
            ProcessorMixin.__init__(self, *args, **kwargs)
        drop_video = type(f"NoVideo_{base.__name__}", (ProcessorMixin,), {"__init__": _no_video_init,
                                                                         "__module__": __name__})
        cls = type(base.__name__, (base, drop_video), {"__init__": __init__,
                                                       "apply_chat_template": apply_chat_template,
                                                       "get_attributes": classmethod(lambda c: list(parts)),
                                                       "__module__": __name__, "__qualname__": qualname})
        globals()[qualname] = cls
    return cls


# processors that transformers marks as needing torchvision only because their module imports a helper from the
# family's torchvision image processor, whose PIL image processor holds the same function (same code): the processor
# class -> (its module, the torchvision image-processing module it imports, the PIL module standing in for it)
PIL_STAND_INS = {
    "PixtralProcessor": ("transformers.models.pixtral.processing_pixtral",
                         "transformers.models.pixtral.image_processing_pixtral",
                         "transformers.models.pixtral.image_processing_pil_pixtral"),
}


def _torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available
    return bool(is_torchvision_available())


def processor_class(name: str):
    """transformers' processor class ``name`` (e.g. ``PixtralProcessor``, Mistral 3's).

    Without torchvision (alignti's main environment: image-text distillation runs the PIL image processors),
    transformers offers only a stand-in that raises for ``PixtralProcessor``: its module imports
    ``get_resize_output_image_size`` from the torchvision image processor, which it uses to count image tokens
    (``_get_num_multimodal_tokens``). Here the library's own module is loaded with that import served by the PIL image
    processor's module, whose function of that name is the same code (``PIL_STAND_INS``); the class is transformers'
    unmodified. With torchvision installed, or for any other name, ``getattr(transformers, name)``."""
    import importlib
    import sys

    import transformers
    if name not in PIL_STAND_INS or _torchvision_available():
        return getattr(transformers, name)
    module, torchvision_module, pil_module = PIL_STAND_INS[name]
    loaded = sys.modules.get(module)
    if loaded is None or not isinstance(getattr(loaded, name, None), type):
        saved = sys.modules.get(torchvision_module)
        sys.modules[torchvision_module] = importlib.import_module(pil_module)
        try:
            loaded = importlib.import_module(module)
        finally:
            if saved is None:
                sys.modules.pop(torchvision_module, None)
            else:
                sys.modules[torchvision_module] = saved
    return getattr(loaded, name)


def load_processor(path: str):
    """The checkpoint's processor (``AutoProcessor``); where transformers needs torchvision for a part alignti does
    not use, the family's processor without its video processor (``image_only_processor_class``) or the library's own
    processor class loaded without torchvision (``processor_class``)."""
    from transformers import AutoProcessor

    check_processor_files(path)
    try:
        proc = AutoProcessor.from_pretrained(path)
    except ImportError as e:
        name = _saved_processor_class(path)
        proc = (processor_class(name).from_pretrained(path) if name in PIL_STAND_INS
                else _image_only_processor(path, e))
    except (AttributeError, ValueError, OSError) as e:
        proc = _image_only_processor(path, e)
    check_processor(proc, path)
    return proc


def torchvision_needed(what: str) -> str:
    """The message for ``what`` (a family, a checkpoint) whose image processor needs torchvision where it is not
    installed: the pip command pinning the torchvision release built for the installed torch (torchvision 0.N+15 for
    torch 2.N; a plain ``pip install torchvision`` would replace torch)."""
    minor = int(torch.__version__.split(".")[1])
    return (f"{what}'s image processor needs torchvision, which is not installed (transformers' has no PIL backend "
            f"for it): pip install 'torchvision==0.{minor + 15}.*' (the release matching torch "
            f"{torch.__version__.split('+')[0]})")


def _saved_processor_class(path: str) -> str | None:
    """The ``processor_class`` named in the folder's processor_config.json (None where it names none)."""
    import json
    try:
        if Path(path).is_dir():
            cfg = Path(path) / "processor_config.json"
        else:
            from transformers.utils import cached_file
            cfg = Path(cached_file(path, "processor_config.json"))
        return json.loads(cfg.read_text()).get("processor_class")
    except (OSError, ValueError, TypeError):
        return None


def _image_only_processor(path: str, e: Exception):
    """The family's processor without its video processor, where AutoProcessor failed on the video part (``e``,
    raised again for any other failure; AlignTIError naming the fix where it failed on a missing torchvision)."""
    import importlib.util
    import json

    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    config = AutoConfig.from_pretrained(path)
    cls = PROCESSOR_MAPPING.get(type(config), None)
    if "torchvision" in str(e) and importlib.util.find_spec("torchvision") is None:
        raise AlignTIError(f"{path}: " + torchvision_needed(f"the {config.model_type} checkpoint")) from e
    if cls is None or "video" not in str(e).lower():
        raise e
    tok = AutoTokenizer.from_pretrained(path)
    image_only = image_only_processor_class(cls)
    extra = {}
    if "feature_extractor" in image_only.get_attributes():  # Gemma 4's audio half, kept as saved
        from transformers import AutoFeatureExtractor
        extra["feature_extractor"] = AutoFeatureExtractor.from_pretrained(path)
    proc = image_only(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=tok,
                      chat_template=getattr(tok, "chat_template", None), **extra,
                      **_saved_processor_settings(path, cls))
    if proc.chat_template is None:
        tmpl = Path(path) / "chat_template.jinja"
        if tmpl.exists():
            proc.chat_template = tmpl.read_text()
        elif (Path(path) / "chat_template.json").exists():
            proc.chat_template = json.loads((Path(path) / "chat_template.json").read_text())["chat_template"]
    return proc


# settings a family's processor needs to expand its image placeholder into the right number of image tokens
REQUIRED_PROCESSOR_SETTINGS = {
    "LlavaProcessor": ("patch_size", "vision_feature_select_strategy"),
    "LlavaNextProcessor": ("patch_size", "vision_feature_select_strategy"),
    "LlavaOnevisionProcessor": ("num_image_tokens", "vision_feature_select_strategy"),
}


def check_processor(proc, path: str) -> None:
    """A processor that reloads without what it needs gets a clear error naming the setting, not a traceback
    from inside its image-token expansion."""
    missing = [k for k in REQUIRED_PROCESSOR_SETTINGS.get(type(proc).__name__, ()) if getattr(proc, k, None) is None]
    if missing:
        raise AlignTIError(f"the processor saved at {path} ({type(proc).__name__}) lacks {', '.join(missing)}, which it "
                           f"needs to turn an image into the model's image tokens. Add "
                           f"{', '.join(repr(m) for m in missing)} to {path}/processor_config.json (the values the "
                           f"model was trained with, e.g. num_image_tokens 729 for SigLIP-384/14, "
                           f"vision_feature_select_strategy 'full'), or save the processor with save_pretrained again.")


def _saved_processor_settings(path: str, cls) -> dict:
    """The family processor's own settings from processor_config.json (num_image_tokens, patch_size...)."""
    import inspect
    import json
    from pathlib import Path
    try:
        if Path(path).is_dir():
            cfg = Path(path) / "processor_config.json"
        else:
            from transformers.utils import cached_file
            cfg = Path(cached_file(path, "processor_config.json"))
        saved = json.loads(cfg.read_text())
    except (OSError, ValueError, TypeError):
        return {}
    params = inspect.signature(cls.__init__).parameters
    skip = ("self", "image_processor", "tokenizer", "video_processor", "chat_template", "feature_extractor")
    return {k: v for k, v in saved.items() if k in params and k not in skip}


def __getattr__(name: str):
    """Recreate image-only processor classes on demand (a spawned worker unpickling one)."""
    if name.startswith("ImageOnly_"):
        import transformers
        return image_only_processor_class(getattr(transformers, name[len("ImageOnly_"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
