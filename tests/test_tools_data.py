"""tools/make_split.py and tools/check_dataset.py on generated folders; unreadable images."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
from pathlib import Path

import pytest
from conftest import write_image

from fewclip.data import ImageError, Item
from fewclip.images import decode_items

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_oral(root: Path, per_class: int = 5) -> Path:
    counter = 0
    for magnification in ("100x", "400x"):
        for name in ("Normal", "OSCC"):
            for index in range(per_class):
                counter += 1
                write_image(
                    root / f"oral_histopath_{magnification}" / name / f"{index}.png", counter
                )
    return root


def test_make_split_writes_files_and_inspect_prints_the_same_counts(tmp_path, capsys):
    tool = load_tool("make_split")
    root = make_oral(tmp_path / "oral")
    args = ["configs/datasets/oral_scc.yaml", "DATASET.ROOT", str(root)]
    args += ["--output-dir", str(tmp_path / "out"), "--shots", "1", "2", "--seeds", "3"]
    args += ["DATASET.VAL_SHOTS", "1"]  # opts may also follow the flags
    assert tool.main(args) == 0
    printed = capsys.readouterr().out
    files = sorted((tmp_path / "out" / "splits").rglob("*.json"))
    assert [f.name.split("_")[:4] for f in files] == [
        ["shots", "1", "seed", "3"],
        ["shots", "2", "seed", "3"],
    ]  # the suffix hashes the non-default options (source and target centers)
    assert "shots 2, split seed 3" in printed
    row = next(line for line in printed.splitlines() if line.startswith("OSCC") and "400x" in line)
    assert row.split()[2:] == ["0", "0", "0", "5"]  # train, val, test, target:400x
    header = next(
        line for line in printed.splitlines() if line.startswith("class ") and "val" in line
    )
    assert header.split() == ["class", "center", "train", "val", "test", "target:400x"]
    assert tool.main(args[:5] + args[-2:] + ["--inspect", str(files[1])]) == 0
    inspected = capsys.readouterr().out
    table = printed.split(str(files[1]))[1].split("\n", 1)[1]
    assert table.strip() in inspected


def make_problem_folder(root: Path) -> Path:
    for center in ("site1", "site2"):
        for name in ("benign", "malignant"):
            for index in range(2):
                write_image(
                    root / center / name / f"{index}.png", seed=hash((center, name, index)) % 1000
                )
    write_image(root / "site1" / "extra" / "0.png", seed=77)  # class only in site1
    shutil.copy(root / "site1" / "benign" / "0.png", root / "site2" / "malignant" / "copy.png")
    good = (root / "site2" / "benign" / "1.png").read_bytes()
    (root / "site2" / "benign" / "broken.png").write_bytes(good[: len(good) // 2])
    (root / "site2" / "empty").mkdir()
    (root / "site1" / "empty").mkdir()
    return root


def test_check_dataset_reports_one_line_per_problem_and_exit_code(tmp_path, capsys):
    tool = load_tool("check_dataset")
    root = make_problem_folder(tmp_path / "data")
    assert tool.main(["--folder", str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    problems = [line for line in lines if line.split(" ")[0].isupper() and line[:4] != "note"]
    assert f"UNREADABLE {root / 'site2/benign/broken.png'}" in "\n".join(problems)
    assert any(
        line.startswith("MISMATCH class 'extra' has a folder in centers site1 but not in site2")
        for line in problems
    )
    assert sum(line.startswith("EMPTY ") for line in problems) == 2
    duplicate = next(line for line in problems if line.startswith("DUPLICATE"))
    assert "site2/malignant/copy.png (malignant)" in duplicate and "(benign)" in duplicate
    assert lines[-1].endswith(f"{len(problems)} problems") and len(problems) == 5
    clean = tmp_path / "clean"
    for name in ("a", "b"):
        write_image(clean / name / "0.png", seed=ord(name))
    assert tool.main(["--folder", str(clean)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 images, 0 problems"


def test_check_dataset_with_a_dataset_config(tmp_path, capsys):
    tool = load_tool("check_dataset")
    root = make_oral(tmp_path / "oral", per_class=2)
    args = ["configs/datasets/oral_scc.yaml", "DATASET.ROOT", str(root)]
    assert tool.main(args) == 0
    (root / "oral_histopath_400x" / "OSCC" / "0.png").write_bytes(b"not an image")
    assert tool.main(args) == 1
    assert "UNREADABLE" in capsys.readouterr().out
    shutil.rmtree(root / "oral_histopath_400x" / "Normal")
    assert tool.main(args) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("DATASET class 'Normal' has images in centers 100x but none in 400x")


def test_unreadable_image_errors_or_is_skipped_and_counted(tmp_path, caplog):
    good = write_image(tmp_path / "good.png", size=16)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    items = [Item(str(good), 0, "a"), Item(str(truncated), 0, "a")]
    with pytest.raises(ImageError, match="truncated.png"):
        decode_items(items, 8)
    with caplog.at_level(logging.WARNING):
        array, kept = decode_items(items, 8, skip_unreadable=True)
    assert kept == [0] and array.shape == (1, 8, 8, 3)
    assert "truncated.png" in caplog.text


def test_readme_tables_render_check_and_replace_their_blocks(tmp_path):
    """tools/readme_tables.py: the model table (trainer rows x MODEL.NAME columns, mean over
    seeds, a failed cell's one-line reason); --check accepts numbers within the tolerance and
    names a cell beyond it; a missing block is named."""
    import json

    def write(folder: str, trainer: str, model: str, seed: int, result: dict) -> None:
        config = {"TRAINER": {"NAME": trainer}, "RECIPE": f"r-name{model}", "SEED": seed}
        config["MODEL"] = {"NAME": model, "HF_HUB": ""}
        path = tmp_path / "sweep" / folder / "results.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"config": config, **result}))

    score = {"status": "complete", "metrics": {"test": {"balanced_accuracy": 0.5}}}
    write("a1", "LinearProbe", "twin:resnet", 1, score)
    score = {"status": "complete", "metrics": {"test": {"balanced_accuracy": 0.7}}}
    write("a2", "LinearProbe", "twin:resnet", 2, score)
    write("b", "SAVLT", "twin:resnet", 1, {"status": "failed", "error": "ValueError: x: no patch"})
    write("c", "SAVLT", "tiny-vit", 1, score)
    tool = load_tool("readme_tables")
    table = tool.model_table(tmp_path / "sweep", ["r"])
    assert table.splitlines() == [
        "| trainer (recipe) | `tiny-vit` | `twin:resnet` |",
        "|---|---|---|",
        "| `LinearProbe` (`r`) | - | 60.0 |",
        "| `SAVLT` (`r`) | 70.0 | no: no patch |",
    ]
    assert tool.compare_tables(table, table.replace("60.0", "60.4"), 0.5) == []
    (problem,) = tool.compare_tables(table, table.replace("60.0", "61.0"), 0.5)
    assert "row `LinearProbe` (`r`), column `twin:resnet`: README '60.0', now '61.0'" in problem
    assert tool.compare_tables(table, table.replace("no patch", "no tokens"), 5.0) != []
    seconds = "| a | seconds per cell |\n|---|---|\n| x | 1.0 |\n"
    assert tool.compare_tables(seconds, seconds.replace("1.0", "9.0"), 0.0) == []
    text = "intro\n<!-- table:models -->\nold\n<!-- /table:models -->\nrest\n"
    replaced = tool.replace_block(text, "models", table, "README.md")
    assert replaced == f"intro\n<!-- table:models -->\n{table}<!-- /table:models -->\nrest\n"
    with pytest.raises(SystemExit, match="README.md has no <!-- table:demo --> block"):
        tool.replace_block(text, "demo", table, "README.md")
