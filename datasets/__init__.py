"""fewclip's built-in datasets, installed as the package `fewclip_datasets`.

Importing it fills `fewclip.registry.DATASETS`; `fewclip.registry.load_installed_plugins()` does
that (it is declared in pyproject.toml's `fewclip.plugins` entry points). The folder is named
`datasets/` in the repository, where users look for it, but is never importable under that name:
`datasets` belongs to the Hugging Face package many users have installed (see docs/design.md).
"""

if __name__ != "fewclip_datasets":
    raise ImportError(
        f"fewclip's datasets folder was imported as {__name__!r}: import it as fewclip_datasets "
        "(pip install -e . in the fewclip folder), so it cannot shadow the `datasets` package"
    )

from . import (  # noqa: E402, F401
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
