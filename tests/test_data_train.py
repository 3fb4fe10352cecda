"""gte's real training loop on shards with bad data: 1 % corrupt + a truncated tar trains; 10 % stops clearly."""

from __future__ import annotations

import json
import warnings

import pytest

import gte.train
from gte.config import from_dict
from gte.data.guard import DataWarning
from gte.errors import GteError

from _fixtures import corrupt_images, truncate_tar, write_jpeg_shards


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    """One intra-op thread: on a shared 2-core machine two threads made these steps 15× slower (0.6 s vs 9 s)."""
    import torch

    monkeypatch.setenv("GTE_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shards(root, n_bad: int) -> str:
    """101 JPEG samples in shards of 41, 41, 19; the last shard is cut inside its last sample (100 usable);
    ``n_bad`` of them corrupted (truncated JPEG files), spread over the shards."""
    spec, keys = write_jpeg_shards(root, [41, 41, 19], width=16, height=16)
    bad = [keys[i] for i in range(3, 100, 100 // n_bad)][:n_bad]
    for j in range(3):
        corrupt_images(root / f"data-{j:06d}.tar", {k for k in bad if keys.index(k) // 41 == j})
    truncate_tar(root / "data-000002.tar")
    return spec


def _recipe(tmp_path, spec):
    # batch 10 × 2 workers: each worker's range is exactly its quota, so every sample is read once (exact count)
    return from_dict({
        "data": {"train": spec, "num_classes": 4, "image_size": 16, "crop_scale": [0.6, 1.0], "num_workers": 2,
                 "shuffle_buffer": 50},
        "student": {"arch": "bcos_cifar_resnet20"},
        "distill": {"method": "ce"},
        "optim": {"epochs": 1, "batch_size": 10, "warmup_epochs": 0},
        "run": {"out": str(tmp_path / "run"), "seed": 1, "log_every": 5},
    })


def test_one_percent_corrupt_and_a_truncated_tar_train_with_the_right_count(tmp_path):
    spec = _shards(tmp_path / "d", 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = gte.train.train(_recipe(tmp_path, spec))
    assert (result.out / "model.safetensors").is_file()
    assert any(issubclass(w.category, DataWarning) and "data-000002.tar" in str(w.message) for w in caught)
    records = [json.loads(x) for x in (result.out / "metrics.jsonl").read_text().splitlines()]
    epoch = [r for r in records if "train_skipped" in r]
    assert epoch and epoch[-1]["train_skipped"] == 1


def test_ten_percent_corrupt_stops_with_a_clear_error(tmp_path):
    spec = _shards(tmp_path / "d", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(GteError, match=r"unreadable, more than data.max_bad_fraction = 1 %"):
            gte.train.train(_recipe(tmp_path, spec))
