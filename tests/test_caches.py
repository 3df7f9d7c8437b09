"""Caches: keys see every input, cached runs equal uncached ones, concurrent writers are safe."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_GUARD
from PIL import Image
from torchvision import transforms
from yacs.config import CfgNode

from fewclip import features as features_module
from fewclip import images as images_module
from fewclip.backbones import build_clip
from fewclip.config import build_config
from fewclip.data import ImageError, Item
from fewclip.features import (
    cached_text_features,
    load_image_features,
    load_or_compute_features,
    read_feature_file,
)
from fewclip.images import (
    ImageRows,
    ImageStore,
    compute_image_key,
    decode_items,
    hold_training_images,
    iterate_image_batches,
    to_model_input,
)
from fewclip.run import execute_run
from fewclip.trainer import ImageSet
from fewclip_datasets.synthetic import generate_synthetic
from tests.conftest import write_image

CONTEXT = multiprocessing.get_context("fork")  # children only decode and copy bytes


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tests run models on tiny inputs, where a second thread only
    adds synchronisation (and on a busy machine, waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_items(folder: Path, count: int, splits: tuple[str, ...] = ("",)) -> list[Item]:
    paths = [write_image(folder / f"img_{i:02d}.png", seed=i, size=12) for i in range(count)]
    return [
        Item(str(p), i % 2, f"c{i % 2}", split=splits[i % len(splits)]) for i, p in enumerate(paths)
    ]


def image_set(store: ImageStore, items: list[Item]) -> ImageSet:
    decoded = store.load(items)
    return ImageSet(
        decoded.images,
        np.zeros(len(items)),
        [""] * len(items),
        items,
        store.key,
        decoded.rows,
        store,
    )


def test_image_key_changes_with_content_mtime_size_and_recipe(tmp_path, monkeypatch):
    items = make_items(tmp_path, 3)
    key = compute_image_key(items, 8)
    assert compute_image_key(items, 8) == key
    assert compute_image_key(items, 9) != key
    assert compute_image_key(items[:2], 8) != key
    stat = os.stat(items[0].path)
    write_image(Path(items[0].path), seed=99, size=12)  # same size, other pixels ...
    os.utime(items[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime
    assert os.stat(items[0].path).st_size == stat.st_size
    changed = compute_image_key(items, 8)
    assert changed != key
    os.utime(items[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert compute_image_key(items, 8) != changed
    monkeypatch.setattr(images_module, "RESIZE_RECIPE", "another-resize")
    assert compute_image_key(items, 8) not in (key, changed)


def test_store_decodes_once_matches_direct_decoding_and_refreshes_stale_files(tmp_path):
    items = make_items(tmp_path / "data", 6)
    direct, kept = decode_items(items, 8)
    assert kept == list(range(6))
    store = ImageStore(items, 8, tmp_path / "cache")
    first = store.load(items[1:4])
    np.testing.assert_array_equal(np.asarray(first.images), direct[1:4])
    again = ImageStore(items, 8, tmp_path / "cache")  # another cell: every row already there
    assert again.rows.fill([np.arange(6)], lambda rows: pytest.fail("decoded twice")) == 0
    picked = again.load([items[5], items[0]])
    np.testing.assert_array_equal(picked.images[0:2], direct[[5, 0]])
    np.testing.assert_array_equal(picked.images[1], direct[0])
    in_memory = again.load(items[:2], in_memory=True).images
    assert isinstance(in_memory, np.ndarray) and in_memory.flags.writeable
    write_image(Path(items[2].path), seed=50, size=12)
    fresh = ImageStore(items, 8, tmp_path / "cache")
    assert fresh.key != store.key
    np.testing.assert_array_equal(
        np.asarray(fresh.load([items[2]]).images)[0], decode_items([items[2]], 8)[0][0]
    )


def test_official_train_images_are_decoded_only_when_asked_for(tmp_path):
    items = make_items(tmp_path / "data", 6, splits=("train", "test"))
    store = ImageStore(items, 8, tmp_path / "cache")
    store.load([items[1]])  # a test image: every non-train image is decoded with it
    states = store.rows.states(np.arange(6))
    assert states.tolist() == [0, 1, 0, 1, 0, 1]
    store.load([items[2]])
    assert store.rows.states(np.arange(6)).tolist() == [0, 1, 1, 1, 0, 1]


def test_unreadable_images_fail_by_name_or_are_skipped(tmp_path):
    items = make_items(tmp_path / "data", 3)
    Path(items[1].path).write_bytes(b"not an image")
    store = ImageStore(items, 8, tmp_path / "cache")
    with pytest.raises(ImageError, match="img_01.png"):
        store.load(items)
    decoded = store.load(items, skip_unreadable=True)
    assert decoded.kept == [0, 2] and len(decoded.images) == 2
    with pytest.raises(ImageError, match="img_01.png"):
        ImageStore(items, 8, None).load(items)


def test_text_feature_key_sees_backbone_and_prompt_text(tmp_path, monkeypatch):
    calls = []

    class Model(torch.nn.Module):
        def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
            calls.append(len(tokens))
            return tokens.float()

    def tokenizer(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(text), text.count("a") + 1.0] for text in texts])

    monkeypatch.setattr(features_module, "_TEXT_FEATURES", {})
    device, model = torch.device("cpu"), Model()

    def features(identity: str, texts: list[list[str]]) -> torch.Tensor:
        return cached_text_features(model, tokenizer, texts, device, identity, tmp_path)

    first = features("model-a", [["a cat"], ["a dog"]])
    assert features("model-a", [["a cat"], ["a dog"]]).equal(first) and len(calls) == 1
    features("model-b", [["a cat"], ["a dog"]])
    features("model-a", [["a cat"], ["a dog", "one more"]])
    assert len(calls) == 3
    monkeypatch.setattr(features_module, "_TEXT_FEATURES", {})  # a new process: read from disk
    assert features("model-a", [["a cat"], ["a dog"]]).equal(first) and len(calls) == 3
    assert not features("model-a", [["a cat"], ["a dog"]]).requires_grad


def test_image_features_once_per_image_and_keyed_by_encoder(tmp_path):
    items = make_items(tmp_path / "data", 8, splits=("train", "", "", ""))
    encoded = []

    def encode(images) -> torch.Tensor:
        array = np.asarray(images, dtype=np.float32)
        encoded.append(len(array))
        return torch.from_numpy(array.reshape(len(array), -1)[:, :4].copy())

    store = ImageStore(items, 8, tmp_path / "cache")
    a = load_image_features(image_set(store, items[:3]), encode, "enc-1", 4, tmp_path / "cache")
    b = load_image_features(image_set(store, items[2:6]), encode, "enc-1", 4, tmp_path / "cache")
    eager, train_rows = 6, 2  # rows 1-3, 5-7 at once; train rows 0 and 4 one by one, on demand
    assert sum(encoded) == eager + train_rows and a[2].equal(b[0])
    load_image_features(image_set(store, items), encode, "enc-1", 4, tmp_path / "cache")
    assert sum(encoded) == 8
    load_image_features(image_set(store, items[:1]), encode, "enc-2", 4, tmp_path / "cache")
    assert sum(encoded) == 8 + eager + 1


def test_cached_features_equal_fresh_ones_bit_for_bit(tmp_path):
    """The tiny model is not batch-invariant (small batches round differently), so this holds
    only because every row is encoded in the same batch whichever run fills it first."""
    items = make_items(tmp_path / "data", 12, splits=("train", "", ""))
    node = CfgNode({"NAME": "tiny-vit", "PRETRAINED": "", "HF_HUB": ""})
    bundle = build_clip(node)

    def encode(images) -> torch.Tensor:
        with torch.inference_mode():
            batch = to_model_input(np.asarray(images), bundle.mean, bundle.std, torch.device("cpu"))
            return bundle.model.encode_image(batch).clone()

    def features(cache: Path, subsets: list[list[Item]]) -> torch.Tensor:
        store = ImageStore(items, 64, cache)
        return [load_image_features(image_set(store, s), encode, "tiny", 5, cache) for s in subsets]

    warm = features(tmp_path / "warm", [items[3:9], items[:5]])[1]
    fresh = features(tmp_path / "fresh", [items[:5]])[0]
    assert torch.equal(warm, fresh)


def _fill_worker(items: list[Item], cache: Path, queue) -> None:
    store = ImageStore(items, 8, cache)
    store.ensure(np.arange(len(items)))
    queue.put(int(store.rows.fill([np.arange(len(items))], lambda rows: (None, None))))


def _read_worker(items: list[Item], cache: Path, expected: np.ndarray, queue) -> None:
    """Poll the store while others fill it: every row marked filled must be whole and right."""
    store, checked, deadline = ImageStore(items, 8, cache), 0, time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:  # until every row is filled (the guard only ends a hang)
        states = store.rows.states(np.arange(len(items)))
        filled = np.flatnonzero(states == 1)
        if len(filled):
            np.testing.assert_array_equal(store.rows.read(filled), expected[filled])
            checked += 1
        if len(filled) == len(items):
            break
    queue.put(checked)


def test_concurrent_workers_fill_one_store_once_and_readers_see_whole_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(images_module, "CHUNK_ROWS", 4)  # several locked steps to interleave
    items = make_items(tmp_path / "data", 24)
    expected = decode_items(items, 8)[0]
    cache, queue = tmp_path / "cache", CONTEXT.Queue()
    workers = [CONTEXT.Process(target=_fill_worker, args=(items, cache, queue)) for _ in range(4)]
    reader = CONTEXT.Process(target=_read_worker, args=(items, cache, expected, queue))
    for process in [reader, *workers]:
        process.start()
    for process in [reader, *workers]:
        process.join(HANG_GUARD)
        assert process.exitcode == 0
    assert sorted(queue.get(timeout=5) for _ in range(5))[-1] >= 1  # the reader checked rows
    np.testing.assert_array_equal(
        np.asarray(ImageStore(items, 8, cache).load(items).images), expected
    )
    leftovers = [p.name for p in (cache / "images").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def _write_features(cache: Path, value: float, queue) -> None:
    for round_index in range(40):  # every writer races the others on each new key
        load_or_compute_features(cache, f"key-{round_index}", lambda: torch.full((256, 64), value))
    queue.put(True)


def test_concurrent_writers_of_one_feature_file_never_expose_half_a_file(tmp_path):
    queue = CONTEXT.Queue()
    writers = [
        CONTEXT.Process(target=_write_features, args=(tmp_path, float(i), queue)) for i in range(3)
    ]
    for process in writers:
        process.start()
    reads = 0
    while any(process.is_alive() for process in writers) or reads == 0:
        for path in (tmp_path / "features").glob("key-*.npz"):
            array = read_feature_file(path, path.stem).numpy()  # whole, from one writer:
            # one shape, one value
            assert array.shape == (256, 64) and (array == array[0, 0]).all()
            reads += 1
    for process in writers:
        process.join(30)
        assert process.exitcode == 0
    assert len(list((tmp_path / "features").glob("key-*.npz"))) == 40
    assert not list((tmp_path / "features").glob("*.tmp"))


def test_image_views_batches_and_training_images_hold_no_copies(tmp_path):
    items = make_items(tmp_path / "data", 7)
    store = ImageStore(items, 8, tmp_path / "cache")
    view = store.load([items[i] for i in (6, 1, 3, 0, 2)]).images
    assert isinstance(view, ImageRows) and view.shape == (5, 8, 8, 3)
    full = np.asarray(view)
    np.testing.assert_array_equal(view[np.array([4, 0])], full[[4, 0]])
    batches = list(iterate_image_batches(view, 2, torch.device("cpu")))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(torch.cat(batches).numpy(), full)
    training = store.load(items[:3], in_memory=True).images
    held = hold_training_images(training, torch.device("cpu"), 1024)
    assert held.data_ptr() == training.ctypes.data  # the same memory, not a second copy


def test_model_input_equals_torchvision_normalisation_in_both_layouts():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 10, 10, 3), dtype=np.uint8)
    mean, std = (0.48, 0.45, 0.40), (0.26, 0.26, 0.27)
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])
    reference = torch.stack([pipeline(Image.fromarray(image)) for image in pixels])
    for channels_last in (False, True):
        ours = to_model_input(pixels, mean, std, torch.device("cpu"), channels_last)
        assert torch.equal(ours, reference)
        assert ours.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )


def test_cached_run_and_uncached_run_give_identical_metrics(tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, 10, 48, ["center_a", "center_b"], 0)
    common = ["DATASET.ROOT", str(root), "DATASET.SYNTHETIC.CENTERS", "center_a,center_b"]
    common += ["DATASET.TARGET_CENTERS", "center_b", "DATASET.NUM_SHOTS", "2"]
    common += ["OPTIM.MAX_ITERS", "2", "EVAL.BATCH_SIZE", "16"]

    def run(recipe: str, cache: str, output: str, seed: int) -> dict:
        opts = [*common, "CACHE_DIR", cache, "OUTPUT_DIR", str(tmp_path / output)]
        opts += ["SEED", str(seed), "DATASET.SPLIT_SEED", str(seed)]
        cfg = build_config(
            f"configs/trainers/{recipe}.yaml", "configs/datasets/synthetic.yaml", opts
        )
        result = execute_run(cfg)
        assert result["status"] == "complete", result.get("traceback")
        return result

    warm_cache = str(tmp_path / "warm")
    for recipe in ("linear_probe", "clip_lora"):
        run(recipe, warm_cache, "warm-up", seed=2)  # another seed fills the caches first
        cached = run(recipe, warm_cache, "cached", seed=1)
        fresh = run(recipe, str(tmp_path / f"fresh-{recipe}"), "fresh", seed=1)
        assert cached["timings"]["decoding_seconds"] == 0.0  # nothing decoded again
        assert fresh["timings"]["decoding_seconds"] > 0.0
        assert cached["metrics"] == fresh["metrics"]


def write_wide_image(path: Path, seed: int, height: int, width: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def test_store_size_keeps_the_larger_centre_square_and_evaluation_is_its_fixed_resize(tmp_path):
    paths = [write_wide_image(tmp_path / f"w{i}.png", i, 30, 40) for i in range(3)]
    items = [Item(str(p), i % 2, "c") for i, p in enumerate(paths)]
    small = ImageStore(items, 8, tmp_path / "cache")  # STORE_SIZE 0: today's 8-px centre crop
    native = ImageStore(items, 8, tmp_path / "cache", store_size=24)
    assert native.key != small.key and native.input_key != native.key
    assert ImageStore(items, 8, tmp_path / "cache", 8).key == small.key  # same pixels, same key
    assert ImageStore(items, 8, tmp_path / "cache", 20).key not in (small.key, native.key)
    training = native.load(items, in_memory=True).images  # what random crops are cut from
    assert training.shape == (3, 24, 24, 3)
    with Image.open(paths[0]) as image:  # short side 30 -> 24, centre 24 x 24 of 24 x 32
        expected = np.asarray(
            image.convert("RGB").resize((32, 24), Image.Resampling.BICUBIC).crop((4, 0, 28, 24))
        )
    np.testing.assert_array_equal(training[0], expected)
    evaluation = native.load(items).images
    assert evaluation.shape == (3, 8, 8, 3)
    first, second = np.asarray(evaluation), np.asarray(native.load(items).images)
    np.testing.assert_array_equal(first, second)  # deterministic
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(training).permute(0, 3, 1, 2).float(), size=(8, 8), mode="bicubic",
        antialias=True,
    ).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # fmt: skip
    np.testing.assert_array_equal(first, resized)
    np.testing.assert_array_equal(native.read(np.arange(3)), resized)  # what encoders see
    np.testing.assert_array_equal(np.asarray(evaluation.stored()), training)
    np.testing.assert_array_equal(np.asarray(small.load(items).images), decode_items(items, 8)[0])


def test_store_size_below_the_input_fails_before_decoding(tmp_path, monkeypatch):
    from fewclip.config import ConfigError

    items = make_items(tmp_path / "data", 2)
    monkeypatch.setattr(images_module, "decode_paths", lambda *a: pytest.fail("decoded"))
    with pytest.raises(ConfigError, match="INPUT.STORE_SIZE 6 is smaller than the model input 8"):
        ImageStore(items, 8, tmp_path / "cache", store_size=6)
    assert not (tmp_path / "cache").exists()


def test_frozen_features_are_keyed_by_the_store_size(tmp_path):
    items = make_items(tmp_path / "data", 4)
    seen = []

    def encode(images) -> torch.Tensor:
        array = np.asarray(images, dtype=np.float32)
        seen.append(array.shape[1:])
        return torch.from_numpy(array.reshape(len(array), -1)[:, :4].copy())

    for size in (0, 16):
        store = ImageStore(items, 8, tmp_path / "cache", store_size=size)
        load_image_features(image_set(store, items), encode, "enc", 4, tmp_path / "cache")
    assert seen == [(8, 8, 3), (8, 8, 3)]  # encoded twice (two keys), always at the input size
    assert len(list((tmp_path / "cache" / "features").glob("*.lock"))) == 2
