"""The identity of a base model: architecture, parameter names and shapes, and a fingerprint of its weights."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

SAMPLES_PER_TENSOR = 4096


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
