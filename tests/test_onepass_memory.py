"""What the one-pass e2KD step keeps in memory (gte.onepass, gte.bcos_grads), from the torch profiler's CPU allocation
events, on a small B-cos network whose activations outweigh its parameters (the exact gradient itself is tested in
test_exact_gradient.py)."""

import json

import pytest
import torch

from gte.losses import explanation_loss, kd_loss
from gte.onepass import fused_layers, logits_and_explanation
from tests.test_onepass import PooledBcos

pytestmark = pytest.mark.usefixtures("one_thread")


def _peak_mib(step, trace) -> float:
    """Peak CPU memory allocated during ``step()`` above what was allocated when it began (MiB)."""
    step()  # warm: one-off allocations are not the step's
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in events) - start) / 2**20


def test_average_pool_keeps_no_input():
    """Its input gradient needs the input's shape only; autograd's avg_pool2d kept the whole tensor (the first B-cos
    ResNet pool's: 49 MiB at 224², batch 16), in the KD step and in e2KD's."""
    model = PooledBcos().train()
    x = torch.rand(2, 6, 16, 16)
    entering, saved = [], set()
    model[2].register_forward_pre_hook(lambda m, args: entering.append(args[0]))

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with fused_layers(model):
            model(x)
        logits_and_explanation(model, x, torch.zeros(2, dtype=torch.long))
    assert len(entering) == 2 and not {t.untyped_storage().data_ptr() for t in entering} & saved


def test_e2kd_step_holds_few_activations_more_than_kd(tmp_path):
    """At its peak — the final backward through the first layer — the e2KD step holds, beyond the KD step's tensors,
    that layer's input gradient and two output gradients, the maps and their gradient, and W(x)'s kept gradients (one
    per layer, the first at the pooled size): measured 3.2 first-layer activations here. Before the scaling and its
    batch norm became one double-backward node and pools passed recipes: 6.3."""
    torch.manual_seed(0)
    model = PooledBcos(64).train()
    x, t_logits = torch.rand(16, 6, 64, 64), torch.randn(16, 10)  # 4 slices of the first layer (gte.bcos_grads)
    t_maps = torch.randn_like(x)

    def kd():
        with fused_layers(model):
            kd_loss(model(x), t_logits, 1.0).backward()
        model.zero_grad(set_to_none=True)

    def e2kd():
        logits, maps = logits_and_explanation(model, x, t_logits.argmax(1))
        (kd_loss(logits, t_logits, 1.0) + explanation_loss(maps, t_maps)).backward()
        model.zero_grad(set_to_none=True)

    activation = x[:, :1].numel() * 64 * 4 / 2**20  # the first layer's output, MiB
    extra = (_peak_mib(e2kd, tmp_path / "e2kd.json") - _peak_mib(kd, tmp_path / "kd.json")) / activation
    assert extra <= 4.0, extra
