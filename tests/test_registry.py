"""Registry: duplicate names, unknown names with close matches, user plugins from outside."""

from __future__ import annotations

import pytest

from fewclip.registry import DATASETS, TRAINERS, Registry, RegistryError, load_plugins


def test_duplicate_name_is_an_error():
    registry = Registry("thing")

    @registry.register()
    class Alpha:
        pass

    with pytest.raises(RegistryError, match="'Alpha' is registered twice"):

        @registry.register("Alpha")
        class Other:
            pass


def test_unknown_name_names_closest_match_and_lists_all():

    with pytest.raises(RegistryError) as error:
        TRAINERS.get("CLIPLora2")
    message = str(error.value)
    assert "Did you mean 'CLIPLoRA'" in message
    assert "ZeroShotCLIP" in message and "LinearProbe" in message
    with pytest.raises(RegistryError, match="case-sensitive; did you mean 'CLIPLoRA'"):
        TRAINERS.get("ClipLoRA")  # never accepted silently: it would name the run folder


def test_plugin_file_outside_repo_registers_a_dataset(tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "from fewclip.data import DatasetBase\n"
        "from fewclip.registry import DATASETS\n"
        "@DATASETS.register()\n"
        "class MyHospitalData(DatasetBase):\n"
        "    def load_items(self):\n"
        "        return [], []\n"
    )
    load_plugins([str(plugin)])
    assert "MyHospitalData" in DATASETS
    with pytest.raises(RegistryError, match="PLUGINS: '.*nowhere.py' does not exist"):
        load_plugins([str(tmp_path / "nowhere.py")])
