"""SyntheticMultiCenter: generated cell images, four classes in three stain/scanner "centers".

The class shows in morphology (nucleus size, shape, darkness, crowding); the center shows as a
stain colour shift, blur and a change of scale, so cross-center evaluation means something.
With DATASET.ROOT "" the images are generated once into
`<CACHE_DIR>/synthetic/<params hash>/<center>/<class>/*.png` (atomic: a temporary folder renamed
into place, so racing processes are safe); with ROOT set, an existing copy is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from yacs.config import CfgNode

from fewclip.data import DatasetBase, Item, collect_items
from fewclip.registry import DATASETS

GENERATOR_VERSION = 1  # bump when the drawing changes, so cached copies are regenerated
CLASS_NAMES = ["normal", "lsil", "hsil", "carcinoma"]

# Per class: cells (min, max), cell radius, nucleus radius (fractions of the image side),
# nucleus irregularity, nucleus darkness (0..1), nuclei per cell (min, max).
MORPHOLOGY = {
    "normal": dict(
        cells=(1, 2),
        cell=(0.26, 0.36),
        nucleus=(0.04, 0.07),
        irregular=0.04,
        dark=0.55,
        nuclei=(1, 1),
    ),
    "lsil": dict(
        cells=(1, 2),
        cell=(0.24, 0.34),
        nucleus=(0.065, 0.105),
        irregular=0.10,
        dark=0.65,
        nuclei=(1, 2),
    ),
    "hsil": dict(
        cells=(1, 3),
        cell=(0.14, 0.22),
        nucleus=(0.09, 0.14),
        irregular=0.18,
        dark=0.8,
        nuclei=(1, 1),
    ),
    "carcinoma": dict(
        cells=(4, 8),
        cell=(0.08, 0.16),
        nucleus=(0.05, 0.10),
        irregular=0.28,
        dark=0.9,
        nuclei=(1, 2),
    ),
}

# Center styles: stain matrix rows mix (r, g, b), blur radius in pixels, geometric scale.
CENTER_STYLES = [
    dict(stain=np.eye(3), offset=(0.0, 0.0, 0.0), blur=0.0, scale=1.0),
    dict(
        stain=np.array([[1.05, 0.1, 0.05], [0.0, 0.85, 0.0], [0.05, 0.05, 0.9]]),
        offset=(0.05, -0.02, 0.02),
        blur=1.0,
        scale=1.0,
    ),
    dict(
        stain=np.array([[0.8, 0.0, 0.1], [0.05, 0.85, 0.05], [0.1, 0.1, 1.05]]),
        offset=(-0.03, 0.0, 0.06),
        blur=0.6,
        scale=0.75,
    ),
]


def _center_style(index: int) -> dict:
    """Styles beyond the three presets are drawn from a generator seeded by the center index."""
    if index < len(CENTER_STYLES):
        return CENTER_STYLES[index]
    rng = np.random.default_rng([7919, index])
    return dict(
        stain=np.eye(3) + rng.normal(0, 0.08, (3, 3)),
        offset=rng.normal(0, 0.04, 3),
        blur=float(rng.uniform(0, 1.2)),
        scale=float(rng.uniform(0.7, 1.2)),
    )


def _blob(
    size: int, rng: np.random.Generator, center: np.ndarray, radius: float, irregular: float
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Soft mask in [0, 1] of an irregular, rotated, slightly elliptic blob, computed only in its
    bounding window: returns (window slices, mask of the window's shape)."""
    reach = radius * (1 + 1.1 * irregular) + 2
    low = np.clip(np.floor(center - reach), 0, size).astype(int)
    high = np.clip(np.ceil(center + reach) + 1, 0, size).astype(int)
    window = (slice(low[0], high[0]), slice(low[1], high[1]))
    yy, xx = np.mgrid[window]
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.75, 1.0)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    distance, theta = np.hypot(u, v), np.arctan2(v, u)
    wobble = sum(
        rng.uniform(0, irregular) / k * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        for k in (2, 3, 5)
    )
    return window, np.clip(radius * (1 + wobble) - distance + 0.5, 0, 1)[..., None]


def _paint(
    image: np.ndarray,
    blob: tuple[tuple[slice, slice], np.ndarray],
    colour: np.ndarray,
    opacity: float = 1.0,
) -> None:
    window, mask = blob
    mask = mask * opacity
    image[window] = image[window] * (1 - mask) + mask * (
        colour[window] if colour.ndim == 3 else colour
    )


def make_cell_image(
    rng: np.random.Generator, class_name: str, size: int, style: dict
) -> Image.Image:
    """One RGB image of `class_name` cells drawn in the given center style."""
    shape = MORPHOLOGY[class_name]
    scale = size * style["scale"]
    coarse = rng.normal(0, 0.03, (5, 5, 3))
    texture = np.kron(coarse, np.ones((size // 5 + 1, size // 5 + 1, 1)))[:size, :size]
    image = np.array([0.93, 0.91, 0.93]) + texture
    chromatin = 1 + rng.normal(0, 0.08, (size, size, 1))  # nuclear texture
    for _ in range(rng.integers(shape["cells"][0], shape["cells"][1] + 1)):
        middle = rng.uniform(0.2, 0.8, 2) * size
        cell_radius = rng.uniform(*shape["cell"]) * scale
        cytoplasm = (
            np.array([0.62, 0.80, 0.84]) if rng.random() < 0.6 else np.array([0.92, 0.68, 0.74])
        )
        _paint(image, _blob(size, rng, middle, cell_radius, 0.08), cytoplasm, 0.8)
        for _ in range(rng.integers(shape["nuclei"][0], shape["nuclei"][1] + 1)):
            spot = middle + rng.normal(0, 0.15 * cell_radius, 2)
            radius = rng.uniform(*shape["nucleus"]) * scale
            if class_name == "lsil":  # koilocyte halo: a clear ring around the nucleus
                _paint(image, _blob(size, rng, spot, radius * 1.8, 0.05), np.array([0.95] * 3), 0.7)
            darkness = np.clip(shape["dark"] + rng.normal(0, 0.06), 0, 1)
            colour = np.array([0.55, 0.42, 0.70]) * (1.2 - darkness) * chromatin
            _paint(image, _blob(size, rng, spot, radius, shape["irregular"]), colour)
    image = image @ np.asarray(style["stain"]).T + np.asarray(style["offset"])
    image += rng.normal(0, 0.02, image.shape)
    picture = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "RGB")
    if style["blur"] > 0:
        picture = picture.filter(ImageFilter.GaussianBlur(style["blur"]))
    return picture


def generate_synthetic(
    folder: Path, images_per_class: int, image_size: int, centers: Sequence[str], seed: int
) -> None:
    """Write `folder/<center>/<class>/<center>_<class>_<index>.png`; same inputs, same pixels."""
    for center_index, center in enumerate(centers):
        style = _center_style(center_index)
        for class_index, class_name in enumerate(CLASS_NAMES):
            out = folder / center / class_name
            out.mkdir(parents=True, exist_ok=True)
            for index in range(images_per_class):
                rng = np.random.default_rng([seed, center_index, class_index, index])
                picture = make_cell_image(rng, class_name, image_size, style)
                picture.save(out / f"{center}_{class_name}_{index:04d}.png", compress_level=1)


@DATASETS.register()
class SyntheticMultiCenter(DatasetBase):
    default_prompt_file = "synthetic.yaml"
    default_positive_classes = ("hsil", "carcinoma")

    @classmethod
    def config_key(cls) -> str:
        return "SYNTHETIC"

    @classmethod
    def config_node(cls) -> CfgNode:
        node = CfgNode()
        node.IMAGES_PER_CLASS = 40  # images of each class in every center
        node.IMAGE_SIZE = 64  # side of the square RGB images in pixels
        node.CENTERS = ["center_a", "center_b", "center_c"]  # first = reference stain and scale
        node.GENERATION_SEED = 0  # seed of the image generator (not the split seed)
        return node

    def _params(self) -> dict:
        node = self.cfg.DATASET.SYNTHETIC
        return dict(
            images_per_class=int(node.IMAGES_PER_CLASS),
            image_size=int(node.IMAGE_SIZE),
            centers=list(node.CENTERS),
            seed=int(node.GENERATION_SEED),
        )

    def _params_hash(self) -> str:
        text = json.dumps({**self._params(), "version": GENERATOR_VERSION}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def resolve_root(self) -> Path:
        if self.cfg.DATASET.ROOT:
            return super().resolve_root()
        final = Path(os.path.abspath(Path(self.cfg.CACHE_DIR).expanduser())) / "synthetic"
        final = final / self._params_hash()
        if not final.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            temporary = final.parent / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                generate_synthetic(temporary, **self._params())
                os.rename(temporary, final)
            except OSError:
                if not final.is_dir():  # not a lost race: a real failure
                    raise
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
        return final

    @property
    def split_key(self) -> str:
        return (
            f"{self.name}_{self._params_hash()}" if not self.cfg.DATASET.ROOT else super().split_key
        )

    def load_items(self) -> tuple[list[str], list[Item]]:
        return CLASS_NAMES, collect_items(
            self.root, CLASS_NAMES, list(self.cfg.DATASET.SYNTHETIC.CENTERS)
        )
