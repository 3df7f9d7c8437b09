"""Registered datasets: importing this package fills `fewclip.registry.DATASETS`."""

from datasets import (  # noqa: F401
    breakhis,
    cervical_oct,
    chaoyang,
    cric,
    csv_dataset,
    herlev,
    hicervix,
    image_folder,
    lunghist700,
    oral_scc,
    sipakmed,
    synthetic,
)
