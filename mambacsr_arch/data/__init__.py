"""Datasets and the CSR degradation; importing registers them in BasicSR's DATASET_REGISTRY."""
