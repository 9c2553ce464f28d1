"""sam-peft: sparse fine-tuning with data-driven parameter selection (SAM, Fu et al. 2023) as a peft method.

`import sam_peft` registers the method with peft; then `peft.get_peft_model(model, sam_peft.SAMConfig())`.
"""

from .bottleneck import BottleneckConfig, BottleneckModel
from .burnin import select_parameters
from .callbacks import SAMCallback
from .config import SAMConfig, SparseDiffConfig
from .delta import SparseDelta
from .errors import (
    BaseModelMismatchError,
    ConfigError,
    DeltaFileError,
    NotSelectedError,
    SamPeftError,
    SelectionError,
)
from .model import SparseDiffModel
from .packing import pack_parameters
from .registration import PEFT_TYPE, register
from .report import SelectionReport
from .selection import selected_indices

register()

__version__ = "0.1.0"

__all__ = [
    "PEFT_TYPE",
    "BaseModelMismatchError",
    "BottleneckConfig",
    "BottleneckModel",
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
    "pack_parameters",
    "select_parameters",
    "selected_indices",
]
