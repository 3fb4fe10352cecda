"""gte.timm_task.E2KDTask through timm's task API: training steps, the loss against an independent computation
(pytorch-grad-cam's GradCAM, KL and CE by hand), timm's checkpoint save/resume (EMA too), normalisation, DDP, and the
README snippet. Student: gte-built timm/resnet18 (ImageNet mean/std); teacher: a plain timm mobilenetv3_small_050
with mean = std = 0.5, so un-normalising with the wrong statistics would show; 64 px (2×2 GradCAM maps)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.task import TrainingTask, load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver

from gte.models import build_model, info, to_model_input
from gte.timm_task import E2KDTask

pytestmark = pytest.mark.usefixtures("one_thread")
HALF = (0.5, 0.5, 0.5)
KEYS = {"loss", "output", "task_loss", "kd_loss", "exp_loss"}


def models(seed: int = 0, teacher_seed: int = 100) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(seed)
    student = build_model("timm/resnet18", 4)
    for m in student.modules():  # timm zero-inits each block's last BN; non-zero, so every layer gets a gradient
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    torch.manual_seed(teacher_seed)
    teacher = timm.create_model("mobilenetv3_small_050", num_classes=4, pretrained_cfg_overlay=dict(mean=HALF, std=HALF))
    return student, teacher


def batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A student-normalised batch, as timm's loader hands it over, and its labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 64, 64, generator=g)
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.randint(0, 4, (n,), generator=g)


def task_for(student, teacher, **kw) -> E2KDTask:
    kw = dict(temperature=2.0, lambda_exp=0.5, distill_loss_weight=0.7, task_loss_weight=0.3, verbose=False) | kw
    return E2KDTask(student, teacher, **kw)


def step(task: E2KDTask, opt: torch.optim.Optimizer, x, y) -> dict:
    opt.zero_grad()
    out = task(x, y)
    out["loss"].backward()
    opt.step()
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_steps_train_the_student_only(soft):
    student, teacher = models()
    task = task_for(student, teacher).train()
    assert isinstance(task, TrainingTask) and task.get_trainable_module() is student and not task.teacher.training
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
    s0, t0 = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    for i in range(3):
        x, y = batch(i)
        target = F.one_hot(y, 4) * 0.8 + 0.05 if soft else y  # Mixup-like soft targets with the default criterion
        out = step(task, opt, x, target)
        assert set(out) == KEYS and out["output"].shape == (4, 4)
        assert all(torch.isfinite(out[k]) for k in KEYS - {"output"}) and out["exp_loss"] > 0
        assert all(p.grad is None for p in teacher.parameters())
    if soft:  # −Σ y·log softmax(s)
        expect = -(target * out["output"].detach().log_softmax(1)).sum(1).mean()
        torch.testing.assert_close(out["task_loss"], expect)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t0.items())
    assert not torch.equal(s0["fc.weight"], student.fc.weight.detach())


def raw_gradcam(model, layer_name: str, x, classes, training: bool) -> torch.Tensor:
    """pytorch-grad-cam's GradCAM, ReLU(Σ_k mean_ij(∂y_c/∂A_k)·A_k), before its min-max scaling (e2KD compares the
    raw maps), bilinearly upsampled to the input size."""
    layer = model.get_submodule(layer_name)
    cam = GradCAM(model=model, target_layers=[layer])
    model.train(training)  # GradCAM puts the model in eval mode; the task's student trains (batch statistics)
    cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    acts, grads = cam.activations_and_grads.activations[0], cam.activations_and_grads.gradients[0]
    raw = np.maximum(cam.get_cam_image(x, layer, None, acts.numpy(), grads.numpy()), 0)
    cam.activations_and_grads.release()
    return F.interpolate(torch.from_numpy(raw)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)


def student_gradcam(model, x, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's logits and GradCAM at layer4 by the formula, differentiable in its parameters."""
    acts: list[torch.Tensor] = []
    hook = model.layer4.register_forward_hook(lambda m, i, o: acts.append(o))
    logits = model(x)
    hook.remove()
    (g,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), acts[0], create_graph=True)
    cam = F.relu((g.mean((2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
    return logits, F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_loss_equals_independent_computation():
    """T²·KL(p_T ‖ p_S) + λ·(1 − cos(GradCAM_S, GradCAM_T)) + w·CE, the maps from pytorch-grad-cam (values) and by
    the formula (the student's, differentiable: the task's parameter gradient must match too)."""
    student, teacher = models()
    s_ref, t_ref = copy.deepcopy(student), copy.deepcopy(teacher).requires_grad_(True)
    x, y = batch(0)
    out = task_for(student, teacher).train()(x, y)
    out["loss"].backward()

    images = x * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    x_t = (images - 0.5) / 0.5  # the teacher's own normalisation
    with torch.no_grad():
        t_logits = t_ref.eval()(x_t)
    top1 = t_logits.argmax(1)
    cam_t = raw_gradcam(t_ref, "blocks", x_t, top1, training=False)
    cam_s_pgc = raw_gradcam(copy.deepcopy(s_ref), "layer4", x, top1, training=True)
    s_logits, cam_s = student_gradcam(s_ref, x, top1)  # train mode: the task forward's batch statistics
    torch.testing.assert_close(cam_s.detach(), cam_s_pgc, rtol=1e-4, atol=1e-6)

    T = 2.0
    p_t, log_pt, log_ps = (t_logits / T).softmax(1), (t_logits / T).log_softmax(1), (s_logits / T).log_softmax(1)
    kd = T * T * (p_t * (log_pt - log_ps)).sum(1).mean()
    a, b = cam_s.flatten(1), cam_t.flatten(1)
    exp = (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-8)).mean()
    ce = -s_logits.log_softmax(1).gather(1, y[:, None]).mean()
    ref = 0.7 * kd + 0.5 * exp + 0.3 * ce
    ref.backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["output"].detach(), s_logits.detach(), **tol)
    for key, value in (("kd_loss", kd), ("exp_loss", exp), ("task_loss", ce), ("loss", ref)):
        torch.testing.assert_close(out[key].detach(), value.detach(), **tol)
    assert 0.01 < exp < 0.99  # a non-trivial explanation term on 2×2 maps
    ours, theirs = dict(student.named_parameters()), dict(s_ref.named_parameters())
    for name, p in ours.items():
        diff = (p.grad - theirs[name].grad).norm()  # second-order terms: float32 noise, ~1e-5 relative
        assert p.grad.norm() > 0 and diff <= 1e-4 * p.grad.norm(), name


def test_default_weights_are_gte_e2kd():
    """Neither weight given: KD weight 1 and no label loss (the paper's e2KD); λ and T from gte's DistillConfig."""
    task = E2KDTask(*models(), verbose=False)
    out = task(*batch(0))
    assert (task.distill_loss_weight, task.task_loss_weight) == (1.0, 0.0)
    assert (task.method.cfg.lambda_exp, task.method.cfg.temperature) == (1.0, 1.0)
    torch.testing.assert_close(out["loss"].detach(), out["kd_loss"] + out["exp_loss"])


def test_checkpoint_round_trip_through_timm(tmp_path):
    """timm's train.py: CheckpointSaver(task=...) saves, resume_task_checkpoint / load_task_ema_checkpoint restore;
    the resumed third step equals the uninterrupted one (student, optimiser, BN statistics and EMA restored)."""
    batches = [batch(i) for i in range(3)]

    def run(steps: slice, seed: int = 0, resume: Path | None = None):
        student, teacher = models(seed)  # the teacher is not in timm's checkpoint: rebuilt from its weights
        task = task_for(student, teacher).train()
        opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05, momentum=0.9)
        if resume is not None:
            assert resume_task_checkpoint(task, str(resume), optimizer=opt, log_info=False) == 2
        task.setup_ema(decay=0.5)
        if resume is not None:
            load_task_ema_checkpoint(task, str(resume))
        outs = []
        for x, y in batches[steps]:
            outs.append(step(task, opt, x, y))
            task.update_ema()
        return task, opt, outs

    full, _, outs = run(slice(0, 3))
    part, opt, _ = run(slice(0, 2))
    saver = CheckpointSaver(model=part.get_trainable_module(), optimizer=opt, task=part,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=1, metric=0.0)
    saved = torch.load(tmp_path / "last.pth.tar", weights_only=False)
    assert set(saved["state_dict"]) == set(part.get_trainable_module().state_dict())  # the student's, no teacher
    assert "state_dict_ema" in saved and "task_state" not in saved  # e2KD keeps no state beyond the student

    resumed, _, (last,) = run(slice(2, 3), seed=1, resume=tmp_path / "last.pth.tar")
    assert torch.equal(last["loss"], outs[-1]["loss"])
    for module in ("get_trainable_module", "get_eval_model"):
        ours, theirs = getattr(resumed, module)().state_dict(), getattr(full, module)().state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.items())
    ema_a, ema_b = resumed.get_trainable_module(ema=True).state_dict(), full.get_trainable_module(ema=True).state_dict()
    assert all(torch.equal(v, ema_b[k]) for k, v in ema_a.items())


def test_normalisation_and_gradient_reach():
    """The task un-normalises with the student's mean/std: the teacher sees to_model_input(its info, images), the
    student the loader's input; the loss gradient reaches every student parameter and no teacher one."""
    student, teacher = models()
    task = task_for(student, teacher).train()
    x, y = batch(0)
    images = x * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    seen: dict[str, list] = {"teacher": [], "student": []}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: seen[k].append((i[0].detach(), o.detach())))
             for k, m in (("teacher", teacher), ("student", student))]
    out = task(x, y)
    for h in hooks:
        h.remove()
    (t_in, t_out), = seen["teacher"]
    (s_in, _), = seen["student"]
    assert info(teacher).mean == HALF and info(student).mean == tuple(IMAGENET_DEFAULT_MEAN)
    torch.testing.assert_close(t_in, to_model_input(info(teacher), images), rtol=0, atol=1e-5)
    torch.testing.assert_close(t_in, (images - 0.5) / 0.5, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(t_out, teacher(to_model_input(info(teacher), images)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_in, x, rtol=0, atol=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_teacher_by_name_and_ddp(tmp_path):
    """A timm teacher name (timm's DistillationTeacher creation, weights from a file) and prepare_distributed in a
    one-process gloo group: only the student is DDP-wrapped, timm's checkpoint keys stay unprefixed."""
    torch.manual_seed(100)
    named = timm.create_model("resnet18", num_classes=4)
    torch.save(named.state_dict(), tmp_path / "teacher.pth")
    student, _ = models()
    task = task_for(student, "resnet18", teacher_pretrained_path=str(tmp_path / "teacher.pth"))
    assert info(task.teacher).arch == "timm/resnet18" and not task.teacher.training
    assert all(torch.equal(v, named.state_dict()[k]) for k, v in task.teacher.state_dict().items())

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        task.prepare_distributed()
        wrapped = task.get_trainable_module()
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and wrapped.module is student
        assert not isinstance(task.teacher, torch.nn.parallel.DistributedDataParallel)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
        before = student.fc.weight.detach().clone()
        through_ddp: list[int] = []  # the student pass must run through the wrapper (its gradient sync)
        hook = wrapped.register_forward_hook(lambda m, i, o: through_ddp.append(1))
        out = step(task, opt, *batch(0))
        hook.remove()
        assert through_ddp == [1] and torch.isfinite(out["loss"]) and out["exp_loss"] > 0 and not torch.equal(before, student.fc.weight)
        assert set(task.get_checkpoint_state()["state_dict"]) == set(student.state_dict())
    finally:
        torch.distributed.destroy_process_group()


def test_readme_timm_snippet_runs():
    """docs/models.md "e2KD in a timm training script", run as written on a 64 px batch."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    section = text.split("## e2KD in a timm training script", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    x, y = batch(0, n=2)
    scope = {"input": x, "target": y}
    exec(compile(block, "docs/models.md", "exec"), scope)  # noqa: S102 — our own docs
    result, task = scope["result"], scope["task"]
    assert set(result) == KEYS and torch.isfinite(result["loss"]) and isinstance(task, TrainingTask)
    assert all(p.grad is not None for p in task.get_trainable_module().parameters())


def test_bcos_student_and_teacher():
    """B-cos models built by gte: explained by W(x) ("auto"), fed [x, 1 − x] of the un-normalised images."""
    torch.manual_seed(0)
    student, teacher = build_model("bcos_cifar_resnet20", 4), build_model("bcos_cifar_resnet20", 4)
    task = E2KDTask(student, teacher, verbose=False).train()
    assert task.method.explanation.explainer == "bcos"
    x, y = batch(0)
    x = x[..., :32, :32]
    images = x * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    seen: list[torch.Tensor] = []
    hook = teacher.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    out = task(x, y)
    hook.remove()
    torch.testing.assert_close(seen[0], torch.cat([images, 1 - images], 1), rtol=0, atol=1e-5)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["exp_loss"] > 0
    assert all(p.grad is None for p in teacher.parameters())
