"""Partial FC: margin softmax over class centres sharded across processes, with negative sampling.

After An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (ICCVW 2021) and
"Killing Two Birds with One Stone" (CVPR 2022); mechanics as insightface's PartialFC_V2 (REFERENCE §1.4):

1. The ``(C, D)`` centre matrix is split by rows: rank r holds ``num_local`` rows starting at
   ``class_start`` (:func:`shard_range`), so its memory falls as 1 / world_size.
2. Embeddings ``(b, D)`` and labels of every rank are all-gathered into the global batch ``(N, D)``;
   the embedding gather is differentiable (:class:`AllGather`).
3. Each rank keeps every centre of its shard that is a label in the global batch (positives) and fills
   up to ``sample_rate * num_local`` rows with random negatives.
4. Cosines against the sampled rows go through the margin head; the softmax normaliser is all-reduced
   (max, then sum of exponentials), so with ``sample_rate=1`` the loss is exactly the full softmax.

Optimizer state: the centres are buffers, not Parameters, and are updated by :meth:`PartialFC.step`
with *lazy* (row-sparse) SGD: the sampled rows are copied out (``weight[index]``) as a leaf tensor, its
gradient ``(n_sampled, D)`` is the only centre gradient that exists, and weight decay, the momentum
buffer and the update touch exactly those rows. The momentum buffer is indexed by the same global row
ids as the weight, so a row's momentum follows it however the sampled subset changes, and a row that is
not sampled is left alone (no decay, no momentum drift; the behaviour of sparse-embedding optimizers).
Per step the optimizer touches ``n_sampled * D`` numbers instead of ``C * D``; the stored state is
the shard plus one momentum row per shard row (``momentum=0`` drops it).

Checkpoints: ``state_dict()`` gathers the full ``(C, D)`` weight and momentum from all ranks (a
collective: call it on every rank, as Lightning does), and loading takes the rows of this rank's shard
from it, so a checkpoint restores under any world size; a wrong ``(C, D)`` is a clear error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lit_tasks.losses.margin import CombinedMargin, check_labels, cosine_logits
from lit_tasks.ops.distributed import is_distributed, rank as get_rank, world_size as get_world_size


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(class_start, num_local)`` of ``rank``: the first ``C % W`` ranks hold one extra row."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def _gather_varsize(tensor: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather tensors whose first dimension may differ per rank: ``(sum_r n_r, ...)`` and the ``n_r``."""
    world = get_world_size()
    if world == 1:
        return tensor, [tensor.shape[0]]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[:n] for c, n in zip(chunks, sizes)]), sizes


class AllGather(torch.autograd.Function):
    """Differentiable all-gather of ``(b_r, D)`` rows into ``(N, D)``.

    Backward sums every rank's gradient for the global batch and returns this rank's rows times
    ``world_size``: DDP *averages* backbone gradients over ranks, so the factor makes the backbone
    receive the gradient of the global-batch loss (the convention of insightface's AllGather).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        gathered, sizes = _gather_varsize(tensor)
        ctx.start, ctx.size = sum(sizes[: get_rank()]), tensor.shape[0]
        return gathered

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if not is_distributed():
            return grad
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.size] * get_world_size()


class DistributedCrossEntropy(torch.autograd.Function):
    """Cross entropy whose classes are spread over ranks: logits ``(N, n_local)`` fp32, targets ``(N,)``.

    ``targets[i]`` is the column of row i's class on this rank, or -1 when another rank holds it.
    ``loss = mean_i(logsumexp_all_ranks(z_i) - z_i,y_i)``; the gradient ``(softmax - onehot) / N`` is
    local, so backward needs no communication.
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        row_max = logits.max(dim=1).values if logits.shape[1] else logits.new_full((logits.shape[0],), -1e30)
        if is_distributed():
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])
        row_sum = exp.sum(dim=1)
        rows = torch.nonzero(targets >= 0).squeeze(1)
        target_logit = logits.new_zeros(logits.shape[0])
        target_logit[rows] = logits[rows, targets[rows]]
        if is_distributed():
            dist.all_reduce(row_sum, op=dist.ReduceOp.SUM)
            dist.all_reduce(target_logit, op=dist.ReduceOp.SUM)
        log_norm = row_max + torch.log(row_sum)
        softmax = exp.div_(row_sum[:, None])
        ctx.save_for_backward(softmax, rows, targets[rows])
        return (log_norm - target_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        softmax, rows, cols = ctx.saved_tensors
        grad = softmax.clone()
        grad[rows, cols] -= 1.0
        return grad * (grad_loss / softmax.shape[0]), None


class PartialFC(nn.Module):
    """Sharded, sampled margin softmax loss (module docstring has the details).

    Args:
        num_classes: number of identities C over all ranks.
        embedding_size: D.
        margin: the margin head applied to the sampled cosines.
        sample_rate: fraction of each shard's centres used per step, in (0, 1]; positives always kept.
        momentum: SGD momentum of the lazy centre update (0 keeps no state).
        weight_decay: L2 decay applied to the sampled rows at each step.
        rank, world_size: the sharding; default the current process group (1 shard without one).
    """

    SHARDED = ("weight", "momentum_buffer")

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.sample_rate = margin, float(sample_rate)
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        self.register_buffer("weight", torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        self.register_buffer("momentum_buffer", torch.zeros(self.num_local, embedding_size) if momentum else None)
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self.last_index: torch.Tensor | None = None  # sampled rows of the last forward (local ids)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, shard=[{self.class_start}, {self.class_start + self.num_local}) "
                f"of rank {self.rank}/{self.world_size}, sample_rate={self.sample_rate}")

    # -- sharding ------------------------------------------------------------------------------
    def reshard(self, rank: int | None = None, world_size: int | None = None) -> None:
        """Keep only this rank's rows; called once the process group exists (e.g. in ``setup``)."""
        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
        if (rank, world_size) == (self.rank, self.world_size):
            return
        if self.world_size != 1:
            raise RuntimeError(f"PartialFC is already sharded for world size {self.world_size}; cannot reshard")
        start, num_local = shard_range(self.num_classes, rank, world_size)
        for name in self.SHARDED:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[start : start + num_local].clone())
        self.rank, self.world_size, self.class_start, self.num_local = rank, world_size, start, num_local
        self._pending.clear()

    def ddp_ignored_buffers(self, prefix: str) -> list[str]:
        """Fully qualified names DDP must neither broadcast nor check (they differ per rank)."""
        return [prefix + name for name in self.SHARDED if getattr(self, name) is not None]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.world_size > 1:
            for name in self.SHARDED:
                if getattr(self, name) is not None:
                    destination[prefix + name] = _gather_varsize(getattr(self, name).detach())[0]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        expected = (self.num_classes, self.embedding_size)
        for name in self.SHARDED:
            key = prefix + name
            if key in state_dict and getattr(self, name) is not None:
                full = state_dict[key]
                if tuple(full.shape) != expected:
                    error_msgs.append(
                        f"{key}: the checkpoint holds a {tuple(full.shape)} centre matrix, expected the full "
                        f"{expected} (num_identities x embedding_size); was it trained on other data?"
                    )
                    state_dict[key] = getattr(self, name)
                else:
                    state_dict[key] = full[self.class_start : self.class_start + self.num_local]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- forward -------------------------------------------------------------------------------
    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Rows to use (local ids, sorted; None = all) and each global-batch label's column among them (-1 = elsewhere)."""
        local = labels - self.class_start
        on_shard = (local >= 0) & (local < self.num_local)
        if self.sample_rate >= 1.0:
            return None, torch.where(on_shard, local, torch.full_like(local, -1))
        positives = torch.unique(local[on_shard])
        num_sample = int(self.sample_rate * self.num_local)
        if positives.numel() >= num_sample:
            index = positives
        else:
            score = torch.rand(self.num_local, device=labels.device)
            score[positives] = 2.0  # above any U(0, 1) score: positives always win the top-k
            index = torch.topk(score, num_sample).indices.sort().values
        column = torch.searchsorted(index, local.clamp(0, max(self.num_local - 1, 0)))
        return index, torch.where(on_shard, column, torch.full_like(local, -1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of this rank's ``(b, D)`` embeddings and ``(b,)`` int64 labels; equal on every rank."""
        all_embeddings = AllGather.apply(embeddings.float())
        all_labels = _gather_varsize(labels)[0]
        check_labels(all_labels, self.num_classes)
        index, targets = self.sample(all_labels)
        self.last_index = index
        rows = self.weight if index is None else self.weight[index]
        rows = rows.detach()
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_(True)
            self._pending.append((index, rows))
        logits = self.margin(cosine_logits(all_embeddings, rows), targets)
        with torch.autocast(logits.device.type, enabled=False):
            return DistributedCrossEntropy.apply(logits, targets)

    # -- optimisation --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> bool:
        """Lazy SGD on the rows sampled since the last step; False (nothing changed) if no finite gradient.

        ``grad_scale`` is the AMP loss scale to divide out (1 without a GradScaler).
        """
        pending = [(index, rows.grad) for index, rows in self._pending if rows.grad is not None]
        self._pending.clear()
        if not pending:
            return False
        if len(pending) == 1:
            index, grad = pending[0]
        else:  # several micro-batches (gradient accumulation): sum gradients of repeated rows
            everything = torch.arange(self.num_local, device=self.weight.device)
            ids = torch.cat([everything if i is None else i for i, _ in pending])
            index, inverse = torch.unique(ids, return_inverse=True)
            grad = torch.zeros(len(index), self.embedding_size, device=ids.device).index_add_(
                0, inverse, torch.cat([g for _, g in pending])
            )
        grad = grad / grad_scale
        if not torch.isfinite(grad).all():
            return False
        rows = self.weight if index is None else self.weight[index]
        if self.weight_decay:
            grad = grad + self.weight_decay * rows
        if self.momentum_buffer is not None:
            buf = self.momentum_buffer if index is None else self.momentum_buffer[index]
            buf = buf.mul_(self.momentum).add_(grad)
            if index is not None:
                self.momentum_buffer.index_copy_(0, index, buf)
            grad = buf
        if index is None:
            self.weight.sub_(lr * grad)
        else:
            self.weight.index_copy_(0, index, rows.sub_(lr * grad))
        return True
