"""Datasets and the CSR degradation; importing registers them in BasicSR's DATASET_REGISTRY.

Importing changes nothing in BasicSR itself: the pairing, shared-LMDB and start-up checks reach
BasicSR's own datasets only through the CLI (:func:`mambacsr_arch.cli.runtime.patch_datasets`).
"""
from .checks import DatasetCheckError, check_dataset  # noqa: F401
from .degradations import bicubic_downsample, degrade_csr, jpeg_round_trip, mod_crop  # noqa: F401
from .image_io import ImageFolderError, ImageReadError, list_image_files, read_image_bgr8  # noqa: F401
from .jpeg_degraded_dataset import JPEGDegradedPairedDataset  # noqa: F401
from .pairing import PairingError, paired_paths_from_folder, paired_paths_from_meta_info_file  # noqa: F401
from .shared_lmdb import SharedLmdbBackend, open_shared_env  # noqa: F401
