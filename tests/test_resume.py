"""Resuming an interrupted run from its training state, and the optional TensorBoard log."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fewclip.config import build_config, get_cfg_defaults
from fewclip.hooks import STATE_FILE, BatchStream, load_training_state, save_training_state
from fewclip.registry import TRAINERS
from fewclip.run import execute_run
from fewclip.samplers import UniformSampler
from fewclip_trainers.clip_lora import CLIPLoRA

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@TRAINERS.register()
class InterruptedCLIPLoRA(CLIPLoRA):
    """CLIP-LoRA that stops at call `interrupt_at` while `<OUTPUT_DIR>/interrupt` exists."""

    interrupt_at = 5

    @classmethod
    def config_key(cls) -> str:
        return "CLIPLORA"  # the clip_lora.yaml recipe's node

    def compute_losses(self, images, labels, indices):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.interrupt_at and (Path(self.cfg.OUTPUT_DIR) / "interrupt").exists():
            raise KeyboardInterrupt("interrupted for the test")
        return super().compute_losses(images, labels, indices)


def build(tmp_path: Path, cache: Path, output: str, *extra: str):
    return build_config(
        str(REPO / "configs" / "trainers" / "clip_lora.yaml"),
        str(REPO / "configs" / "datasets" / "synthetic.yaml"),
        [
            "OUTPUT_DIR", str(tmp_path / output), "CACHE_DIR", str(cache),
            "TRAINER.NAME", "InterruptedCLIPLoRA", "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12",
            "OPTIM.MAX_ITERS", "6", "OPTIM.BATCH_SIZE", "6", "CHECKPOINT.EVERY", "2",
            "DATASET.NUM_SHOTS", "2", *extra,
        ],
    )  # fmt: skip


def test_batch_stream_covers_epochs_and_resumes_exactly():
    labels = np.arange(7) % 3
    reference = BatchStream(UniformSampler(labels, torch.Generator().manual_seed(3), None), 3)
    expected = [next(reference) for _ in range(7)]  # 21 draws = 3 whole epochs of 7 images
    assert all(len(batch) == 3 for batch in expected)
    flat = np.concatenate(expected)
    for epoch in range(3):  # leftovers are topped up from the next epoch, none is lost
        assert sorted(flat[epoch * 7 : (epoch + 1) * 7]) == list(range(7))
    generator = torch.Generator().manual_seed(3)
    stream = BatchStream(UniformSampler(labels, generator, None), 3)
    got = [next(stream) for _ in range(3)]
    state, generator_state = stream.state_dict(), generator.get_state()
    generator2 = torch.Generator()
    generator2.set_state(generator_state)
    resumed = BatchStream(UniformSampler(labels, generator2, None), 3)
    resumed.load_state_dict(state)
    got += [next(resumed) for _ in range(4)]
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_half_written_corrupted_or_foreign_state_is_ignored(tmp_path: Path):
    path = tmp_path / STATE_FILE
    save_training_state(path, {"config_hash": "abc", "step": 4, "x": torch.arange(3)})
    loaded = load_training_state(path, "abc")
    assert loaded["step"] == 4 and torch.equal(loaded["x"], torch.arange(3))
    assert load_training_state(path, "other") is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a half-written file
    assert load_training_state(path, "abc") is None
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit
    assert load_training_state(path, "abc") is None
    assert load_training_state(tmp_path / "absent.pt", "abc") is None


@pytest.mark.slow
def test_interrupted_run_resumes_from_checkpoint_exactly(tmp_path: Path, shared_cache):
    reference = execute_run(build(tmp_path, shared_cache, "reference"))
    assert reference["status"] == "complete"
    cfg = build(tmp_path, shared_cache, "interrupted")
    (tmp_path / "interrupted").mkdir()
    (tmp_path / "interrupted" / "interrupt").touch()
    with pytest.raises(KeyboardInterrupt):  # like Ctrl-C: the run stops after step 4's state
        execute_run(cfg)
    run_dir = Path(reference["run_dir"].replace("reference", "interrupted"))
    assert load_training_state(run_dir / STATE_FILE, reference["config_hash"])["step"] == 4
    (tmp_path / "interrupted" / "interrupt").unlink()
    resumed = execute_run(cfg)
    assert resumed["status"] == "complete" and resumed["training"]["resumed_from_step"] == 4
    assert not (run_dir / STATE_FILE).exists()  # removed once training finished
    assert resumed["training"]["final_loss"] == reference["training"]["final_loss"]
    expected = load_file(Path(reference["run_dir"]) / "checkpoint.safetensors")
    got = load_file(run_dir / "checkpoint.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)
    assert resumed["metrics"]["test"]["nll"] == reference["metrics"]["test"]["nll"]


@pytest.mark.slow
def test_tensorboard_logs_losses_lr_and_validation(tmp_path: Path, shared_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = build(tmp_path, shared_cache, "tb", "TENSORBOARD", "True", "EVAL.VAL_EVERY", "3")
    result = execute_run(cfg)
    logs = EventAccumulator(str(Path(result["run_dir"]) / "tensorboard"))
    logs.Reload()
    tags = set(logs.Tags()["scalars"])
    assert {"loss/cross_entropy", "loss/total", "lr", "val/score"} <= tags
    assert [event.step for event in logs.Scalars("lr")] == list(range(6))
    assert [event.step for event in logs.Scalars("val/score")] == [3, 6]


def test_tensorboard_is_off_by_default_and_imported_lazily():
    assert get_cfg_defaults().TENSORBOARD is False
    for path in sorted((REPO / "fewclip").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [getattr(node, "module", None) or ""] + [a.name for a in node.names]
                assert not any("tensorboard" in name for name in names), path
