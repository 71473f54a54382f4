"""vapt_kernels: Visual Adaptive Prompt Tuning for timm Vision Transformers, exact and fast.

Quick start::

    import timm, vapt_kernels as vk
    model = timm.create_model("vit_base_patch16_224", num_classes=100)
    model = vk.apply_vapt(model, vk.VAPTConfig(num_prompts=10))   # in place; backbone frozen
"""

from ._version import __version__
from .checkpoint import count_parameters, load_official_checkpoint, load_trainable_state_dict, trainable_state_dict
from .config import VAPTConfig
from .multitask import MultiTaskVAPT
from .ops import available_backends
from .pretrained import from_pretrained, save_pretrained
from .timm import apply_vapt, apply_vpt, set_backend

__all__ = [
    "VAPTConfig",
    "apply_vapt",
    "apply_vpt",
    "set_backend",
    "available_backends",
    "load_official_checkpoint",
    "trainable_state_dict",
    "load_trainable_state_dict",
    "count_parameters",
    "save_pretrained",
    "from_pretrained",
    "MultiTaskVAPT",
]
