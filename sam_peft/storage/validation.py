"""Validation of sparse entries and dense tensors read from files, and the index dtype of the format."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaFileError
from .keys import is_delta_key


def index_dtype(numel: int) -> torch.dtype:
    """int32 for tensors with fewer than 2**31 entries, int64 otherwise."""
    return torch.int32 if numel < 2**31 else torch.int64


def check_dense_tensors(model: nn.Module, state_dict: dict) -> None:
    """Refuse dense adapter tensors (the modules_to_save head) of the wrong shape or dtype, or non-finite."""
    expected = model.state_dict()
    for key, tensor in state_dict.items():
        if is_delta_key(key) or key not in expected:
            continue
        target = expected[key]
        if tensor.shape != target.shape:
            raise DeltaFileError(f"'{key}' has shape {list(tensor.shape)} in the adapter file but "
                                 f"{list(target.shape)} in the model; the head belongs to another task or model.")
        if target.dtype.is_floating_point and not tensor.dtype.is_floating_point:
            raise DeltaFileError(f"'{key}' is stored as {tensor.dtype} in the adapter file, not a float; the file "
                                 "is corrupted.")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise DeltaFileError(f"'{key}' in the adapter file contains NaN or infinity; the head is broken.")


def check_entries(name: str, indices: torch.Tensor, values: torch.Tensor, numel: int) -> None:
    """Refuse malformed (indices, values) of one tensor with a `DeltaFileError` naming it."""
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1:
        raise DeltaFileError(f"indices of '{name}' must be a 1-D int32/int64 tensor, got {indices.dtype} "
                             f"with shape {list(indices.shape)}; the file is corrupted.")
    if not values.dtype.is_floating_point or values.dim() != 1:
        raise DeltaFileError(f"values of '{name}' must be a 1-D float tensor, got {values.dtype} "
                             f"with shape {list(values.shape)}; the file is corrupted.")
    if values.numel() != indices.numel():
        raise DeltaFileError(f"'{name}' has {indices.numel()} indices but {values.numel()} values; "
                             "the file is corrupted.")
    if indices.numel():
        if int(indices.min()) < 0 or int(indices.max()) >= numel:
            raise DeltaFileError(f"indices of '{name}' fall outside [0, {numel}); the delta belongs to "
                                 "another model or the file is corrupted.")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise DeltaFileError(f"indices of '{name}' are not strictly increasing (unsorted or duplicated); "
                                 "the file is corrupted.")
        if not bool(torch.isfinite(values).all()):
            raise DeltaFileError(f"values of '{name}' contain NaN or infinity; the delta is broken.")
