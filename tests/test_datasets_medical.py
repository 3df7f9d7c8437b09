"""Every medical dataset parses a generated copy of its on-disk layout with the right counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_image, write_oct_tree

from fewclip.data import DatasetError
from fewclip.registry import DATASETS
from fewclip.splits import SplitError, build_split
from fewclip_datasets.breakhis import BreaKHis
from fewclip_datasets.cervical_oct import CervicalOCT
from fewclip_datasets.chaoyang import Chaoyang
from fewclip_datasets.cric import CRIC
from fewclip_datasets.herlev import CLASS_NAMES as HERLEV_CLASSES
from fewclip_datasets.herlev import Herlev
from fewclip_datasets.hicervix import HiCervix
from fewclip_datasets.lunghist700 import LungHist700
from fewclip_datasets.oral_scc import OralSCC
from fewclip_datasets.sipakmed import SIPaKMeD

MEDICAL = [
    "BreaKHis", "CRIC", "CervicalOCT", "Chaoyang", "Herlev",
    "HiCervix", "LungHist700", "OralSCC", "SIPaKMeD",
]  # fmt: skip


def write_files(root: Path, names: list[str], start: int = 0) -> None:
    for index, name in enumerate(names):
        write_image(root / name, seed=start + index)


def make_herlev(root: Path, per_class: int = 3) -> Path:
    """Original layout: <class>/<field>-<cell>.BMP with `-d.bmp` masks for the first cell."""
    names = []
    for index, name in enumerate(HERLEV_CLASSES):
        for cell in range(per_class):
            field = f"{100 + index}-{200 + cell // 2}"  # two cells per field of view
            names.append(f"{name}/{field}-{cell:03d}.BMP")
            if cell == 0:
                names.append(f"{name}/{field}-{cell:03d}-d.bmp")
    write_files(root, names)
    return root


def test_every_medical_dataset_is_registered_with_its_node_and_prompt_file():
    for name in MEDICAL:
        cls = DATASETS.get(name)
        assert cls.config_node() is not None and cls.config_key().isupper()
        assert (Path("configs/prompts") / cls.default_prompt_file).is_file(), name
        assert (Path("configs/datasets") / f"{cls.default_prompt_file}").is_file(), name


def test_herlev_folder_layout_views_groups_and_masks(make_cfg, tmp_path):
    root = make_herlev(tmp_path / "herlev")
    dataset = Herlev(make_cfg("Herlev", ROOT=str(root)))
    assert dataset.class_names == HERLEV_CLASSES and len(dataset.items) == 21
    first = next(i for i in dataset.items if i.path.endswith("100-200-000.BMP"))
    assert first.group == "100-200" and first.mask.endswith("100-200-000-d.bmp")
    assert sum(bool(i.mask) for i in dataset.items) == 7
    assert dataset.positive_classes == HERLEV_CLASSES[3:]
    assert "CIN 2" in dataset.prompts.texts("description")[4][0]
    cfg = make_cfg("Herlev", ROOT=str(root))
    cfg.DATASET.HERLEV.VIEW = "binary"
    binary = Herlev(cfg)
    binary_key = binary.split_key  # the view is part of the split folder name
    assert binary.class_names == ["normal", "abnormal"]
    assert binary.count_table()["default"] == {"normal": 9, "abnormal": 12}
    cfg.DATASET.HERLEV.VIEW = "bethesda"
    bethesda = Herlev(cfg)
    assert bethesda.count_table()["default"] == {"normal": 9, "lsil": 3, "hsil": 9}
    assert bethesda.positive_classes == ["lsil", "hsil"] and bethesda.split_key != binary_key
    cfg.DATASET.HERLEV.VIEW = "4class"
    with pytest.raises(DatasetError, match="DATASET.HERLEV.VIEW is '4class'; choose one of"):
        Herlev(cfg)


def test_herlev_manifest_gives_groups_and_must_cover_the_folder(make_cfg, tmp_path):
    root = make_herlev(tmp_path / "herlev", per_class=2)
    rows = [["path", "label", "group"]] + [
        [f"{name}/{100 + index}-200-{cell:03d}.BMP", name, f"fov{index}"]
        for index, name in enumerate(HERLEV_CLASSES)
        for cell in range(2)
    ]
    with open(root / "manifest.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    dataset = Herlev(make_cfg("Herlev", ROOT=str(root)))
    assert len(dataset.items) == 14 and {i.group for i in dataset.items} == {
        f"fov{i}" for i in range(7)
    }
    write_image(root / "normal_columnar" / "999-999-001.BMP", seed=99)
    with pytest.raises(DatasetError, match=r"1 images .* not in manifest.csv, e.g. .*999-999-001"):
        Herlev(make_cfg("Herlev", ROOT=str(root)))
    (root / "normal_columnar" / "999-999-001.BMP").unlink()
    (root / "carcinoma_in_situ" / "106-200-001.BMP").unlink()
    with pytest.raises(DatasetError, match=r"1 listed images do not exist, e.g. .*106-200-001"):
        Herlev(make_cfg("Herlev", ROOT=str(root)))


def test_oral_scc_reads_magnification_folders_and_original_names(make_cfg, tmp_path):
    root = tmp_path / "oral"
    write_files(root, [f"oral_histopath_100x/Normal/n{i}.jpg" for i in range(2)])
    write_files(root, [f"oral_histopath_100x/OSCC/o{i}.jpg" for i in range(3)], 10)
    write_files(root, [f"oral_histopath_400x/Normal/n{i}.jpg" for i in range(4)], 20)
    write_files(root, [f"oral_histopath_400x/OSCC/o{i}.jpg" for i in range(5)], 30)
    (root / "oral_histopath_100x" / "manifest.csv").write_text("path,label\n")
    dataset = OralSCC(make_cfg("OralSCC", ROOT=str(root)))
    assert dataset.centers == ["100x", "400x"] and dataset.positive_classes == ["OSCC"]
    assert dataset.count_table() == {
        "100x": {"Normal": 2, "OSCC": 3},
        "400x": {"Normal": 4, "OSCC": 5},
    }
    original = tmp_path / "original"
    write_files(original, ["First Set/100x Normal Oral Cavity Histopathology/a.jpg"])
    write_files(original, ["First Set/100x OSCC Histopathology/b.jpg"], 1)
    write_files(original, ["Second Set/400x Normal Oral Cavity Histopathology/c.jpg"], 2)
    write_files(original, ["Second Set/400x OSCC Histopathology/d.jpg"], 3)
    cfg = make_cfg("OralSCC", ROOT=str(original))
    cfg.DATASET.ORAL_SCC.CENTERS = ["100x=First Set", "400x=Second Set"]
    with pytest.raises(
        DatasetError, match=r"100x Normal Oral Cavity Histopathology \(center '100x'\)"
    ):
        OralSCC(cfg)
    cfg.DATASET.ORAL_SCC.CLASS_FOLDERS = [
        f"{name}={mag} {folder} Histopathology"
        for mag in ("100x", "400x")
        for name, folder in (("Normal", "Normal Oral Cavity"), ("OSCC", "OSCC"))
    ]
    assert OralSCC(cfg).count_table()["400x"] == {"Normal": 1, "OSCC": 1}


def test_cervical_oct_centers_masks_and_class_folder_aliases(make_cfg, tmp_path):
    root = write_oct_tree(tmp_path / "oct", per_class=2)
    write_image(root / "mixed" / "masks" / "cyst" / "mixed_0.png", seed=500)
    dataset = CervicalOCT(make_cfg("CervicalOCT", ROOT=str(root)))
    assert dataset.centers == ["huaxi", "mixed", "xiangya"] and len(dataset.items) == 30
    assert dataset.positive_classes == ["cancer", "high-grade squamous intraepithelial lesion"]
    masked = [i for i in dataset.items if i.mask]
    assert len(masked) == 1 and masked[0].path.endswith("mixed/images/cyst/mixed_0.png")
    hsil = root / "huaxi" / "images" / "high-grade squamous intraepithelial lesion"
    hsil.rename(hsil.parent / "HSIL")
    with pytest.raises(
        DatasetError, match=r"HSIL \(center 'huaxi'\) is not a class .*CERVICAL_OCT.CLASS_FOLDERS"
    ):
        CervicalOCT(make_cfg("CervicalOCT", ROOT=str(root)))
    cfg = make_cfg("CervicalOCT", ROOT=str(root))
    cfg.DATASET.CERVICAL_OCT.CLASS_FOLDERS = ["high-grade squamous intraepithelial lesion=HSIL"]
    assert len(CervicalOCT(cfg).items) == 30


def test_cric_views_folder_names_and_groups(make_cfg, tmp_path):
    folders = ["Negative for intraepithelial lesion", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]
    names = [
        f"{folder}/{image}_{cell}.png" for folder in folders for image in (7, 8) for cell in (1, 2)
    ]
    write_files(tmp_path / "cric", names)
    cfg = make_cfg("CRIC", ROOT=str(tmp_path / "cric"))
    dataset = CRIC(cfg)
    assert dataset.class_names[0] == "NILM" and dataset.count_table()["default"]["NILM"] == 4
    assert dataset.positive_classes == ["ASC-US", "LSIL", "ASC-H", "HSIL", "SCC"]
    assert {i.group for i in dataset.items} == {""}
    cfg.DATASET.CRIC.VIEW = "3class"
    cfg.DATASET.CRIC.GROUP_PATTERN = r"^(\d+)_\d+$"
    three = CRIC(cfg)
    assert three.count_table()["default"] == {"normal": 4, "lsil": 8, "hsil": 12}
    assert {i.group for i in three.items} == {"7", "8"}
    cfg.DATASET.CRIC.GROUP_PATTERN = r"^x(\d+)"
    with pytest.raises(DatasetError, match="GROUP_PATTERN .* finds no group in the name of"):
        CRIC(cfg)


def test_sipakmed_cropped_full_nested_and_views(make_cfg, tmp_path):
    root = tmp_path / "sipakmed"
    types = ["Superficial-Intermediate", "Parabasal", "Metaplastic", "Koilocytotic", "Dyskeratotic"]
    for index, name in enumerate(types):
        folder = f"im_{name}/im_{name}" if name == "Parabasal" else f"im_{name}"  # Kaggle nesting
        names = [f"{folder}/00{k}.bmp" for k in (1, 2)]
        names += [f"{folder}/CROPPED/00{k}_0{c}.bmp" for k in (1, 2) for c in (1, 2, 3)]
        write_files(root, names, index * 10)
        (root / folder / "001.dat").write_text("contour")
    cfg = make_cfg("SIPaKMeD", ROOT=str(root))
    dataset = SIPaKMeD(cfg)
    assert dataset.class_names == types and len(dataset.items) == 30
    assert {i.group for i in dataset.items if i.class_name == "Parabasal"} == {
        "Parabasal/001",
        "Parabasal/002",
    }
    assert dataset.positive_classes == ["Koilocytotic", "Dyskeratotic"]
    cfg.DATASET.SIPAKMED.IMAGES, cfg.DATASET.SIPAKMED.VIEW = "full", "3class"
    full = SIPaKMeD(cfg)
    assert full.count_table()["default"] == {"normal": 4, "benign": 2, "abnormal": 4}
    (root / "im_Metaplastic").rename(root / "Metaplastic")
    with pytest.raises(DatasetError, match=r"type folder .*im_Metaplastic does not exist"):
        SIPaKMeD(cfg)


def test_chaoyang_json_labels_and_official_split(make_cfg, tmp_path):
    root = tmp_path / "chaoyang"
    entries = {"train": [], "test": []}
    for split, count in (("train", 6), ("test", 2)):
        for label in range(4):
            for index in range(count):
                name = f"{split}/{label}_{index}.JPG"
                write_image(root / name, seed=len(entries[split]) + (100 if split == "test" else 0))
                entries[split].append({"name": name, "label": label})
    for split, rows in entries.items():
        (root / f"{split}.json").write_text(json.dumps(rows))
    cfg = make_cfg("Chaoyang", ROOT=str(root), NUM_SHOTS=2, VAL_FRACTION=0.25)
    dataset = Chaoyang(cfg)
    assert dataset.class_names == ["normal", "serrated", "adenocarcinoma", "adenoma"]
    assert sum(i.split == "test" for i in dataset.items) == 8 and len(dataset.items) == 32
    split = build_split(dataset, cfg)
    assert {Path(i.path).parent.name for i in split.test} == {"test"} and len(split.test) == 8
    assert all(Path(i.path).parent.name == "train" for i in split.train + split.val)
    (root / "test.json").write_text(json.dumps([{"name": "test/0_0.JPG", "label": 7}]))
    with pytest.raises(DatasetError, match=r"test.json entry 0: label 7 is not 0..3"):
        Chaoyang(cfg)


def test_breakhis_names_give_class_magnification_and_patient(make_cfg, tmp_path):
    root = tmp_path / "BreaKHis_v1"
    codes = {"A": "benign", "F": "benign", "PT": "benign", "TA": "benign"}
    codes |= {"DC": "malignant", "LC": "malignant", "MC": "malignant", "PC": "malignant"}
    counter = 0
    for code, kind in codes.items():
        tumour = kind[0].upper()
        for patient in ("22549AB", "13412"):
            for magnification in (40, 100, 200, 400):
                counter += 1
                folder = (
                    root / "histology_slides/breast" / kind / f"SOB_{tumour}_{code}_14-{patient}"
                )
                name = f"SOB_{tumour}_{code}-14-{patient}-{magnification}-00{counter % 9}.png"
                write_image(folder / f"{magnification}X" / name, seed=counter)
    cfg = make_cfg("BreaKHis", ROOT=str(root))
    dataset = BreaKHis(cfg)
    assert dataset.centers == ["100X", "200X", "400X", "40X"] and len(dataset.items) == 64
    assert {i.group for i in dataset.items} == {"14-22549AB", "14-13412"}
    assert dataset.count_table()["40X"]["mucinous_carcinoma"] == 2
    cfg.DATASET.BREAKHIS.VIEW = "binary"
    cfg.DATASET.BREAKHIS.MAGNIFICATIONS = ["40X", "400X"]
    binary = BreaKHis(cfg)
    assert binary.centers == ["400X", "40X"] and binary.positive_classes == ["malignant"]
    assert binary.count_table()["400X"] == {"benign": 8, "malignant": 8}
    write_image(root / "stray.png")
    with pytest.raises(DatasetError, match=r"stray.png does not follow the BreaKHis name pattern"):
        BreaKHis(cfg)


def test_lunghist700_names_table_patients_and_views(make_cfg, tmp_path):
    root = tmp_path / "LungHist700"
    rows = [["superclass", "subclass", "resolution", "image_id", "patient_id"]]
    counter = 0
    for superclass, subclass in [("nor", "")] + [
        (t, g) for t in ("aca", "scc") for g in ("bd", "md", "pd")
    ]:
        folder = f"{superclass}_{subclass}" if subclass else superclass
        for resolution in ("20x", "40x"):
            for image_id in (1, 2):
                counter += 1
                stem = "_".join(p for p in (superclass, subclass, resolution, str(image_id)) if p)
                write_image(root / "images" / folder / f"{stem}.jpg", seed=counter)
                rows.append([superclass, subclass, resolution, f"{image_id}.0", str(image_id % 2)])
    with open(root / "data.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    cfg = make_cfg("LungHist700", ROOT=str(root))
    dataset = LungHist700(cfg)
    assert dataset.class_names == ["normal", "adenocarcinoma", "squamous_cell_carcinoma"]
    assert dataset.count_table()["40x"] == {
        "normal": 2,
        "adenocarcinoma": 6,
        "squamous_cell_carcinoma": 6,
    }
    assert {i.group for i in dataset.items} == {"patient-0", "patient-1"}
    cfg.DATASET.LUNGHIST700.VIEW = "7class"
    cfg.DATASET.LUNGHIST700.RESOLUTIONS = ["20x"]
    fine = LungHist700(cfg)
    assert fine.centers == ["20x"] and len(fine.class_names) == 7 and len(fine.items) == 14
    assert fine.count_table()["20x"]["squamous_cell_carcinoma_poorly_differentiated"] == 2
    (root / "data.csv").write_text("superclass,subclass,resolution,image_id,patient_id\n")
    with pytest.raises(DatasetError, match=r"_20x_1.jpg has no row in data.csv"):
        LungHist700(cfg)


HICERVIX_ROWS = [  # class_name, class_id, level_1, level_2, level_3
    ("Normal", 0, "negative", "Normal", ""),
    ("ECC", 1, "negative", "ECC", ""),
    ("LSIL", 9, "ASC", "LSIL", ""),
    ("HSIL", 11, "ASC", "HSIL", ""),
    ("AGC", 13, "AGC", "", ""),
    ("AGC-NOS", 14, "AGC", "AGC-NOS", ""),
    ("AGC-ECC-NOS", 17, "AGC", "AGC-NOS", "AGC-ECC-NOS"),
    ("TRI", 23, "microbe", "TRI", ""),
]


def make_hicervix(root: Path, per_split: dict[str, int]) -> Path:
    counter = 0
    for split, count in per_split.items():
        lines = ["image_name,class_name,class_id,level_1,level_2,level_3"]
        for row in HICERVIX_ROWS:
            for _ in range(count):
                counter += 1
                name = f"{counter:05d}.jpg"
                write_image(root / split / name, seed=counter)
                lines.append(",".join([name, row[0], str(row[1]), *row[2:]]))
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_hicervix_levels_missing_policy_and_official_split(make_cfg, tmp_path):
    root = make_hicervix(tmp_path / "hicervix", {"train": 3, "val": 1, "test": 2})
    cfg = make_cfg("HiCervix", ROOT=str(root), NUM_SHOTS=2, VAL_SHOTS=0)
    level2 = HiCervix(cfg)  # default level 2 drops the AGC image labelled at level 1 only
    assert level2.class_names == ["Normal", "ECC", "LSIL", "HSIL", "AGC-NOS", "TRI"]
    assert len(level2.items) == 7 * 6 and level2.positive_classes == ["LSIL", "HSIL", "AGC-NOS"]
    split = build_split(level2, cfg)
    assert len(split.train) == 12 and len(split.val) == 7 and len(split.test) == 14
    cfg.DATASET.HICERVIX.LEVEL = 1
    assert HiCervix(cfg).class_names == ["negative", "ASC", "AGC", "microbe"]
    cfg.DATASET.HICERVIX.LEVEL, cfg.DATASET.HICERVIX.MISSING_LEVEL = 3, "coarser"
    level3 = HiCervix(cfg)
    assert "AGC-ECC-NOS" in level3.class_names and "AGC" in level3.class_names
    assert len(level3.items) == 48
    cfg.DATASET.HICERVIX.LEVEL = 0
    assert len(HiCervix(cfg).class_names) == 8
    (root / "test" / "00040.jpg").unlink()
    with pytest.raises(
        DatasetError, match=r"test.csv: 1 listed images are not in .*e.g. 00040.jpg"
    ):
        HiCervix(cfg)


# --- bad input: one line naming the path or class ----------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_root_names_the_path(make_cfg, tmp_path):
    for name in ("Herlev", "OralSCC", "HiCervix", "BreaKHis"):
        with pytest.raises(FileNotFoundError) as error:
            DATASETS.get(name)(make_cfg(name, ROOT=str(tmp_path / "absent")))
        assert str(tmp_path / "absent") in one_line(error)


def test_empty_class_folder_and_missing_class_are_named(make_cfg, tmp_path):
    root = make_herlev(tmp_path / "herlev")
    for file in (root / "severe_dysplastic").iterdir():
        file.unlink()
    with pytest.raises(DatasetError) as error:
        Herlev(make_cfg("Herlev", ROOT=str(root)))
    assert "class 'severe_dysplastic' folder" in one_line(error) and "has no images" in str(
        error.value
    )
    (root / "severe_dysplastic").rmdir()
    with pytest.raises(DatasetError, match="class 'severe_dysplastic' has no images under"):
        Herlev(make_cfg("Herlev", ROOT=str(root)))


def test_class_present_in_one_center_and_not_another_is_named(make_cfg, tmp_path):
    root = write_oct_tree(tmp_path / "oct", per_class=2)
    for file in (root / "xiangya" / "images" / "cyst").iterdir():
        file.unlink()
    (root / "xiangya" / "images" / "cyst").rmdir()
    with pytest.raises(DatasetError) as error:
        CervicalOCT(make_cfg("CervicalOCT", ROOT=str(root)))
    assert one_line(error).startswith(
        "class 'cyst' has images in centers huaxi, mixed but none in xiangya"
    )


def test_more_shots_than_images_names_the_class(make_cfg, tmp_path):
    root = make_herlev(tmp_path / "herlev", per_class=6)
    cfg = make_cfg("Herlev", ROOT=str(root), NUM_SHOTS=5)
    with pytest.raises(SplitError) as error:
        build_split(Herlev(cfg), cfg)
    message = one_line(error)
    assert "'carcinoma_in_situ' (2 training images)" in message and "fewer than 5 shots" in message
