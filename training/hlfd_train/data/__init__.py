"""Training data: dataset layouts, label sets, the prepared cache and torch datasets.

cases = discover(root)                       # KiTS19/21/23, LiTS, MSD, nnU-Net, NIfTI folder
out = prepare(root, "cache", task="kidney")  # validate + resample like the runtime, split
data = PreparedData(out)
train = SliceDataset(data, "train", crop=(160, 160), augment={"flip": 0.5})
"""

from .augment import make_augment
from .datasets import PreparedData, SliceDataset, VolumeDataset, context_crop
from .labels import (
    CYST_OPTIONS,
    LABELSETS,
    LAYOUT_LABELS,
    DataError,
    label_map,
    lookup_table,
    role_of,
    target_labels,
    tumour_value,
)
from .layouts import (
    LAYOUTS,
    Case,
    detect_layout,
    discover,
    grid_mismatch,
    load_case,
    source_labels,
)
from .prepare import (
    FORMAT_VERSION,
    default_preprocessing,
    make_splits,
    prepare,
    prepare_case,
)

__all__ = [
    "CYST_OPTIONS",
    "FORMAT_VERSION",
    "LABELSETS",
    "LAYOUTS",
    "LAYOUT_LABELS",
    "Case",
    "DataError",
    "PreparedData",
    "SliceDataset",
    "VolumeDataset",
    "context_crop",
    "default_preprocessing",
    "detect_layout",
    "discover",
    "grid_mismatch",
    "label_map",
    "load_case",
    "lookup_table",
    "make_augment",
    "make_splits",
    "prepare",
    "prepare_case",
    "role_of",
    "source_labels",
    "target_labels",
    "tumour_value",
]
