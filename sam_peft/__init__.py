"""sam-peft: sparse fine-tuning with data-driven parameter selection (SAM, Fu et al. 2023) as a peft method.

`import sam_peft` registers the sparse-delta method with peft (and nothing else); then
`peft.get_peft_model(model, sam_peft.SAMConfig())`.
"""

from .burnin.callback import SAMCallback
from .burnin.report import SelectionReport
from .burnin.select import select_parameters
from .deltas.delta import SparseDelta
from .deltas.hotswap import hotswap_adapter, reserve_capacity
from .deltas.packing import pack_parameters
from .errors import (
    BaseModelMismatchError,
    ConfigError,
    DeltaFileError,
    NotSelectedError,
    SamPeftError,
    SelectionError,
)
from .tuner import PEFT_TYPE, SAMConfig, SparseDiffConfig, SparseDiffModel, register
from .tuner.targets import selected_indices

__version__ = "0.1.0"

__all__ = [
    "PEFT_TYPE",
    "BaseModelMismatchError",
    "ConfigError",
    "DeltaFileError",
    "NotSelectedError",
    "SAMCallback",
    "SAMConfig",
    "SamPeftError",
    "SelectionReport",
    "SelectionError",
    "SparseDiffConfig",
    "SparseDelta",
    "SparseDiffModel",
    "hotswap_adapter",
    "pack_parameters",
    "register",
    "reserve_capacity",
    "select_parameters",
    "selected_indices",
]
