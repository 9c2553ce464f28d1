"""The state-dict keys of sam-peft adapters: `<module>.sparsediff_<indices|values>.<adapter>.<parameter>` in a
model, with the adapter name left out in a saved file (peft's convention)."""

from __future__ import annotations

METHOD_NAME = "sparsediff"
PREFIX = METHOD_NAME + "_"  # peft's prefix of the method's parameters and buffers
INDICES = PREFIX + "indices"  # the layer attribute holding each adapter's sorted flat indices
VALUES = PREFIX + "values"  # the layer attribute holding each adapter's trainable values
_MARKER = f".{PREFIX}"


def delta_key(module: str, kind: str, adapter_name: str, attr: str) -> str:
    """The key of one parameter's `kind` ("indices" or "values") tensor of an adapter in a model's state dict."""
    return f"{module}.{PREFIX}{kind}.{adapter_name}.{attr}"


def is_delta_key(key: str) -> bool:
    """Whether a state-dict key holds sparse-delta indices or values (not a dense tensor such as the head)."""
    return _MARKER in key


def holds_delta(keys) -> bool:
    """Whether a state dict with these keys is a sam-peft adapter's (it has indices tensors)."""
    marker = f".{INDICES}."
    return any(marker in key for key in keys)


def split_saved_key(key: str) -> tuple[str, str, str] | None:
    """(module, kind, parameter) of a saved file's delta key `<module>.sparsediff_<kind>.<parameter>`, else None."""
    for kind in ("indices", "values"):
        marker = f".{PREFIX}{kind}."
        if marker in key:
            module, attr = key.split(marker)
            return module, kind, attr
    return None
