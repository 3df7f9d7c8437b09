"""fewclip's built-in trainers, installed as the package `fewclip_trainers`.

Importing it fills `fewclip.registry.TRAINERS`; `fewclip.registry.load_installed_plugins()` does
that (it is declared in pyproject.toml's `fewclip.plugins` entry points). The folder is named
`trainers/` in the repository, where users look for it (see docs/design.md).
"""

if __name__ != "fewclip_trainers":
    raise ImportError(
        f"fewclip's trainers folder was imported as {__name__!r}: import it as fewclip_trainers "
        "(pip install -e . in the fewclip folder)"
    )

from . import (  # noqa: E402, F401
    amlpf,
    camvla,
    clap,
    clip_adapter,
    clip_lora,
    cocoop,
    coop,
    kgcoop,
    linear_probe,
    lpp,
    savlt,
    tip_adapter,
    vit_teacher,
    zeroshot,
)
