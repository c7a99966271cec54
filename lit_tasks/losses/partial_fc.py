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

Optimisation: the centres are buffers, not Parameters, updated *lazily* (row-sparse) by :meth:`PartialFC.step`:
the sampled rows are copied out (``weight[index]``) as a leaf tensor, its gradient ``(n_sampled, D)`` is the
only centre gradient that exists, and weight decay, the optimizer state and the update touch exactly those rows;
a row that is not sampled is left alone (no decay, no momentum drift: the behaviour of sparse-embedding
optimizers). Per step the update touches ``n_sampled * D`` numbers instead of ``C * D``. The rule and its
hyperparameters are the task's optimizer's (:meth:`PartialFC.bind_optimizer`, then :meth:`PartialFC.step` with
one of its parameter groups, so the centres follow its learning-rate schedule):

* ``torch.optim.SGD``: momentum, Nesterov and (coupled) weight decay, as insightface trains its centres; state
  ``momentum_buffer`` ``(C, D)`` (none without momentum). With every row sampled it equals ``torch.optim.SGD``.
* ``torch.optim.AdamW`` / ``torch.optim.Adam`` (the ViT recipes): decoupled (AdamW) or coupled (Adam) weight
  decay; state ``exp_avg``, ``exp_avg_sq`` ``(C, D)`` and ``row_steps`` ``(C,)``: each row counts its own updates
  for the bias correction, so a row sampled for the first time at step 1000 is corrected as a fresh one. With
  every row sampled it equals ``torch.optim.AdamW`` / ``Adam`` on the full matrix.
* anything else, and ``dampening``, ``maximize``, ``amsgrad``, is refused by :meth:`PartialFC.bind_optimizer`.

The state is indexed by the same global row ids as the weight, so a row's state follows it however the sampled
subset changes.

Checkpoints: ``state_dict()`` gathers the full ``(C, D)`` weight and every state tensor from all ranks (a
collective: call it on every rank, as Lightning does), and loading takes the rows of this rank's shard from
it, so a checkpoint restores under any world size and a resumed run continues exactly; a wrong ``C`` or ``D`` is
a clear error.
"""

from __future__ import annotations

from typing import Any, Mapping

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
        rank, world_size: the sharding; default the current process group (1 shard without one).

    The update rule and its hyperparameters come from the optimizer (:meth:`bind_optimizer`, :meth:`step`).
    """

    RULE_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "row_steps")}
    STATE_NAMES = tuple(name for names in RULE_STATE.values() for name in names)

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_size: int,
        margin: CombinedMargin,
        sample_rate: float = 1.0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes, self.embedding_size = num_classes, embedding_size
        self.margin, self.sample_rate = margin, float(sample_rate)
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        self.register_buffer("weight", torch.normal(0.0, 0.01, (self.num_local, embedding_size)))
        self.rule = "sgd"
        self._pending: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self.last_index: torch.Tensor | None = None  # sampled rows of the last forward (local ids)

    @property
    def sharded(self) -> list[str]:
        """Names of the per-row tensors (weight and optimizer state) this module holds now."""
        return [name for name in ("weight", *self.STATE_NAMES) if getattr(self, name, None) is not None]

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
        for name in self.sharded:
            setattr(self, name, getattr(self, name)[start : start + num_local].clone())
        self.rank, self.world_size, self.class_start, self.num_local = rank, world_size, start, num_local
        self._pending.clear()

    def ddp_ignored_buffers(self, prefix: str) -> list[str]:
        """Fully qualified names DDP must neither broadcast nor check (they differ per rank), including state
        buffers created later (by the first :meth:`step` or a checkpoint)."""
        return [prefix + name for name in ("weight", *self.STATE_NAMES)]

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.world_size > 1:
            for name in self.sharded:
                destination[prefix + name] = _gather_varsize(getattr(self, name).detach())[0]

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        for name in ("weight", *self.STATE_NAMES):
            key = prefix + name
            if key not in state_dict:
                continue
            full = state_dict[key]
            expected = (self.num_classes, self.embedding_size) if name != "row_steps" else (self.num_classes,)
            if tuple(full.shape) != expected:
                error_msgs.append(
                    f"{key}: the checkpoint holds a {tuple(full.shape)} centre matrix, expected the full "
                    f"{expected} (num_identities x embedding_size); was it trained on other data?"
                )
                state_dict[key] = getattr(self, name, None)
                if state_dict[key] is None:
                    del state_dict[key]
                continue
            if getattr(self, name, None) is None:  # optimizer state of the run that saved it: resume exactly
                self.register_buffer(name, torch.empty((self.num_local, *full.shape[1:]), dtype=full.dtype,
                                                       device=self.weight.device))
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
    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the centres with ``optimizer``'s rule (module docstring); drop state of another rule.

        Raises:
            TypeError: an optimizer other than SGD, Adam or AdamW.
            ValueError: an option the lazy update does not reproduce (SGD ``dampening``, ``maximize``,
                ``amsgrad``), naming it.
        """
        if isinstance(optimizer, torch.optim.SGD):
            rule, unsupported = "sgd", {"dampening": 0, "maximize": False}
        elif isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
            rule, unsupported = "adam", {"amsgrad": False, "maximize": False}
        else:
            raise TypeError(f"Partial FC updates its centres with SGD, Adam or AdamW rules; {type(optimizer).__name__} "
                            "is not supported (use partial_fc=False to train the centres with any optimizer)")
        for group in optimizer.param_groups:
            for option, plain in unsupported.items():
                if group.get(option, plain) != plain:
                    raise ValueError(f"Partial FC's lazy {type(optimizer).__name__} update does not support "
                                     f"{option}={group[option]!r}")
        for name in self.STATE_NAMES:
            if name not in self.RULE_STATE[rule] and getattr(self, name, None) is not None:
                delattr(self, name)  # e.g. SGD momentum of a checkpoint resumed with AdamW
        self.rule = rule
        # The state exists from now on in every process (zeros, unless a checkpoint restored it), so all processes
        # gather the same tensors when a checkpoint is saved, even if one of them skipped a step.
        if rule == "adam":
            self._state("exp_avg", (self.embedding_size,), torch.float32)
            self._state("exp_avg_sq", (self.embedding_size,), torch.float32)
            self._state("row_steps", (), torch.int64)
        elif optimizer.param_groups[0].get("momentum", 0.0):
            self._state("momentum_buffer", (self.embedding_size,), torch.float32)

    def _state(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The state buffer ``name`` (all rows), created as zeros on first use."""
        if getattr(self, name, None) is None:
            self.register_buffer(name, torch.zeros((self.num_local, *shape), dtype=dtype, device=self.weight.device))
        return getattr(self, name)

    @torch.no_grad()
    def step(self, group: Mapping[str, Any], grad_scale: float = 1.0) -> bool:
        """Lazy update of the rows sampled since the last step; False (nothing changed) if no finite gradient.

        Args:
            group: hyperparameters as an optimizer parameter group holds them (``lr`` as now scheduled;
                SGD: ``momentum``, ``nesterov``, ``weight_decay``; Adam(W): ``betas``, ``eps``,
                ``weight_decay``, ``decoupled_weight_decay``), for the rule chosen by :meth:`bind_optimizer`.
            grad_scale: the AMP loss scale to divide out (1 without a GradScaler).
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
        rows = _Rows(index)
        lr, weight_decay = float(group["lr"]), float(group.get("weight_decay", 0.0))
        if self.rule == "sgd":
            self._sgd_rows(rows, grad, lr, weight_decay, group)
        else:
            self._adam_rows(rows, grad, lr, weight_decay, group)
        return True

    def _sgd_rows(self, rows: _Rows, grad: torch.Tensor, lr: float, weight_decay: float,
                  group: Mapping[str, Any]) -> None:
        """``torch.optim.SGD`` on the rows (zero-initialised momentum == torch's ``buf = grad`` without dampening)."""
        momentum = float(group.get("momentum", 0.0))
        weight = rows.take(self.weight)
        if weight_decay:
            grad = grad.add(weight, alpha=weight_decay)
        if momentum:
            buffer = self._state("momentum_buffer", (self.embedding_size,), torch.float32)
            buf = rows.put(buffer, rows.take(buffer).mul_(momentum).add_(grad))
            grad = grad.add(buf, alpha=momentum) if group.get("nesterov", False) else buf
        rows.put(self.weight, weight.add_(grad, alpha=-lr))

    def _adam_rows(self, rows: _Rows, grad: torch.Tensor, lr: float, weight_decay: float,
                   group: Mapping[str, Any]) -> None:
        """``torch.optim.Adam`` / ``AdamW`` on the rows, each with its own step count for the bias correction."""
        beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
        eps = float(group.get("eps", 1e-8))
        weight = rows.take(self.weight)
        if weight_decay:
            if group.get("decoupled_weight_decay", False):
                weight.mul_(1.0 - lr * weight_decay)
            else:
                grad = grad.add(weight, alpha=weight_decay)
        exp_avg_all = self._state("exp_avg", (self.embedding_size,), torch.float32)
        exp_avg_sq_all = self._state("exp_avg_sq", (self.embedding_size,), torch.float32)
        steps_all = self._state("row_steps", (), torch.int64)
        steps = rows.put(steps_all, rows.take(steps_all).add_(1))
        exp_avg = rows.put(exp_avg_all, rows.take(exp_avg_all).lerp_(grad, 1.0 - beta1))
        exp_avg_sq = rows.put(exp_avg_sq_all,
                              rows.take(exp_avg_sq_all).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2))
        # Bias corrections per row in float64, as torch computes them in Python floats per tensor.
        t = steps.double()[:, None]
        step_size = (lr / (1.0 - beta1**t)).float()
        correction2_sqrt = torch.sqrt(1.0 - beta2**t).float()
        denom = (exp_avg_sq.sqrt() / correction2_sqrt).add_(eps)
        rows.put(self.weight, weight.sub_(step_size * exp_avg / denom))


class _Rows:
    """The rows one step updates: all of them (``index`` None: tensors are updated in place) or ``index``."""

    def __init__(self, index: torch.Tensor | None) -> None:
        self.index = index

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor``: the tensor itself for all rows, else a copy to update and :meth:`put` back."""
        return tensor if self.index is None else tensor[self.index]

    def put(self, tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write updated ``rows`` into ``tensor`` (nothing to do for all rows: they were updated in place)."""
        if self.index is not None:
            tensor.index_copy_(0, self.index, rows)
        return rows
