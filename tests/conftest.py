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


# the demo at the suite's scale (tests/test_demo_e2e.py runs the README's `gte distill` with these overrides): its
# shards and its README-scale teacher are made once per session in `demo_home` and reused by the demo-scale tests
DEMO_SCALE = ["optim.epochs=3", "demo.n_distill=1000", "demo.n_test=500", "demo.teacher_epochs=4"]


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A GTE_HOME shared by the tests that run the demo at :data:`DEMO_SCALE` (empty until the first one runs)."""
    return tmp_path_factory.mktemp("demo-home")


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory):
    """A randomly initialised 4-class bcos_cifar_resnet20 (seed 0) saved as gte's model.safetensors."""
    from gte.models import build_model, save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(build_model("bcos_cifar_resnet20", 4), path)
    return path
