"""The identity of a base model (architecture, parameter names and shapes, a fingerprint of its weights) and the
adapter format version: what every sam-peft file records about the base it belongs to."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SAMPLES_PER_TENSOR = 4096
FORMAT_VERSION = 1  # adapter format written by this sam-peft; newer versions are refused on load
# Set SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH=1 to load a delta on a base whose weights differ (shapes must match).
ALLOW_MISMATCH_ENV = "SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH"


def _tensor_sample(tensor: torch.Tensor) -> bytes:
    """Up to SAMPLES_PER_TENSOR evenly spaced entries of `tensor`, rounded to bfloat16, as bytes.

    The rounding makes a checkpoint and its bf16 cast (and nearly always its fp16 cast) share a fingerprint.
    """
    flat = tensor.detach().reshape(-1)
    if flat.numel() > SAMPLES_PER_TENSOR:
        step = flat.numel() // SAMPLES_PER_TENSOR
        flat = flat[::step][:SAMPLES_PER_TENSOR]
    sample = flat.to(device="cpu", dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    return sample.contiguous().numpy().tobytes()


def weights_fingerprint(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, shapes and a strided sample of every tensor: O(#tensors), not O(N).

    It tells different pretrained checkpoints (or a base with a delta merged in) apart; it is not a
    cryptographic proof that every weight is identical.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name]
        digest.update(name.encode())
        digest.update(json.dumps(list(tensor.shape)).encode())
        digest.update(_tensor_sample(tensor))
    return digest.hexdigest()[:32]


def shapes_digest(shapes: dict[str, list[int]]) -> str:
    """A short digest of parameter names and shapes."""
    return hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:32]


def architecture_of(model: nn.Module) -> str:
    """The class name of a (transformers) model."""
    return type(model).__name__


def identity_metadata(config: Any) -> dict[str, str]:
    """String metadata of an adapter config (object or JSON dict): the base identity and the selection settings.

    It goes in the safetensors header of adapter files and `SparseDelta` files alike.
    """
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    return {
        "sam_peft_format": str(FORMAT_VERSION),
        "base_architecture": get("base_architecture") or "",
        "base_fingerprint": get("base_fingerprint") or "",
        "base_shapes_digest": get("base_shapes_digest") or "",
        "selection": str(get("selection") or ""),
        "allocation": str(get("allocation") or ""),
        "sparsity": repr(get("sparsity")),
        "counts": json.dumps(get("counts") or {}, sort_keys=True),
    }
