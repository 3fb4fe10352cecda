"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and avoids 100x slowdowns from OpenMP spinning on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A randomly initialised 4-class bcos_cifar_resnet20 (seed 0) saved as gte's model.safetensors."""
    from gte.models import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(build_model("bcos_cifar_resnet20", 4), path)
    return path
