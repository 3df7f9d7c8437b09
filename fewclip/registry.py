"""Name -> implementation registries, and loading of user plugins from outside the repo."""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class RegistryError(KeyError):
    """An unknown or duplicate registry name; the message is one line a person can act on."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """A named map from config strings to classes or functions, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: `@DATASETS.register()` uses the object's `__name__`."""

        def add(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._entries and self._entries[key] is not obj:
                raise RegistryError(f"{self.kind} {key!r} is registered twice")
            self._entries[key] = obj
            return obj

        return add

    def get(self, name: str) -> Any:
        if name in self._entries:
            return self._entries[name]
        lowered = {key.lower(): key for key in self._entries}
        if name.lower() in lowered:  # never accepted silently: the run would be filed under it
            raise RegistryError(
                f"unknown {self.kind} {name!r}: names are case-sensitive; "
                f"did you mean {lowered[name.lower()]!r}?"
            )
        if not self._entries:
            raise RegistryError(
                f"unknown {self.kind} {name!r}: no {self.kind}s are registered. Load the built-in"
                " ones with fewclip.registry.load_installed_plugins() (the fewclip command does),"
                " after installing fewclip (pip install -e . in its folder)"
            )
        close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise RegistryError(
            f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}"
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))


DATASETS = Registry("dataset")
TRAINERS = Registry("trainer")
SAMPLERS = Registry("sampler")


PLUGIN_GROUP = "fewclip.plugins"  # entry-point group of installed plugin packages
# What this process has loaded, so that worker processes (spawned pools, cluster tasks) can load
# the same: module names (installed plugins, the built-ins among them) and plugin file paths.
_LOADED: dict[str, list[str]] = {"modules": [], "paths": []}


def import_plugin_module(name: str) -> None:
    """Import one installed module whose `@register` calls fill the registries (once)."""
    importlib.import_module(name)
    if name not in _LOADED["modules"]:
        _LOADED["modules"].append(name)


def load_installed_plugins() -> list[str]:
    """Import every module declared in the `fewclip.plugins` entry-point group; their names.

    fewclip's own datasets and trainers are installed this way (`fewclip_datasets`,
    `fewclip_trainers`, declared in pyproject.toml), and so is any plugin package a user installs.
    The command line, the tools and the tests call this; importing the library never does.
    """
    from importlib.metadata import entry_points

    names = sorted({entry.value for entry in entry_points(group=PLUGIN_GROUP)})
    for name in names:
        import_plugin_module(name)
    return names


def load_plugins(paths: Iterable[str]) -> None:
    """Import user Python files (or folders of them) so their `@register` calls run.

    A plugin is a file outside the repository that imports `fewclip.registry` and registers
    datasets, trainers or samplers. Each is imported once, under a module name made from its path.
    """
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise RegistryError(
                f"PLUGINS: {raw!r} does not exist (give a Python file, or a folder of them, that"
                " registers datasets, trainers or samplers)"
            )
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        for file in files:
            module_name = "fewclip_plugin_" + "_".join(file.with_suffix("").parts[-3:])
            if module_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(module_name, file)
            if spec is None or spec.loader is None:
                raise ImportError(f"plugin {file} is not an importable Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        if str(path) not in _LOADED["paths"]:
            _LOADED["paths"].append(str(path))


def loaded_plugins() -> dict[str, list[str]]:
    """The plugin modules and paths this process loaded (for `restore_plugins` in a worker)."""
    return {key: list(values) for key, values in _LOADED.items()}


def restore_plugins(loaded: dict[str, list[str]]) -> None:
    """In a fresh process: load what `loaded_plugins()` returned in the parent."""
    for name in loaded.get("modules", []):
        import_plugin_module(name)
    load_plugins(loaded.get("paths", []))
