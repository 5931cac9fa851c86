"""Loading a VLM checkpoint (local path or hub id) with its processor."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_vlm(path: str, device: torch.device, dtype: str = "auto"):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device), processor
