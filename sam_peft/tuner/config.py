"""Configuration of the sparse-delta tuner: ``SparseDiffConfig`` and its SAM preset ``SAMConfig``."""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..errors import ConfigError, NotSelectedError
from ..ranking.budget import ALLOCATIONS
from ..ranking.signals import DATA_FREE_SELECTIONS, SELECTIONS, signal_named
from ..storage.encoding import (
    ADAPTER_KEYS,
    check_values_dtype,
    decode_tensors,
    encode_tensors,
    encoding_metadata,
)
from ..storage.identity import FORMAT_VERSION, identity_metadata
from ..storage.io import load_safetensors_checked, reseal_safetensors, write_text_atomic
from .peft_type import PEFT_TYPE

logger = logging.getLogger(__name__)


# The task heads peft trains densely (`modules_to_save`) for these task types. peft adds SEQ_CLS's before the adapter
# is injected, but these only after: the config names them from the start, so default targets leave them out.
TASK_HEADS = {"TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class SparseDiffConfig(PeftConfig):
    """Configuration of a sparse fine-tuning adapter: a sparse delta (indices + values) per targeted tensor.

    Args:
        sparsity (`float`): The fraction p of the targeted parameters that are tuned, in (0, 1]
            (0.005 = 0.5 %, the paper's p). Note: peft's Supertuning uses the opposite convention
            (its 0.995 is our 0.005); values above 0.5 log a warning.
        selection (`str`): How entries are chosen: "sam" ((Σ g)², burn-in), "fisher" (Σ g², burn-in),
            "sam_hessian" (g²/ĥ with a Hutchinson Hessian diagonal, burn-in), or the data-free
            "magnitude" (|θ0|), "random" (seeded) and "bitfit" (every bias, no budget). Data-free
            selections are made when the adapter is created; the others by `sam_peft.select_parameters`.
        allocation (`str`): "per_tensor" keeps floor(p·numel) entries of each tensor (the paper's code);
            "global" keeps floor(p·N) entries over all N targeted parameters (the paper's Theorem 3).
        target_modules (`list[str] | str | None`): Modules whose own parameters are tuned. None (default):
            every module of the base model that owns parameters (embeddings, attention, FFN, LayerNorm,
            biases), except `modules_to_save` (the task head, trained densely) and the output embeddings
            (`get_output_embeddings()`, e.g. `lm_head`, tied or not), whose weight trainers such as TRL read
            directly; name them here to tune them anyway.
        exclude_modules (`list[str] | str | None`): Modules never tuned (names or a regex).
        modules_to_save (`list[str] | None`): Modules trained densely and saved (e.g. the classifier head).
            For task types SEQ_CLS, TOKEN_CLS ("classifier", "score") and QUESTION_ANS ("qa_outputs") the head is
            added automatically.
        init_weights (`bool`): True: delta values start at zero (the model equals the base). False:
            small random values (for tests only).
        seed (`int`): Seed of the "random" selection and of non-zero initialisation.
        counts (`dict[str, int] | None`): Entries per base parameter name, filled when the entries are
            selected and used to rebuild exact shapes on load. Not set by hand.
        base_fingerprint (`str | None`): Fingerprint of the base weights the delta was recorded on.
        base_shapes_digest (`str | None`): Digest of the targeted parameters' names and shapes.
        base_architecture (`str | None`): Class name of the base model.
        base_quantization (`dict | None`): The quantization of the targeted base weights (method, settings and the
            parameters they apply to), recorded when the base is quantized; the unquantized base is then accepted
            where quantizing it this way gives the recorded fingerprint.
        format_version (`int`): Version of the adapter format; newer unknown versions are refused.
        combined_from (`dict | None`): Set by `add_weighted_adapter`: the adapters, weights and combination
            (type, density, sign method, seed) the adapter was built from. Not set by hand.
        values_dtype (`str`): How `save_pretrained` stores the delta values: "float32" (default, exact),
            "bfloat16" or "float16" (half the bytes, rounded; loaded back as float32). Training is unaffected.
    """

    sparsity: float = field(
        default=0.005,
        metadata={"help": "Fraction of targeted parameters tuned (0.005 = 0.5 %). Opposite of Supertuning."},
    )
    selection: str = field(
        default="magnitude", metadata={"help": f"Entry selection signal, one of {', '.join(SELECTIONS)}."}
    )
    allocation: str = field(
        default="per_tensor", metadata={"help": "'per_tensor' (floor(p*numel) per tensor) or 'global'."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules whose own parameters are tuned; None = every parameter except the heads."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never tuned (list of names or a regex)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained densely and saved, e.g. the classifier head."}
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the delta values (False: random, for tests)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the random selection and random init."})
    counts: dict[str, int] | None = field(
        default=None, metadata={"help": "Selected entries per base parameter (filled by the selection)."}
    )
    base_fingerprint: str | None = field(
        default=None, metadata={"help": "Fingerprint of the base weights the delta belongs to."}
    )
    base_shapes_digest: str | None = field(
        default=None, metadata={"help": "Digest of the names and shapes of the targeted base parameters."}
    )
    base_architecture: str | None = field(
        default=None, metadata={"help": "Class name of the base model the delta belongs to."}
    )
    base_quantization: dict | None = field(
        default=None, metadata={"help": "How the targeted base weights were quantized (None: a float base); see "
                                        "docs/quantized.md."}
    )
    format_version: int = field(default=FORMAT_VERSION, metadata={"help": "sam-peft adapter format version."})
    combined_from: dict | None = field(
        default=None, metadata={"help": "For an adapter built by add_weighted_adapter: its sources and method."}
    )
    values_dtype: str = field(
        default="float32",
        metadata={"help": "dtype of the values in saved files: float32 (exact), bfloat16 or float16 (rounded)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate()
        heads = [name for name in TASK_HEADS.get(self.task_type, ()) if name not in (self.modules_to_save or ())]
        if heads:  # peft adds these only after wrapping, when a default target would already hold the head
            self.modules_to_save = [*(self.modules_to_save or ()), *heads]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def _validate(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r} must be an integer.")
        p = self.sparsity
        check_sparsity(p)
        if p > 0.5:
            hint = f"did you mean {round(1 - p, 6)}?" if p < 1 else "did you mean a small fraction such as 0.005?"
            logger.warning(
                "sparsity=%s tunes %.0f %% of the targeted parameters. sam-peft's sparsity is the fraction "
                "tuned (peft's Supertuning uses the opposite convention); %s", p, 100 * p, hint,
            )
        signal_named(self.selection)
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation={self.allocation!r} is unknown; choose one of {list(ALLOCATIONS)}.")
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise ConfigError(f"adapter format_version={self.format_version!r} must be an integer; the "
                              "adapter_config.json is corrupted.")
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"adapter format_version={self.format_version!r} is newer than this sam-peft understands "
                f"(≤ {FORMAT_VERSION}); upgrade sam-peft to load it."
            )
        check_values_dtype(self.values_dtype)
        if self.counts is not None:
            bad = {k: v for k, v in self.counts.items() if not isinstance(v, int) or v < 0}
            if bad:
                raise ConfigError(f"counts must be non-negative integers; got {bad}. Re-save the adapter.")

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write `adapter_config.json` atomically (same content as peft's writer).

        peft calls this right after writing the adapter's weights into the same directory; the weights file is
        then re-written atomically in format 2 (each tensor's indices and values as one encoded record, the values
        as `values_dtype`) with the base identity, the encoding and checksums in its header.
        """
        if os.path.isfile(save_directory):
            raise ConfigError(f"{save_directory} is a file; save_pretrained needs a directory path.")
        output = self.to_dict()
        output["format_version"] = FORMAT_VERSION  # what is written now, also for an adapter loaded from format 1
        auto_mapping = kwargs.pop("auto_mapping_dict", None)
        if auto_mapping is not None:
            output["auto_mapping"] = auto_mapping
        weights = os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            reseal_safetensors(weights, {**identity_metadata(self), **encoding_metadata(self.values_dtype)},
                               transform=lambda tensors: encode_tensors(decode_tensors(tensors, ADAPTER_KEYS)[0],
                                                                        ADAPTER_KEYS, self.values_dtype))
        write_text_atomic(os.path.join(save_directory, CONFIG_NAME), json.dumps(output, indent=2, sort_keys=True))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """peft's loader, plus: a local weights file beside the config must match the checksums it was written with."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
        if os.path.isfile(weights):
            load_safetensors_checked(weights)
        return config

    @property
    def is_data_free(self) -> bool:
        """Whether the selection needs no data (it is made when the adapter is created)."""
        return self.selection in DATA_FREE_SELECTIONS

    @property
    def is_selected(self) -> bool:
        """Whether the entries are chosen (until then the layers hold placeholders sized by the budget)."""
        return self.counts is not None

    def require_selected(self, adapter_name: str, before: str) -> None:
        """Raise `NotSelectedError` for a data-driven adapter whose entries are still placeholders."""
        if self.is_selected or self.is_data_free:
            return
        raise NotSelectedError(
            f"adapter '{adapter_name}' uses selection='{self.selection}' and has not been selected: its entries are "
            "placeholder entries. Run sam_peft.select_parameters(model, dataloader), or train with "
            f"callbacks=[sam_peft.SAMCallback()] selecting this adapter, before {before}."
        )

    def to_dict(self) -> dict:
        """Serialisable dict (sets become sorted lists so the JSON file is stable)."""
        out = super().to_dict()
        for key in ("target_modules", "exclude_modules"):
            if isinstance(out.get(key), set):
                out[key] = sorted(out[key])
        return out


def check_sparsity(p) -> None:
    """Raise `ConfigError` unless `p`, the fraction of parameters tuned, is a number in (0, 1]."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 < p <= 1.0:
        raise ConfigError(
            f"sparsity={p!r} is invalid: it is the fraction of parameters tuned and must be in (0, 1], "
            "e.g. 0.005 for 0.5 %."
        )


@dataclass
class SAMConfig(SparseDiffConfig):
    """The SAM preset (Fu et al., AAAI 2023): p = 0.5 %, entries chosen by (Σ_t g_t)² over a burn-in at θ0.

    Same fields as [`SparseDiffConfig`]; only the defaults differ: `selection="sam"`, `sparsity=0.005`,
    `allocation="per_tensor"` (as the paper's code). Call `sam_peft.select_parameters` (or use
    `sam_peft.SAMCallback` with a Trainer) before training.
    """

    selection: str = field(default="sam", metadata={"help": "Entry selection signal (SAM preset: 'sam')."})
