"""torch.distributed: two CPU processes on gloo give the single-process step and metrics."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fewclip import distributed
from fewclip.config import build_config
from fewclip.registry import load_installed_plugins
from fewclip.run import execute_run

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def run_config(tmp_path: Path, cache: Path, output: str):
    return build_config(
        str(REPO / "configs" / "trainers" / "clip_lora.yaml"),
        str(REPO / "configs" / "datasets" / "synthetic.yaml"),
        [
            "OUTPUT_DIR", str(tmp_path / output), "CACHE_DIR", str(cache),
            "DATASET.SYNTHETIC.IMAGES_PER_CLASS", "12", "DATASET.NUM_SHOTS", "2",
            "OPTIM.MAX_ITERS", "3", "OPTIM.BATCH_SIZE", "7", "OPTIM.LR", "1e-2",
            "EVAL.VAL_EVERY", "1", "LORA.DROPOUT", "0.0", "DEVICE", "cpu",
        ],
    )  # fmt: skip


def check_collectives(rank: int) -> None:
    """Uneven shards (3 + 2 rows): averaged gradients, reduced loss and gathered rows equal the
    single-process values on the whole batch."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 4, generator=generator).requires_grad_()
    features = torch.randn(5, 4, generator=generator)
    labels = torch.tensor([0, 2, 1, 1, 0])
    full_loss = F.cross_entropy(features @ weight.t(), labels)
    (full_grad,) = torch.autograd.grad(full_loss, weight)
    local_x, local_y = distributed.shard_batch(features, labels)
    assert len(local_x) == (3 if rank == 0 else 2)
    loss = F.cross_entropy(local_x @ weight.t(), local_y)
    loss.backward()
    distributed.average_gradients([weight], len(local_x), 5)
    torch.testing.assert_close(weight.grad, full_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(distributed.reduce_loss(loss, len(local_x), 5), full_loss.detach())
    rows = np.arange(14, dtype=np.float32).reshape(7, 2)
    gathered = distributed.gather_rows(lambda part: part * 2, rows)
    np.testing.assert_array_equal(gathered, rows * 2)  # 7 rows, in order, none twice
    empty = distributed.gather_rows(lambda part: part + 1, rows[:1])  # rank 1 holds 0 rows
    np.testing.assert_array_equal(empty, rows[:1] + 1)


def ddp_worker(rank: int, world_size: int, port: int, tmp_path: Path, cache: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    load_installed_plugins()  # a spawned process starts with empty registries
    assert distributed.init_from_env() and distributed.world_size() == 2
    try:
        check_collectives(rank)
        result = execute_run(run_config(tmp_path, cache, "ddp"))
        assert result["status"] == "complete", result.get("traceback")
        (tmp_path / f"rank_{rank}.json").write_text(json.dumps(result["metrics"]["test"]))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shard_range_covers_every_item_once():
    for count in range(0, 12):
        for shards in (1, 2, 3, 5):
            parts = [distributed.shard_range(count, s, shards) for s in range(shards)]
            assert parts[0][0] == 0 and parts[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [stop - start for start, stop in parts]
            assert max(sizes) - min(sizes) <= 1


def test_single_process_is_the_identity():
    assert not distributed.is_active() and distributed.is_main_process()
    assert distributed.gather_rows(lambda x: x + 1, np.zeros((3, 2))).shape == (3, 2)
    assert distributed.broadcast_from_main(5) == 5


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path: Path, shared_cache):
    single = execute_run(
        run_config(tmp_path, shared_cache, "single")
    )  # also fills the shared caches
    assert single["status"] == "complete"
    mp.spawn(ddp_worker, args=(2, free_port(), tmp_path, shared_cache), nprocs=2, join=True)
    ddp = json.loads((tmp_path / "rank_0.json").read_text())
    assert ddp == json.loads((tmp_path / "rank_1.json").read_text())  # every rank: same metrics
    run_dir = Path(single["run_dir"].replace(str(tmp_path / "single"), str(tmp_path / "ddp")))
    written = json.loads((run_dir / "results.json").read_text())  # only rank 0 wrote it
    single_losses = [entry["loss"] for entry in single["training"]["val_history"]]
    ddp_losses = [entry["loss"] for entry in written["training"]["val_history"]]
    assert len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, rel=1e-4)  # from the first step on
    test = single["metrics"]["test"]
    assert ddp["num_samples"] == test["num_samples"]  # gathered without duplicates
    assert np.sum(ddp["confusion_matrix"]) == test["num_samples"]
    assert abs(ddp["accuracy"] - test["accuracy"]) <= 1 / test["num_samples"]
    assert ddp["nll"] == pytest.approx(test["nll"], rel=1e-3)
    assert sorted(p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")) == []
