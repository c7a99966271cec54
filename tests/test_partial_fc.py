"""Partial FC: equals the full softmax at sample_rate 1 (1 and 2 processes), sampling, lazy SGD, checkpoints."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lit_tasks.losses.margin import ArcFace, CombinedMargin, MarginSoftmaxLoss
from lit_tasks.losses.partial_fc import PartialFC, shard_range


SGD = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}


def make_pair(num_classes: int = 40, dim: int = 8, sample_rate: float = 1.0):
    torch.manual_seed(0)
    full = MarginSoftmaxLoss(num_classes, dim, ArcFace(64.0, 0.5))
    pfc = PartialFC(num_classes=num_classes, embedding_size=dim, margin=ArcFace(64.0, 0.5), sample_rate=sample_rate,
                    rank=0, world_size=1)
    with torch.no_grad():
        pfc.weight.copy_(full.weight)
    return full, pfc


def test_shard_range_covers_all_classes() -> None:
    for c, w in [(10, 3), (7, 7), (5, 8), (1000, 4)]:
        ranges = [shard_range(c, r, w) for r in range(w)]
        assert sum(n for _, n in ranges) == c
        assert all(ranges[r][0] + ranges[r][1] == ranges[r + 1][0] for r in range(w - 1))
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1


def test_single_process_full_rate_equals_full_softmax() -> None:
    full, pfc = make_pair(dim=64)
    labels = torch.randint(0, 40, (16,))
    emb = 100 * full.weight.detach()[labels] + 0.3 * torch.randn(16, 64)  # near their centres: loss O(1)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    loss_full, loss_pfc = full(e1, labels), pfc(e2, labels)
    loss_full.backward()
    loss_pfc.backward()
    assert loss_pfc.item() == pytest.approx(loss_full.item(), abs=1e-6)
    torch.testing.assert_close(e2.grad, e1.grad, atol=1e-6, rtol=1e-5)
    index, rows = pfc._pending[0]
    assert index is None
    torch.testing.assert_close(rows.grad, full.weight.grad, atol=1e-6, rtol=1e-5)


def test_sampling_keeps_positives_and_equals_softmax_over_sampled_rows() -> None:
    full, pfc = make_pair(num_classes=200, sample_rate=0.1)
    emb, labels = torch.randn(6, 8), torch.tensor([3, 3, 150, 77, 199, 0])
    loss = pfc(emb, labels)
    index = pfc.last_index
    assert len(index) == 20 and torch.equal(index, index.sort().values)
    assert set(labels.tolist()) <= set(index.tolist())
    # Reference: margin cross entropy over exactly the sampled centres.
    columns = torch.searchsorted(index, labels)
    logits = ArcFace(64.0, 0.5)(F.normalize(emb) @ F.normalize(full.weight[index].detach()).T, columns)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, columns).item(), abs=1e-5)


def test_only_positives_when_they_exceed_the_sample() -> None:
    _, pfc = make_pair(num_classes=20, sample_rate=0.1)
    labels = torch.tensor([1, 5, 9, 13, 17])
    pfc(torch.randn(5, 8), labels)
    assert pfc.last_index.tolist() == [1, 5, 9, 13, 17]


def update_tolerance(steps: int, magnitude: float = 1.0) -> dict[str, float]:
    """float32 tolerance for ``steps`` updates of size ``magnitude`` computed in another order: each update is a
    handful of float32 operations (<= 0.5 ulp each), so a few ulp of the update per step, plus the relative ulp of
    the value itself (rtol 1e-5, about 80 ulp)."""
    ulp = torch.finfo(torch.float32).eps
    return {"rtol": 1e-5, "atol": 8 * ulp * magnitude * steps}


@pytest.mark.parametrize("nesterov", [False, True])
def test_lazy_sgd_equals_torch_sgd_when_every_row_is_sampled(nesterov: bool) -> None:
    full, pfc = make_pair()
    opt = torch.optim.SGD([full.weight], **SGD, nesterov=nesterov)
    pfc.bind_optimizer(opt)
    generator = torch.Generator().manual_seed(1)
    for step in range(3):
        emb, labels = torch.randn(16, 8, generator=generator), torch.randint(0, 40, (16,), generator=generator)
        pfc(emb, labels).backward()
        full.weight.grad = pfc._pending[0][1].grad.clone()  # the same gradient: only the update rule is compared
        opt.step()
        assert pfc.step(opt.param_groups[0])
        # Gradients of a 64-scaled softmax (O(1)), momentum sums up to ~10 of them: update <= lr x 10 = 1.
        torch.testing.assert_close(pfc.weight, full.weight.detach(), **update_tolerance(step + 1, 1.0))
    torch.testing.assert_close(pfc.momentum_buffer, opt.state[full.weight]["momentum_buffer"],
                               **update_tolerance(3, 10.0))


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.Adam])
def test_lazy_adam_equals_torch_adam_when_every_row_is_sampled(optimizer) -> None:
    """Per-row state (moments and step counts) equals torch's on the full matrix when every row is sampled."""
    full, pfc = make_pair()
    opt = optimizer([full.weight], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    pfc.bind_optimizer(opt)
    generator = torch.Generator().manual_seed(2)
    for step in range(4):
        emb, labels = torch.randn(16, 8, generator=generator), torch.randint(0, 40, (16,), generator=generator)
        pfc(emb, labels).backward()
        full.weight.grad = pfc._pending[0][1].grad.clone()  # the same gradient: only the update rule is compared
        opt.step()
        assert pfc.step(opt.param_groups[0])
        # Each Adam update is lr x O(1): the weights move by ~1e-2 per step.
        torch.testing.assert_close(pfc.weight, full.weight.detach(), **update_tolerance(step + 1, 1e-2))
    state = opt.state[full.weight]
    assert pfc.row_steps.tolist() == [4] * 40 and float(state["step"]) == 4
    torch.testing.assert_close(pfc.exp_avg, state["exp_avg"], **update_tolerance(4, 1.0))
    torch.testing.assert_close(pfc.exp_avg_sq, state["exp_avg_sq"], **update_tolerance(4, 1.0))
    assert not hasattr(pfc, "momentum_buffer") or pfc.momentum_buffer is None


def test_lazy_adamw_keeps_state_per_sampled_row() -> None:
    """Rows sampled at different steps: each row's update is a fresh AdamW's for its own gradient history."""
    _, pfc = make_pair(num_classes=200, sample_rate=0.05)
    group = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1, "decoupled_weight_decay": True}
    pfc.bind_optimizer(torch.optim.AdamW([torch.zeros(1, requires_grad=True)], **{k: v for k, v in group.items()
                                                                                if k != "decoupled_weight_decay"}))
    start = pfc.weight.clone()
    history: dict[int, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(3)
    for labels in ([3, 50], [50, 120], [3, 199]):
        pfc(torch.randn(2, 8, generator=generator), torch.tensor(labels)).backward()
        index, rows = pfc._pending[0]
        for row, g in zip(index.tolist(), rows.grad):
            history.setdefault(row, []).append(g.clone())
        assert pfc.step(group)
    # Reference: torch.optim.AdamW on each row alone, fed only the gradients of the steps it was sampled.
    for row, grads in history.items():
        w = start[row].clone().requires_grad_(True)
        ref = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        for g in grads:
            w.grad = g
            ref.step()
        torch.testing.assert_close(pfc.weight[row], w.detach(), **update_tolerance(len(grads), 1e-2))
        assert int(pfc.row_steps[row]) == len(grads)
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[list(history)] = False
    assert torch.equal(pfc.weight[untouched], start[untouched]) and int(pfc.row_steps[untouched].sum()) == 0


def test_unsupported_optimizers_and_options_are_refused() -> None:
    _, pfc = make_pair()
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(TypeError, match="SGD, Adam or AdamW rules; RMSprop is not supported"):
        pfc.bind_optimizer(torch.optim.RMSprop(p))
    with pytest.raises(ValueError, match="does not support dampening=0.5"):
        pfc.bind_optimizer(torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5))
    with pytest.raises(ValueError, match="does not support amsgrad=True"):
        pfc.bind_optimizer(torch.optim.AdamW(p, amsgrad=True))


def test_lazy_sgd_touches_only_sampled_rows() -> None:
    _, pfc = make_pair(num_classes=200, sample_rate=0.1)
    pfc.bind_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5, momentum=0.9))
    before_w = pfc.weight.clone()
    torch.manual_seed(4)
    pfc.register_buffer("momentum_buffer", torch.randn(200, 8))
    before_m = pfc.momentum_buffer.clone()
    labels = torch.tensor([3, 50, 120])
    pfc(torch.randn(3, 8), labels).backward()
    index, rows = pfc._pending[0]
    grad = rows.grad.clone()
    pfc.step({**SGD, "lr": 0.5}, grad_scale=4.0)  # an AMP loss scale of 4 is divided out
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(pfc.weight[untouched], before_w[untouched])
    assert torch.equal(pfc.momentum_buffer[untouched], before_m[untouched])
    expected_m = 0.9 * before_m[index] + grad / 4.0 + 5e-4 * before_w[index]
    torch.testing.assert_close(pfc.momentum_buffer[index], expected_m)
    torch.testing.assert_close(pfc.weight[index], before_w[index] - 0.5 * expected_m)


def test_accumulated_micro_batches_sum_their_gradients() -> None:
    _, pfc = make_pair(num_classes=200, sample_rate=0.1)
    before = pfc.weight.clone()
    grads = torch.zeros_like(before)
    torch.manual_seed(5)
    for labels in (torch.tensor([3, 50]), torch.tensor([50, 199])):
        pfc(torch.randn(2, 8), labels).backward()
        index, rows = pfc._pending[-1]
        grads.index_add_(0, index, rows.grad)
    assert pfc.step({"lr": 1.0})  # plain SGD: no momentum, no decay
    torch.testing.assert_close(pfc.weight, before - grads)


def test_non_finite_gradient_skips_the_update() -> None:
    _, pfc = make_pair()
    before = pfc.weight.clone()
    pfc(torch.randn(4, 8, generator=torch.Generator().manual_seed(6)), torch.tensor([0, 1, 2, 3])).backward()
    pfc._pending[0][1].grad[0, 0] = float("inf")
    assert not pfc.step(SGD)
    assert torch.equal(pfc.weight, before)


def test_checkpoint_holds_full_matrix_and_state_and_restores_any_shard() -> None:
    _, pfc = make_pair(num_classes=11)
    pfc.bind_optimizer(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
    pfc(torch.randn(3, 8, generator=torch.Generator().manual_seed(7)), torch.tensor([1, 4, 9])).backward()
    pfc.step({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "decoupled_weight_decay": True})
    state = pfc.state_dict()
    assert state["weight"].shape == (11, 8) and state["exp_avg"].shape == (11, 8) and state["row_steps"].shape == (11,)
    # no state yet: the checkpoint's is created
    shard = PartialFC(num_classes=11, embedding_size=8, margin=ArcFace(), rank=1, world_size=3)
    shard.load_state_dict(state)
    start, n = shard_range(11, 1, 3)
    for name in ("weight", "exp_avg", "exp_avg_sq", "row_steps"):
        assert torch.equal(getattr(shard, name), state[name][start : start + n]), name
    # Another rule: the Adam state is dropped.
    shard.bind_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    assert set(shard.state_dict()) == {"weight"}
    wrong = PartialFC(num_classes=12, embedding_size=8, margin=ArcFace())
    with pytest.raises(RuntimeError, match=r"weight: the checkpoint holds a \(11, 8\) centre matrix, expected the full \(12, 8\)"):
        wrong.load_state_dict(state)


def test_sample_rate_is_validated() -> None:
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(num_classes=10, embedding_size=4, margin=CombinedMargin(), sample_rate=0.0)


# -- two processes (gloo) ------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # identical global data and centres in every process
        num_classes, dim, per_rank = 203, 64, 4
        centres = torch.randn(num_classes, dim)
        labels = torch.randint(0, num_classes, (world * per_rank,))
        emb = centres[labels] + 0.3 * torch.randn(world * per_rank, dim)  # near their centres: loss O(1)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        out = {}
        # Reference: the full softmax of the whole global batch, in this process alone.
        full = MarginSoftmaxLoss(num_classes, dim, ArcFace(64.0, 0.5))
        full.weight.data.copy_(centres)
        e_ref = emb.clone().requires_grad_()
        loss_ref = full(e_ref, labels)
        loss_ref.backward()
        out["loss_ref"] = loss_ref.detach()
        out["grad_ref"], out["centre_grad_ref"] = e_ref.grad[mine], full.weight.grad
        for rate in (1.0, 0.1):
            pfc = PartialFC(num_classes=num_classes, embedding_size=dim, margin=ArcFace(64.0, 0.5),
                            sample_rate=rate, rank=0, world_size=1)
            pfc.weight.copy_(centres)
            pfc.reshard()
            e = emb[mine].clone().requires_grad_()
            loss = pfc(e, labels[mine])
            loss.backward()
            index, rows = pfc._pending[0]
            out[rate] = {
                "loss": loss.detach(), "grad": e.grad, "start": pfc.class_start, "num_local": pfc.num_local,
                "index": index, "centre_grad": rows.grad, "state_weight": pfc.state_dict()["weight"],
            }
        out["labels"] = labels
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_single_process_full_softmax(tmp_path) -> None:
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    labels = results[0]["labels"]
    for r, out in enumerate(results):
        exact = out[1.0]
        assert exact["num_local"] in (101, 102)  # each process holds half of the 203 centres
        assert exact["loss"].item() == pytest.approx(out["loss_ref"].item(), abs=1e-5)
        # The all-gather backward returns world_size x dL/de (DDP averages backbone gradients).
        torch.testing.assert_close(exact["grad"] / world, out["grad_ref"], atol=1e-5, rtol=1e-4)
        start, n = exact["start"], exact["num_local"]
        torch.testing.assert_close(exact["centre_grad"], out["centre_grad_ref"][start : start + n], atol=1e-5, rtol=1e-4)
        assert exact["state_weight"].shape == (203, 64)  # state_dict gathers every shard
        # sample_rate = 0.1: every positive of the GLOBAL batch on this shard is sampled.
        sampled = results[r][0.1]
        positives = {int(y) - start for y in labels if start <= y < start + n}
        assert positives <= set(sampled["index"].tolist())
        assert len(sampled["index"]) == max(int(0.1 * n), len(positives))
    assert torch.equal(results[0][1.0]["state_weight"], results[1][1.0]["state_weight"])
    assert results[0][1.0]["loss"].item() == results[1][1.0]["loss"].item()
