"""CRD's and ReviewKD's trainable parts and losses against torchdistill 1.1.5 (a refactoring of both official codes)
and against the papers' formulas written out; the CRD memory's state round trip and its two-rank update."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gte.methods.crd import CRDHeads, ContrastMemory, Embed, crd_loss, gather_for_update, nce_loss
from gte.methods.reviewkd import ABF, ReviewKDHeads, hcl_loss

pytestmark = pytest.mark.usefixtures("one_thread")
D, N, K, B = 8, 40, 6, 5  # feat_dim, data set size, negatives, batch


def td_mid():  # imported per test: without torchdistill only the oracle tests skip
    return pytest.importorskip("torchdistill.losses.mid_level")


def td_wrapper():
    return pytest.importorskip("torchdistill.models.wrapper")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(rows: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, D, generator=gen(seed), dtype=torch.float64), dim=1)


def memory(seed: int = 0, **kw) -> ContrastMemory:
    return ContrastMemory(D, N, K, generator=gen(seed), dtype=torch.float64, **kw)


# ------------------------------------------------------------------------------------------------ CRD
def test_embed_is_linear_then_l2_normalised_like_torchdistill():
    torch.manual_seed(0)
    embed = Embed(6, D).double()
    oracle = td_wrapper().Normalizer4CRD(embed.linear)
    f = torch.randn(4, 6, 1, 1, dtype=torch.float64)  # a pooled map: flattened like the official view(N, -1)
    torch.testing.assert_close(embed(f), oracle(f.flatten(1)), rtol=1e-12, atol=1e-12)
    assert torch.allclose(embed(f).norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_scores_loss_gradients_and_update_match_torchdistill_over_two_steps():
    """Same banks and contrast indices in both: the first step sets Z, the second must reuse it."""
    mem = memory()
    oracle = td_mid().CRDLoss("s_norm", "s_empty", "t_norm", D, N, K, N).double()
    oracle.params[1] = 0.07  # its float32 constructor rounds τ; give it ours
    oracle.memory_v1.copy_(mem.memory_s)  # v1: the student's bank
    oracle.memory_v2.copy_(mem.memory_t)
    for step in range(2):
        idx = torch.randperm(N, generator=gen(10 + step))[:B]
        cidx = torch.cat([idx[:, None], torch.randint(0, N, (B, K), generator=gen(20 + step))], 1)
        e_s, e_t = unit(B, 30 + step).requires_grad_(), unit(B, 40 + step).requires_grad_()
        o_s, o_t = e_s.detach().clone().requires_grad_(), e_t.detach().clone().requires_grad_()
        out_s, out_t = mem.scores(e_s, e_t, cidx)
        ours = crd_loss(out_s, out_t, N)
        ours.backward()
        mem.update(e_s, e_t, idx)
        theirs = oracle({"s_norm": {"output": o_s}, "s_empty": {"input": {"pos_idx": idx, "contrast_idx": cidx}}},
                        {"t_norm": {"output": o_t}})
        theirs.backward()
        torch.testing.assert_close(ours, theirs.squeeze(0), rtol=1e-10, atol=0)  # theirs has shape (1,)
        torch.testing.assert_close(e_s.grad, o_s.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(e_t.grad, o_t.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mem.z, oracle.params[2:4], rtol=1e-12, atol=0)
        torch.testing.assert_close(mem.memory_s, oracle.memory_v1, rtol=0, atol=1e-12)
        torch.testing.assert_close(mem.memory_t, oracle.memory_v2, rtol=0, atol=1e-12)
    v1, v2 = oracle.contrast_memory(unit(B, 50), unit(B, 51), idx, cidx)  # the raw scores too
    s1, s2 = mem.scores(unit(B, 50), unit(B, 51), cidx)
    torch.testing.assert_close((s1, s2), (v1.squeeze(2), v2.squeeze(2)), rtol=1e-10, atol=0)


def test_scores_and_z_are_the_papers():
    """P = exp(m·e/τ)/Z with Z = N·mean(exp(m·e/τ)) over the first batch, then fixed; the student's anchors score
    against the teacher's bank and vice versa."""
    mem = memory()
    cidx = torch.randint(0, N, (B, K + 1), generator=gen(1))
    e_s, e_t = unit(B, 2), unit(B, 3)
    raw_s = torch.exp(torch.einsum("bkd,bd->bk", mem.memory_t[cidx], e_s) / 0.07)
    raw_t = torch.exp(torch.einsum("bkd,bd->bk", mem.memory_s[cidx], e_t) / 0.07)
    z_s, z_t = N * raw_s.mean(), N * raw_t.mean()
    out_s, out_t = mem.scores(e_s, e_t, cidx)
    torch.testing.assert_close(out_s, raw_s / z_s)
    torch.testing.assert_close(out_t, raw_t / z_t)
    out_s2, _ = mem.scores(e_t, e_s, cidx)  # other anchors: Z stays
    torch.testing.assert_close(out_s2, torch.exp(torch.einsum("bkd,bd->bk", mem.memory_t[cidx], e_t) / 0.07) / z_s)


def test_nce_loss_is_eq10():
    """Eq. 10 with h(T,S) = P / (P + K/N): L = -(1/B) Σ_b [log h(pos_b) + Σ_k log(1 - h(neg_bk))]."""
    x = torch.rand(3, 5, generator=gen(0), dtype=torch.float64) * 0.3
    n, k = 20, 4
    expected = 0.0
    for b in range(3):
        h = [v / (v + k / n + 1e-7) for v in x[b].tolist()]
        expected -= torch.log(torch.tensor(h[0])) + sum(torch.log(torch.tensor(1 - v)) for v in h[1:])
    # 1 - h equals (K/N)/(P + K/N + eps) only up to eps; the official form keeps eps in the denominator
    assert nce_loss(x, n).item() == pytest.approx(float(expected) / 3, rel=1e-6)
    assert crd_loss(x, x.flip(0), n).item() == pytest.approx(2 * nce_loss(x, n).item(), rel=1e-12)


def test_crd_loss_and_heads_gradcheck():
    torch.manual_seed(0)
    heads = CRDHeads(4, 6, D).double()
    mem = memory()
    mem.z.fill_(3.0)  # fixed Z: the function is then stateless
    cidx = torch.randint(0, N, (3, K + 1), generator=gen(1))
    f_s, f_t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: crd_loss(*mem.scores(*heads(a, f_t), cidx), N), (f_s,))
    crd_loss(*mem.scores(*heads(f_s, f_t), cidx), N).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())  # embed_t trains too


def test_memory_init_is_the_official_range_and_seeded():
    a, b, c = memory(0), memory(0), memory(1)
    bound = (3 / D) ** 0.5
    assert a.memory_s.abs().max() <= bound and a.memory_s.abs().max() > 0.8 * bound
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
    assert not torch.equal(a.memory_s, c.memory_s) and not torch.equal(a.memory_s, a.memory_t)
    assert a.z.tolist() == [-1.0, -1.0]


def test_update_is_momentum_then_renormalised_and_a_repeated_index_keeps_its_last_row():
    mem = ContrastMemory(D, N, K, nce_m=0.3, generator=gen(0), dtype=torch.float64)  # μ ≠ 1/2: which is which
    before_s, before_t = mem.memory_s.clone(), mem.memory_t.clone()
    idx = torch.tensor([3, 7, 3, 11])
    e_s, e_t = unit(4, 1), unit(4, 2)
    mem.update(e_s, e_t, idx)
    for row, j in ((7, 1), (3, 2), (11, 3)):  # row 3: its last occurrence (position 2)
        for bank, old, e in ((mem.memory_s, before_s, e_s), (mem.memory_t, before_t, e_t)):
            torch.testing.assert_close(bank[row], F.normalize(0.3 * old[row] + 0.7 * e[j], dim=0))
    untouched = [r for r in range(N) if r not in (3, 7, 11)]
    assert torch.equal(mem.memory_s[untouched], before_s[untouched])


def test_sample_puts_the_positive_first_and_draws_other_classes_with_labels():
    labels = torch.arange(N) % 4
    mem = memory(labels=labels)
    idx = torch.arange(N)
    draws = torch.cat([mem.sample(idx) for _ in range(20)], 1)
    assert draws.shape == (N, 20 * (K + 1)) and torch.equal(draws[:, 0], idx)
    negs = draws.view(N, 20, K + 1)[:, :, 1:].reshape(N, -1)
    assert (labels[negs] != labels[:, None]).all()
    for i in range(4):  # every sample of another class is drawn, over all anchors of class i
        drawn = set(negs[labels == i].flatten().tolist())
        assert drawn == {j for j in range(N) if labels[j] != i}
    plain = memory().sample(idx)
    assert plain.min() >= 0 and plain.max() < N and len(set(plain[:, 1:].flatten().tolist())) > N // 2


def test_ranks_draw_different_negatives_but_advance_the_shared_generator_alike():
    a, b = memory(), memory()
    idx = torch.arange(B)
    assert not torch.equal(a.sample(idx, rank=0), b.sample(idx, rank=1))
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert torch.equal(a.sample(idx, rank=1), b.sample(idx, rank=1))


def test_state_round_trip_through_safetensors_gives_identical_scores_and_future_negatives(tmp_path):
    mem = memory(0, labels=torch.arange(N) % 3)
    idx = torch.arange(B)
    cidx = mem.sample(idx)
    mem.scores(unit(B, 1), unit(B, 2), cidx)
    mem.update(unit(B, 1), unit(B, 2), idx)
    state = mem.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values()) and state["rng_state"].dtype == torch.uint8
    save_file(state, tmp_path / "memory.safetensors")
    fresh = memory(99, labels=torch.arange(N) % 3)
    fresh.load_state_dict(load_file(tmp_path / "memory.safetensors"))
    for _ in range(3):
        c1, c2 = mem.sample(idx), fresh.sample(idx)
        assert torch.equal(c1, c2)
        assert all(torch.equal(x, y) for x, y in zip(mem.scores(unit(B, 3), unit(B, 4), c1),
                                                        fresh.scores(unit(B, 3), unit(B, 4), c2)))
    with pytest.raises(Exception, match="shape"):
        ContrastMemory(D, N + 1, K).load_state_dict(state)


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        mem = memory()
        n = (3, 2)[rank]  # a short last batch on rank 1
        idx = torch.tensor([[0, 5, 9], [5, 20]][rank])  # index 5 on both ranks: rank 1's row must win
        e_s, e_t = unit(n, 100 + rank), unit(n, 200 + rank)
        mem.scores(e_s, e_t, mem.sample(idx, rank))
        g_s, g_t, g_idx = gather_for_update(e_s, e_t, idx)
        mem.update(g_s, g_t, g_idx)
        save_file({"s": g_s, "t": g_t, "i": g_idx, **mem.state_dict()}, f"{out_dir}/{rank}.safetensors")
    finally:
        td.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the workers are forked")
def test_two_ranks_gather_in_rank_order_and_keep_identical_memories(tmp_path):
    import torch.multiprocessing as mp

    # fork: the workers inherit the imports (a spawned worker re-imports gte.methods, seconds on a busy machine)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork")
    r0, r1 = (load_file(tmp_path / f"{r}.safetensors") for r in (0, 1))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert r0["i"].tolist() == [0, 5, 9, 5, 20]
    torch.testing.assert_close(r0["s"], torch.cat([unit(3, 100), unit(2, 101)]))
    single = memory()  # the same update in one process; row 5 from rank 1's embedding
    single.update(r0["s"], r0["t"], r0["i"])
    torch.testing.assert_close(r0["memory_s"], single.memory_s, rtol=0, atol=0)
    raw_means = []  # Z: N × rank 0's first-batch mean, on both ranks
    for rank, idx in ((0, [0, 5, 9]), (1, [5, 20])):
        mem = memory()
        cidx = mem.sample(torch.tensor(idx), rank)
        e_s, e_t = unit(len(idx), 100 + rank), unit(len(idx), 200 + rank)
        raw_means.append([torch.exp(torch.einsum("bkd,bd->bk", mem.memory_t[cidx], e_s) / 0.07).mean(),
                          torch.exp(torch.einsum("bkd,bd->bk", mem.memory_s[cidx], e_t) / 0.07).mean()])
    torch.testing.assert_close(r0["z"], N * torch.tensor(raw_means)[0], rtol=1e-12, atol=0)
    assert not torch.allclose(r0["z"], N * torch.tensor(raw_means)[1])  # rank 1's own batch would differ


def test_gather_without_a_process_group_is_the_detached_identity():
    e = unit(3, 0).requires_grad_()
    g_s, g_t, g_i = gather_for_update(e, e * 2, torch.arange(3))
    assert not g_s.requires_grad and torch.equal(g_s, e.detach()) and torch.equal(g_i, torch.arange(3))


# ------------------------------------------------------------------------------------------------ ReviewKD
@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7])
def test_hcl_loss_matches_torchdistill(size):
    oracle = td_mid().HierarchicalContextLoss("s", "output", "t", "output")
    fs = torch.randn(2, 3, size, size, generator=gen(size), dtype=torch.float64)
    ft = torch.randn(2, 3, size, size, generator=gen(size + 100), dtype=torch.float64)
    expected = oracle({"s": {"output": (fs, None)}}, {"t": {"output": ft}})
    torch.testing.assert_close(hcl_loss([fs], [ft]), expected, rtol=1e-12, atol=0)


def test_hcl_loss_is_the_weighted_pyramid_summed_over_stages():
    """7×7: levels 4, 2, 1 kept, weights 1, 1/2, 1/4, 1/8 over their sum; 2×2: only level 1 (weight 1/2);
    a pooled N×C feature: the plain MSE."""
    def mse(a, b):
        return ((a - b) ** 2).mean()

    s7, t7 = (torch.randn(2, 3, 7, 7, generator=gen(i), dtype=torch.float64) for i in (0, 1))
    s2, t2 = (torch.randn(2, 3, 2, 2, generator=gen(i), dtype=torch.float64) for i in (2, 3))
    s1, t1 = (torch.randn(2, 3, generator=gen(i), dtype=torch.float64) for i in (4, 5))
    pool = F.adaptive_avg_pool2d
    h7 = (mse(s7, t7) + mse(pool(s7, 4), pool(t7, 4)) / 2 + mse(pool(s7, 2), pool(t7, 2)) / 4
          + mse(s7.mean((2, 3)), t7.mean((2, 3))) / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    h2 = (mse(s2, t2) + mse(s2.mean((2, 3)), t2.mean((2, 3))) / 2) / 1.5
    torch.testing.assert_close(hcl_loss([s7, s2, s1], [t7, t2, t1]), h7 + h2 + mse(s1, t1))
    assert torch.autograd.gradcheck(lambda a: hcl_loss([a], [t2]), (s2.clone().requires_grad_(),))


def _oracle_abf(ours: ABF) -> torch.nn.Module:
    """torchdistill's AttentionBasedFusion with our weights (its gate conv is named attention_conv)."""
    conv1, conv2 = ours.conv1[0], ours.conv2[0]
    oracle = td_wrapper().AttentionBasedFusion(conv1.in_channels, conv1.out_channels, conv2.out_channels,
                                                      ours.att_conv is not None).double()
    oracle.load_state_dict({k.replace("att_conv", "attention_conv"): v for k, v in ours.state_dict().items()})
    return oracle


@pytest.mark.parametrize("train", [True, False])
def test_abf_matches_torchdistill(train):
    torch.manual_seed(0)
    abf = ABF(4, 6, 5, fuse=True).double().train(train)
    oracle = _oracle_abf(abf).train(train)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    r = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    for got, want in zip(abf(x, r), oracle(x, r, 6)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_abf_fusion_is_two_sigmoid_gates_by_hand():
    """R = σ(a_0)·X + σ(a_1)·up(R'), a = W·[X, up(R')] + b per pixel (1×1 conv), up = nearest."""
    torch.manual_seed(0)
    abf = ABF(4, 3, 5, fuse=True).double().eval()
    x, r = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)
    xh = abf.conv1(x)
    up = r.repeat_interleave(2, 2).repeat_interleave(2, 3)
    w, b = abf.att_conv[0].weight[:, :, 0, 0], abf.att_conv[0].bias
    a = torch.einsum("oc,nchw->nohw", w, torch.cat([xh, up], 1)) + b[None, :, None, None]
    fused = torch.sigmoid(a[:, :1]) * xh + torch.sigmoid(a[:, 1:]) * up
    y, got = abf(x, r)
    torch.testing.assert_close(got, fused)
    torch.testing.assert_close(y, abf.conv2(fused))
    assert torch.autograd.gradcheck(lambda p, q: abf(p, q)[0].sum(), (x[:1, :, :2, :2].clone().requires_grad_(),
                                                                      r[:1, :, :1, :1].clone().requires_grad_()))


S_SHAPES = [(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2), (2, 8)]
T_SHAPES = [(2, 5, 8, 8), (2, 7, 4, 4), (2, 9, 2, 2), (2, 9, 1, 1)]


def test_heads_review_deep_to_shallow_like_torchdistills_chain():
    torch.manual_seed(0)
    heads = ReviewKDHeads.for_features(S_SHAPES, T_SHAPES).double()
    assert [a.conv1[0].out_channels for a in heads.abfs] == [8] * 4  # min(512, C_last)
    assert [a.att_conv is not None for a in heads.abfs] == [True, True, True, False]
    feats = [torch.randn(*s, dtype=torch.float64) for s in S_SHAPES]
    outs = heads(feats)
    assert [tuple(o.shape) for o in outs] == T_SHAPES
    oracles = [_oracle_abf(a) for a in heads.abfs]  # Student4KnowledgeReview.secondary_forward's loop
    want, res = oracles[3](feats[3][:, :, None, None])
    expected = [want]
    for i in (2, 1, 0):
        want, res = oracles[i](feats[i], res, feats[i].shape[-1])
        expected.insert(0, want)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_heads_follow_the_teachers_sizes_and_train_every_parameter():
    t_shapes = [(2, 5, 16, 16), (2, 7, 4, 4), (2, 9, 2, 2), (2, 9)]
    heads = ReviewKDHeads.for_features(S_SHAPES, t_shapes, mid_channel=3)
    assert heads.out_sizes == [(16, 16), None, None, None]
    feats = [torch.randn(*s) for s in S_SHAPES]
    teach = [torch.randn(*s) for s in t_shapes]
    outs = heads(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 5, 16, 16), (2, 7, 4, 4), (2, 9, 2, 2), (2, 9, 1, 1)]
    hcl_loss(outs, teach).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    with pytest.raises(Exception, match="one to one"):
        ReviewKDHeads.for_features(S_SHAPES, t_shapes[:3])


def test_sample_labels_follow_the_loaders_index(tmp_path):
    """Every sample's cls, read from the tar headers, at the position the loader's ``index`` gives it (shards in spec
    order, an empty shard in between); a cls that is not an integer is -1."""
    from _fixtures import rewrite_tar, write_jpeg_shards
    from gte.data.info import sample_labels
    from gte.data.loader import make_loader

    spec, keys = write_jpeg_shards(tmp_path, [5, 0, 7], num_classes=3, width=16, height=16)
    labels = sample_labels(spec)
    assert labels.tolist() == [i % 3 for i in range(12)]
    seen = 0
    for batch in make_loader(spec, train=False, image_size=16, batch_size=4, indices=True):
        assert labels[batch["index"].numpy()].tolist() == batch["label"].tolist()
        seen += len(batch["label"])
    assert seen == 12
    rewrite_tar(tmp_path / "data-000002.tar", lambda name, data: b"x" if name == f"{keys[6]}.cls" else None)
    assert sample_labels(spec)[6] == -1


def test_crd_draws_its_negatives_among_other_classes_when_the_run_knows_the_labels():
    from gte.config import DistillConfig
    from gte.methods import Context, build_method
    from gte.models import build_model, freeze

    torch.manual_seed(0)
    student, teacher = build_model("cifar_resnet20", 3), freeze(build_model("cifar_resnet20", 3))
    labels = torch.arange(60) % 3
    labels[-1] = -1  # unknown: its own group, a negative for everyone

    def crd(negatives: str, context_labels):
        cfg = DistillConfig(method="crd", options={"nce_k": 50, "negatives": negatives})
        return build_method(cfg, student, teacher, Context(n_data=60, image_size=16, labels=context_labels))

    idx = torch.arange(0, 59, 7)
    m = crd("other_classes", labels)
    neg = m.memory.sample(idx, seed=1)[:, 1:]
    assert m.negatives == "other_classes" and (labels[neg] != labels[idx][:, None]).all()
    assert (neg == 59).any()  # the unknown-label sample is drawn too
    for method in (crd("uniform", labels), crd("other_classes", None)):  # asked for, or no labels known
        neg = method.memory.sample(idx, seed=1)[:, 1:]
        assert method.negatives == "uniform" and (labels[neg] == labels[idx][:, None]).any()
    with pytest.raises(Exception, match="'other_classes' or 'uniform'"):
        crd("random", labels)
