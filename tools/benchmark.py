"""Benchmark fewclip's pipeline against a plain reference loop, in one run, and print the ratios.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark.py            # tiny model + ViT-B/16
    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark.py --skip-vit # tiny model only (~3 min)
    HF_HUB_OFFLINE=1 .venv/bin/python tools/benchmark.py --families # + every family's twins

The reference is what a one-off script does: decode each JPEG with PIL and torchvision transforms
in a DataLoader every step, recompute the (frozen) text features every step, evaluate through a
DataLoader over the image files, re-encode images for frozen-encoder methods in every cell.
Every measurement runs in its own process, so peak memory (VmHWM) is per measurement; throughput
is the best of --repeats interleaved runs (robust to a busy machine). Data are generated JPEGs
(tiny model: 96 px -> 64; ViT-B/16 with random weights: 288 px -> 224). LoRA runs use
LORA.ENCODER vision (frozen text tower), so per-step text encoding is pure reference overhead.
--families adds the same throughput rows for each model family's twin (fewclip/twins.py): the
tiny twins, and unless --skip-vit the twins at the real models' size with random weights
(BiomedCLIP's ViT-B/16 + BERT-base, openai/clip-vit-base-patch16, RN50).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `tools.benchmark_reference` (tools/ is not installed)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fewclip.registry import load_installed_plugins  # noqa: E402
from tools.benchmark_reference import (  # noqa: E402
    evaluation_pass,
    make_jpeg_dataset,
    reference_sweep,
    reference_train,
)

RECIPES = ROOT / "configs" / "trainers"
# (tiny twin, the same layout at the real model's size) per family; open_clip's ViT is the
# benchmark's main model, timed here only with --families-only
FAMILY_TWINS = (
    ("tiny-vit", "ViT-B-16"),
    ("twin:timm-hf", "twin:timm-hf-base"),
    ("twin:hf-clip", "twin:hf-clip-base"),
    ("twin:resnet", "twin:resnet-base"),
)
TABLE_HEADER = "| model | measure | toolkit | reference | bare model | vs reference | vs bare |"
TABLE_RULE = "|---|---|---|---|---|---|---|"
DATASET_CONFIG = ROOT / "configs" / "datasets" / "image_folder_example.yaml"


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: anonymous and file-backed pages), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(best: dict[str, float], name: str, images: int, device: torch.device) -> Iterator[None]:
    """Keep the best images/s of `name` over repeats."""
    synchronize(device)
    tick = time.perf_counter()
    yield
    synchronize(device)
    best[name] = max(best.get(name, 0.0), images / (time.perf_counter() - tick))


def benchmark_config(spec: dict, recipe: str, opts: list[str]):
    from fewclip.config import build_config

    base = ["DATASET.ROOT", spec["root"], "MODEL.NAME", spec["model"], "LORA.ENCODER", "vision"]
    base += ["CACHE_DIR", spec["cache"], "OUTPUT_DIR", spec["output"]]
    base += ["DATASET.INSUFFICIENT_SHOTS", "take_all"]
    base += ["DATASET.TARGET_CENTERS", ",".join(spec.get("targets", [])) or "[]"]
    return build_config(RECIPES / f"{recipe}.yaml", DATASET_CONFIG, base + opts)


def load_cell(cfg) -> tuple[Any, Any, Any, torch.device, Any]:
    """Dataset, split, a fresh backbone, the device and the sweep's decoded-image store."""
    from fewclip.images import ImageStore, compute_store_items
    from fewclip.registry import DATASETS
    from fewclip.run import load_clip, select_device
    from fewclip.splits import build_split

    dataset = DATASETS.get(cfg.DATASET.NAME)(cfg)
    split = build_split(dataset, cfg)
    bundle = load_clip(cfg)
    used = [*split.train, *split.val, *split.test, *sum(split.targets.values(), [])]
    store = ImageStore(compute_store_items(dataset.items, used), bundle.image_size, cfg.CACHE_DIR)
    return dataset, split, bundle, select_device(cfg.DEVICE), store


def child_throughput(spec: dict) -> dict:
    """Training and evaluation images/s: toolkit, reference loop and the bare model forward."""
    from fewclip.images import to_model_input
    from fewclip.lora import apply_lora
    from fewclip.registry import TRAINERS
    from fewclip.run import build_image_set, load_clip

    steps, batch = spec["steps"], spec["batch"]
    opts = ["OPTIM.MAX_ITERS", str(steps), "OPTIM.BATCH_SIZE", str(batch)]
    opts += ["DATASET.NUM_SHOTS", str(spec["shots"]), "EVAL.BATCH_SIZE", str(spec["eval_batch"])]
    opts += ["PERF.CHANNELS_LAST", str(spec.get("channels_last", False))]
    cfg = benchmark_config(spec, "clip_lora", opts)
    dataset, split, bundle, device, store = load_cell(cfg)
    train = build_image_set(split.train, bundle.image_size, cfg, store, in_memory=True)
    pool = [*split.test, *sum(split.targets.values(), []), *split.val, *split.train]
    evaluation = build_image_set(pool[: spec["eval_images"]], bundle.image_size, cfg, store)
    bare_inputs = to_model_input(np.asarray(evaluation.images), bundle.mean, bundle.std, device)
    texts, used = dataset.prompts.texts("label"), steps * min(batch, len(train))
    best: dict[str, float] = {}
    for repeat in range(spec["repeats"]):
        trainer = TRAINERS.get("CLIPLoRA")(cfg, load_clip(cfg), dataset, device)
        with timed(best, "train_toolkit", used, device):
            trainer.fit(train, None)
        reference = load_clip(cfg).model
        apply_lora(reference, cfg.LORA)
        reference.to(device)
        with timed(best, "train_reference", used, device):
            reference_train(reference, bundle, texts, split.train, steps, batch, spec)
        trainer.clip.eval()
        names = ["eval_bare", "eval_toolkit", "eval_reference"]
        for name in names[repeat % 3 :] + names[: repeat % 3]:  # no variant always goes first
            with timed(best, name, len(evaluation), device):
                evaluation_pass(name, trainer, evaluation, bare_inputs, bundle, texts, spec)
    return best


def child_model_step(spec: dict) -> dict:
    """The model's own LoRA training steps on an in-memory batch: the memory floor."""
    from fewclip.backbones import build_clip
    from fewclip.config import get_cfg_defaults
    from fewclip.features import autocast_context, compute_text_features
    from fewclip.lora import apply_lora
    from fewclip.prompts import build_default_prompts

    cfg = get_cfg_defaults()
    cfg.MODEL.NAME, cfg.LORA.ENCODER = spec["model"], "vision"
    cfg.LORA.TARGETS, cfg.LORA.RANK = ["q", "k", "v"], 2  # configs/trainers/clip_lora.yaml
    bundle = build_clip(cfg.MODEL)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = bundle.model
    apply_lora(model, cfg.LORA)
    model.to(device).train()
    texts = build_default_prompts([f"class {i}" for i in range(4)]).texts("label")
    images = torch.randn(spec["batch"], 3, bundle.image_size, bundle.image_size, device=device)
    labels = torch.arange(spec["batch"], device=device) % 4
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tick = time.perf_counter()
    for _ in range(spec["steps"]):
        with torch.no_grad():
            text = compute_text_features(model, bundle.tokenizer, texts, device)
        with autocast_context(device, "auto"):
            features = F.normalize(model.encode_image(images), dim=-1)
            logits = (model.logit_scale.exp().detach() * features @ text.t()).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return {"train_images_per_second": spec["steps"] * spec["batch"] / (time.perf_counter() - tick)}


def child_toolkit_run(spec: dict) -> dict:
    """A whole LoRA cell through `execute_run` (decode, train, validate, test)."""
    from fewclip.run import execute_run

    opts = ["OPTIM.MAX_ITERS", str(spec["steps"]), "OPTIM.BATCH_SIZE", str(spec["batch"])]
    opts += ["DATASET.NUM_SHOTS", str(spec["shots"])]
    result = execute_run(benchmark_config(spec, "clip_lora", opts))
    if result["status"] != "complete":
        raise RuntimeError(result.get("traceback") or result.get("error"))
    train_seconds = result["timings"]["train_seconds"]
    return {
        "timings": result["timings"],
        "train_images_per_second": spec["steps"] * spec["batch"] / train_seconds,
    }


def child_sweep(spec: dict) -> dict:
    """shots x seeds x (zero-shot, linear probe, LoRA) cells; image-encoder calls are counted."""
    from fewclip.run import _MODEL_CACHE, execute_run, load_clip

    encoded = {"count": 0}
    load_clip(benchmark_config(spec, "zeroshot", []))  # the pristine model every cell copies
    for bundle in _MODEL_CACHE.values():  # hooks travel with the copies
        bundle.model.visual.register_forward_hook(
            lambda module, inputs, output: encoded.__setitem__(
                "count", encoded["count"] + len(output)
            )
        )
    cells, encoder_images, started = [], {}, time.perf_counter()
    for recipe in ("zeroshot", "linear_probe", "clip_lora"):
        before = encoded["count"]
        for shots in spec["shots"]:
            for seed in spec["seeds"]:
                opts = ["DATASET.NUM_SHOTS", str(shots), "SEED", str(seed)]
                opts += ["DATASET.SPLIT_SEED", str(seed), "OPTIM.MAX_ITERS", str(spec["steps"])]
                result = execute_run(benchmark_config(spec, recipe, opts))
                if result["status"] != "complete":
                    raise RuntimeError(result.get("traceback") or result.get("error"))
                cells.append({"recipe": recipe, "shots": shots, "seed": seed, **result["timings"]})
        encoder_images[recipe] = encoded["count"] - before
    return {"cells": cells, "encoder_images": encoder_images, "wall": time.perf_counter() - started}


def child_reference_sweep(spec: dict) -> dict:
    started = time.perf_counter()
    reference_sweep(spec, benchmark_config, load_cell)
    return {"wall": time.perf_counter() - started}


CHILDREN = {
    "throughput": child_throughput,
    "model_step": child_model_step,
    "toolkit_run": child_toolkit_run,
    "sweep": child_sweep,
    "reference_sweep": child_reference_sweep,
}


def run_child(name: str, spec: dict, threads: int) -> dict:
    """Run one measurement in a fresh process; return its result and peak memory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--child", name, "--spec", json.dumps(spec)]
    tick = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark step {name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name:<16} {time.perf_counter() - tick:6.1f} s", file=sys.stderr, flush=True)
    return result


def ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if numerator and denominator else "-"


def throughput_lines(model: str, result: dict) -> list[str]:
    row = "| {} | {} images/s | {:.3g} | {:.3g} | {} | {} | {} |"
    toolkit, reference, bare = result["train_toolkit"], result["train_reference"], None
    lines = [row.format(model, "training", toolkit, reference, "-", ratio(toolkit, reference), "-")]
    toolkit, reference, bare = result["eval_toolkit"], result["eval_reference"], result["eval_bare"]
    lines.append(
        row.format(
            model,
            "evaluation",
            toolkit,
            reference,
            f"{bare:.1f}",
            ratio(toolkit, reference),
            ratio(toolkit, bare),
        )
    )
    return lines


def sweep_summary(sweep: dict, reference: dict, images: int) -> tuple[list[str], dict]:
    cells = sweep["cells"]
    shares = [cell["decoding_seconds"] / cell["total_seconds"] for cell in cells]
    later = max(shares[1:])
    frozen = sweep["encoder_images"]["zeroshot"] + sweep["encoder_images"]["linear_probe"]
    lines = [
        f"- wall time of the sweep ({len(cells)} cells): toolkit {sweep['wall']:.1f} s, "
        f"reference {reference['wall']:.1f} s ({ratio(reference['wall'], sweep['wall'])} faster)",
        f"- decoding share of cell wall time: first cell {shares[0]:.1%}, later cells at most "
        f"{later:.2%} (mean {np.mean(shares[1:]):.2%})",
        f"- image-encoder forwards of the zero-shot + linear-probe cells: {frozen} images "
        f"for {images} distinct images (each encoded at most once: {frozen <= images})",
    ]
    return lines, {"later_decode_share": later, "frozen_encoder_images": frozen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-vit", action="store_true", help="tiny model only")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--repeats", type=int, default=3, help="tiny throughput repeats (best)")
    parser.add_argument("--tiny-images", type=int, default=30, help="tiny: images per class/center")
    parser.add_argument("--tiny-steps", type=int, default=20, help="tiny: timed training steps")
    parser.add_argument("--sweep-steps", type=int, default=10, help="LoRA steps per sweep cell")
    parser.add_argument("--vit-steps", type=int, default=1, help="ViT-B/16: training steps")
    parser.add_argument("--vit-eval-images", type=int, default=32, help="ViT-B/16: eval images")
    parser.add_argument("--channels-last", action="store_true", help="also time PERF.CHANNELS_LAST")
    parser.add_argument("--families", action="store_true", help="also time every family's twin")
    parser.add_argument(
        "--families-only", action="store_true", help="time only the families' twins"
    )
    parser.add_argument("--work", default="", help="folder for data and caches (default: temp)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    load_installed_plugins()
    if args.child:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        result = CHILDREN[args.child](json.loads(args.spec))
        print(json.dumps({"result": result, "peak_rss_mb": peak_rss_mb()}))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="fewclip-benchmark-"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s) per process, device {device}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"fewclip benchmark: {header}\nwork folder {work}", file=sys.stderr)
    started, report = time.perf_counter(), {"machine": header, "args": vars(args)}
    common = {"workers": args.workers, "threads": args.threads}
    tiny_root = make_jpeg_dataset(work / "tiny-data", 2, args.tiny_images, 96)
    tiny = {**common, "root": str(tiny_root), "model": "tiny-vit", "targets": ["center_1"]}
    tiny_images = 2 * 4 * args.tiny_images
    throughput = {**tiny, "steps": args.tiny_steps, "batch": 32, "shots": 8, "eval_batch": 256}
    throughput.update(eval_images=tiny_images, repeats=args.repeats)
    throughput.update(cache=str(work / "tiny-cache"), output=str(work / "tiny-out"))
    vit_root = make_jpeg_dataset(work / "vit-data", 1, 16, 288) if not args.skip_vit else None
    vit = {**common, "root": str(vit_root), "model": "ViT-B-16", "batch": 32, "shots": 8}
    vit.update(steps=args.vit_steps, cache=str(work / "vit-cache"))
    vit_throughput = {**vit, "eval_batch": 32, "eval_images": args.vit_eval_images}
    vit_throughput.update(repeats=1, output=str(work / "vit-out"))
    if not args.families_only:
        report.update(main_measurements(args, work, throughput, tiny, vit, vit_throughput))
    families = {}
    for name, base in FAMILY_TWINS if args.families or args.families_only else ():
        if name == "tiny-vit" and not args.families_only:
            continue  # measured above
        spec = {**throughput, "model": name, "output": str(work / f"out-{len(families)}")}
        families[name] = run_child("throughput", spec, args.threads)["result"]
        if not args.skip_vit:
            spec = {**vit_throughput, "model": base, "output": str(work / f"out-{len(families)}")}
            families[base] = run_child("throughput", spec, args.threads)["result"]
    report["families"] = families
    report["benchmark_seconds"] = time.perf_counter() - started
    (work / "benchmark.json").write_text(json.dumps(report, indent=1))
    if args.families_only:
        lines = [f"fewclip benchmark ({report['machine']})", "", TABLE_HEADER, TABLE_RULE]
        for name, result in families.items():
            lines += throughput_lines(name, result)
        print("\n".join(lines))
        return
    print_report(report, tiny_images)


def main_measurements(args, work: Path, throughput: dict, tiny: dict, vit: dict, vit_tp: dict):
    """The tiny model's throughput, the sweep against the reference sweep and the ViT-B/16 rows."""
    report = {"tiny": run_child("throughput", throughput, args.threads)["result"]}
    if args.channels_last:
        variant = {**throughput, "channels_last": True, "output": str(work / "tiny-out-cl")}
        report["tiny_channels_last"] = run_child("throughput", variant, args.threads)["result"]
    sweep = {**tiny, "shots": [1, 2, 4], "seeds": [1, 2, 3], "steps": args.sweep_steps}
    sweep.update(cache=str(work / "sweep-cache"), output=str(work / "sweep-out"))
    report["sweep"] = run_child("sweep", sweep, args.threads)["result"]
    report["reference_sweep"] = run_child("reference_sweep", sweep, args.threads)["result"]
    if not args.skip_vit:
        report["vit_model_step"] = run_child("model_step", vit, args.threads)
        toolkit_run = {**vit, "output": str(work / "vit-run")}
        report["vit_toolkit_run"] = run_child("toolkit_run", toolkit_run, args.threads)
        report["vit"] = run_child("throughput", vit_tp, args.threads)["result"]
    return report


def print_report(report: dict, tiny_images: int) -> None:
    lines = [f"fewclip benchmark ({report['machine']})", ""]
    lines += [TABLE_HEADER, TABLE_RULE, *throughput_lines("tiny-vit", report["tiny"])]
    if "tiny_channels_last" in report:
        lines += throughput_lines("tiny-vit channels_last", report["tiny_channels_last"])
    if "vit" in report:
        lines += throughput_lines("ViT-B-16", report["vit"])
    for name, result in report.get("families", {}).items():
        lines += throughput_lines(name, result)
    sweep_lines, sweep = sweep_summary(report["sweep"], report["reference_sweep"], tiny_images)
    lines += ["", "Sweep: tiny-vit, shots 1/2/4 x seeds 1/2/3 x zero-shot/linear probe/LoRA", ""]
    lines += sweep_lines
    checks = [
        (
            "evaluation from the decoded cache >= 90% of the bare forward (tiny-vit)",
            report["tiny"]["eval_toolkit"] / report["tiny"]["eval_bare"] >= 0.9,
        ),
        (
            "cells after the first spend < 5% of their wall time decoding",
            sweep["later_decode_share"] < 0.05,
        ),
        (
            "frozen-encoder cells encode each image at most once per sweep",
            sweep["frozen_encoder_images"] <= tiny_images,
        ),
    ]
    if "vit" in report:
        run, step = report["vit_toolkit_run"], report["vit_model_step"]
        memory = run["peak_rss_mb"] / step["peak_rss_mb"]
        lines += [
            "",
            f"ViT-B-16 LoRA at batch 32: peak memory of a whole run {run['peak_rss_mb']:.0f} MB, "
            f"of the model's own training step {step['peak_rss_mb']:.0f} MB ({memory:.2f}x); "
            f"training images/s in the run {run['result']['train_images_per_second']:.2f}, "
            f"model step alone {step['result']['train_images_per_second']:.2f}",
        ]
        checks.append(
            (
                "evaluation from the decoded cache >= 90% of the bare forward (ViT-B-16)",
                report["vit"]["eval_toolkit"] / report["vit"]["eval_bare"] >= 0.9,
            )
        )
        checks.append(("peak memory of a ViT-B/16 LoRA run <= 1.2x the model step", memory <= 1.2))
    lines += ["", "Targets:", *[f"- [{'x' if ok else ' '}] {name}" for name, ok in checks]]
    lines += ["", f"(benchmark wall time {report['benchmark_seconds'] / 60:.1f} min)"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
