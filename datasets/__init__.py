"""Registered datasets: importing this package fills `fewclip.registry.DATASETS`."""

from datasets import csv_dataset, image_folder, synthetic  # noqa: F401
