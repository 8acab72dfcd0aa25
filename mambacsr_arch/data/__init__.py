"""Datasets and the CSR degradation; importing registers them in BasicSR's DATASET_REGISTRY."""
from .degradations import bicubic_downsample, degrade_csr, jpeg_round_trip, mod_crop  # noqa: F401
from .image_io import ImageReadError, list_image_files, read_image_bgr8  # noqa: F401
from .jpeg_degraded_dataset import JPEGDegradedPairedDataset  # noqa: F401
