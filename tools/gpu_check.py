"""The GPU check: throughput, memory, bf16 agreement and reproducibility, in one command.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/gpu_check.py          # CUDA: under 5 minutes
    HF_HUB_OFFLINE=1 .venv/bin/python tools/gpu_check.py --cpu    # CPU, small sizes (CI)

For ViT-B/16 (random weights, the real architecture; skipped with --cpu) and tiny-vit:
evaluation images/s through fewclip's path (prefetched uint8 batches -> to_model_input ->
encode_image under autocast_context) against the bare forward on a ready device tensor, in fp32
and bf16; LoRA training images/s through fewclip's path (training images held by
hold_training_images -> to_model_input -> step) against the bare step; peak GPU memory; bf16 vs
fp32 agreement (min cosine of image features >= COSINE_TOLERANCE and the same argmax on >= 95%
of the images); then a 2-seed CLIP-LoRA sweep on synthetic data run twice must give identical
metrics. It prints which never-run GPU paths it reached: bf16 autocast, pinned-memory prefetch,
device-held training images (on CPU none can be; bf16 autocast then runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewclip.backbones import build_clip
from fewclip.config import build_config
from fewclip.features import autocast_context
from fewclip.images import hold_training_images, iterate_image_batches, to_model_input
from fewclip.lora import apply_lora
from fewclip.registry import load_installed_plugins
from fewclip.sweep import build_sweep, run_cells

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "trainers" / "clip_lora.yaml"
SYNTHETIC = ROOT / "configs" / "datasets" / "synthetic.yaml"
COSINE_TOLERANCE = 0.99  # bf16 vs fp32 image features, per image
ARGMAX_AGREEMENT = 0.95  # bf16 vs fp32 predicted class, fraction of images
REACHED = {"bf16 autocast on CUDA": False, "pinned-memory prefetch": False}
REACHED["device-held images"] = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, count: int, repeats: int, device: torch.device) -> float:
    """Best of `repeats` timed calls of `step()` (after one warm-up), as `count` images/s."""
    step()
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        step()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return count / best


def count_pinned_reads() -> list[int]:
    """Count Tensor.pin_memory calls (the prefetch thread's) from now on."""
    calls = [0]
    original = torch.Tensor.pin_memory

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    torch.Tensor.pin_memory = counting
    return calls


def check_model(name: str, device: torch.device, batch: int, batches: int, repeats: int) -> dict:
    cfg = build_config(RECIPE, SYNTHETIC, ["MODEL.NAME", name, "LORA.ENCODER", "vision"])
    bundle = build_clip(cfg.MODEL)
    model = bundle.model.to(device)
    size, count = bundle.image_size, batch * batches
    images = np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    ready = to_model_input(images[:batch], bundle.mean, bundle.std, device)
    tokens = bundle.tokenizer([f"a photo of class {index}" for index in range(4)]).to(device)
    with torch.no_grad():  # not inference_mode: the training step multiplies by these
        text = F.normalize(model.encode_text(tokens), dim=-1)
    result: dict = {"model": name}
    features: dict[str, torch.Tensor] = {}
    pinned = count_pinned_reads()
    stats = (bundle.mean, bundle.std)
    for precision in ("fp32", "bf16"):

        def evaluate(precision: str = precision) -> torch.Tensor:
            outputs = []
            with torch.inference_mode(), autocast_context(device, precision):
                on_cuda = device.type == "cuda" and torch.is_autocast_enabled("cuda")
                REACHED["bf16 autocast on CUDA"] |= on_cuda
                for uint8 in iterate_image_batches(images, batch, device):
                    outputs.append(model.encode_image(to_model_input(uint8, *stats, device)))
            return torch.cat(outputs).float()

        def bare(precision: str = precision) -> None:
            with torch.inference_mode(), autocast_context(device, precision):
                for _ in range(batches):
                    model.encode_image(ready)

        result[f"eval {precision} images/s"] = images_per_second(evaluate, count, repeats, device)
        result[f"bare {precision} images/s"] = images_per_second(bare, count, repeats, device)
        features[precision] = F.normalize(evaluate(), dim=-1)
    REACHED["pinned-memory prefetch"] |= pinned[0] > 0
    cosine = (features["fp32"] * features["bf16"]).sum(-1)
    fp32_class = (features["fp32"] @ text.float().T).argmax(-1)
    bf16_class = (features["bf16"] @ text.float().T).argmax(-1)
    result["bf16 min cosine"] = float(cosine.min())
    result["bf16 argmax agreement"] = float((fp32_class == bf16_class).float().mean())
    result["bf16 agrees"] = (
        result["bf16 min cosine"] >= COSINE_TOLERANCE
        and result["bf16 argmax agreement"] >= ARGMAX_AGREEMENT
    )
    result.update(check_training(model, bundle, cfg, images[:batch], text, device, repeats))
    if device.type == "cuda":
        result["peak GPU MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return result


def check_training(model, bundle, cfg, images, text, device, repeats) -> dict:
    """LoRA training images/s: fewclip's held images -> to_model_input -> step, vs the bare step."""
    apply_lora(model, cfg.LORA)
    model.train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    labels = torch.arange(len(images), device=device) % text.shape[0]
    held = hold_training_images(images, device, cfg.PERF.DEVICE_IMAGES_MB)
    REACHED["device-held images"] |= held.device.type == "cuda"
    ready = to_model_input(held, bundle.mean, bundle.std, device)

    def step(inputs: torch.Tensor) -> None:
        with autocast_context(device, "auto"):
            logits = 100.0 * F.normalize(model.encode_image(inputs), dim=-1) @ text.float().T
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def toolkit() -> None:
        step(to_model_input(held, bundle.mean, bundle.std, device))

    count = len(images)
    return {
        "train images/s": images_per_second(toolkit, count, repeats, device),
        "bare train images/s": images_per_second(lambda: step(ready), count, repeats, device),
    }


def check_reproducible(work: Path, opts: list[str]) -> bool:
    """A 2-seed CLIP-LoRA sweep, twice in fresh output folders (one cache): same metrics."""
    metrics = []
    for attempt in ("first", "second"):
        sweep_opts = [*opts, "OUTPUT_DIR", str(work / attempt), "CACHE_DIR", str(work / "cache")]
        sweep = build_sweep(None, [str(SYNTHETIC)], [str(RECIPE)], [1], [1, 2], sweep_opts)
        results = run_cells(sweep.cells)
        if any(result.get("status") != "complete" for result in results):
            raise SystemExit(f"the CLIP-LoRA sweep failed: {[r.get('error') for r in results]}")
        metrics.append([json.dumps(result["metrics"], sort_keys=True) for result in results])
    return metrics[0] == metrics[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="CPU, small sizes (auto without CUDA)")
    parser.add_argument("--batch", type=int, default=0, help="batch (default 256; --cpu 8)")
    args = parser.parse_args()
    load_installed_plugins()
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    batch = args.batch or (256 if cuda else 8)
    batches, repeats = (4, 3) if cuda else (2, 1)
    models = ["ViT-B-16", "tiny-vit"] if cuda else ["tiny-vit"]
    print(f"device {device} ({torch.cuda.get_device_name(device) if cuda else 'no CUDA'}), "
          f"torch {torch.__version__}, batch {batch}")  # fmt: skip
    passed = True
    for name in models:
        result = check_model(name, device, batch, batches, repeats)
        for precision in ("fp32", "bf16"):
            toolkit, bare = (
                result[f"eval {precision} images/s"],
                result[f"bare {precision} images/s"],
            )
            print(f"{name} eval {precision}: {toolkit:.1f} images/s, bare forward {bare:.1f}:"
                  f" {toolkit / bare:.2f}x")  # fmt: skip
        train, bare = result["train images/s"], result["bare train images/s"]
        print(
            f"{name} LoRA training: {train:.1f} images/s, bare step {bare:.1f}: {train / bare:.2f}x"
        )
        if "peak GPU MiB" in result:
            print(f"{name} peak GPU memory: {result['peak GPU MiB']:.0f} MiB")
        print(f"{name} bf16 vs fp32: min cosine {result['bf16 min cosine']:.4f} (>= "
              f"{COSINE_TOLERANCE}), argmax agreement {result['bf16 argmax agreement']:.3f} (>= "
              f"{ARGMAX_AGREEMENT}): {'ok' if result['bf16 agrees'] else 'FAIL'}")  # fmt: skip
        passed &= result["bf16 agrees"]
    opts = ["MODEL.NAME", "tiny-vit", "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12" if cuda else "6"]
    opts += ["OPTIM.MAX_ITERS", "20" if cuda else "2", "OPTIM.BATCH_SIZE", "8"]
    with tempfile.TemporaryDirectory(prefix="fewclip-gpu-check-") as work:
        same = check_reproducible(Path(work), opts)
    print(f"2-seed CLIP-LoRA sweep run twice: {'same metrics' if same else 'DIFFERENT metrics'}")
    passed &= same
    print(
        "reached: " + ", ".join(f"{path} {'yes' if hit else 'no'}" for path, hit in REACHED.items())
    )
    print("gpu check: " + ("passed" if passed else "FAILED"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
