"""The identity of a base model (architecture, parameter names and shapes, a fingerprint of its weights) and the
adapter format version: what every sam-peft file records about the base it belongs to."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BaseModelMismatchError

logger = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 4096
FORMAT_VERSION = 2  # file format written by this sam-peft (2: encoded entries; 1 still loads); newer is refused
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

    It goes in the safetensors header of adapter files and `SparseDelta` files alike. (Format 1 also repeated the
    config's `counts` there; in format 2 each values tensor's shape in the header gives its count.)
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
        # only for a quantized base: the headers of float-base files are unchanged
        **({"base_quantization": json.dumps(get("base_quantization"), sort_keys=True)}
           if get("base_quantization") else {}),
    }


@dataclass(frozen=True)
class BaseIdentity:
    """What a delta records about its base: the architecture (class name), a digest of the targeted parameters'
    names and shapes, and a fingerprint of their weights; None where unknown."""

    architecture: str | None = None
    shapes_digest: str | None = None
    fingerprint: str | None = None

    @classmethod
    def recorded_in(cls, source: Any) -> BaseIdentity:
        """The identity in an adapter config (object or dict) or a file's metadata (empty strings are unknown)."""
        get = source.get if isinstance(source, Mapping) else lambda key: getattr(source, key, None)
        return cls(get("base_architecture") or None, get("base_shapes_digest") or None,
                   get("base_fingerprint") or None)


def check_same_base(recorded: BaseIdentity, architecture: str, fingerprint: Callable[[], str | None], what: str, *,
                    shapes: str | None = None, verify_fingerprint: bool = True) -> None:
    """Refuse a delta recorded on another base, with one rule for adapters and `SparseDelta` files alike.

    Another architecture or other parameter names and shapes are always refused (`shapes`: the digest of the
    model's targeted names and shapes, compared with the recorded one; None when the caller has compared every
    shape itself). Other weights (`fingerprint()`, computed only when needed; None: not comparable, e.g. on the
    meta device) are refused unless `verify_fingerprint` is False or SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH=1, which
    applies the delta with a warning, and only where the shapes are known to match.
    """
    if recorded.architecture and recorded.architecture != architecture:
        raise BaseModelMismatchError(f"{what} was recorded on a {recorded.architecture}, but the model is a "
                                     f"{architecture}; load it on the base model it was trained on.")
    if recorded.shapes_digest and shapes is not None and recorded.shapes_digest != shapes:
        raise BaseModelMismatchError(
            f"{what} was recorded on base parameters of other names or shapes than this model's (a different model "
            "size or configuration); load it on the base model it was trained on."
        )
    if not (verify_fingerprint and recorded.fingerprint):
        return
    actual = fingerprint()
    if actual is None or actual == recorded.fingerprint:
        return
    message = (f"{what} was recorded on base weights with fingerprint {recorded.fingerprint}, but this model's "
               f"targeted weights have fingerprint {actual}: it is not the same checkpoint. Load the base it was "
               f"trained on, or set {ALLOW_MISMATCH_ENV}=1 to apply it anyway (shapes must still match).")
    if os.environ.get(ALLOW_MISMATCH_ENV) != "1":
        raise BaseModelMismatchError(message)
    if shapes is not None and not recorded.shapes_digest:
        raise BaseModelMismatchError(f"{what} records no digest of its base's parameter shapes, so they cannot be "
                                     f"checked; {ALLOW_MISMATCH_ENV} is not honoured without it. Re-save it with "
                                     "this sam-peft.")
    logger.warning(message)
