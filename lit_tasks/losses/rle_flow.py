"""RealNVP density on 2-D residuals: the learned error distribution G_phi of RLE (Li et al. 2021, §3.3).

RLE models the normalised residual ``mu_bar = (mu_hat - mu_gt) / sigma_hat`` of every keypoint with a
flow: an invertible map ``f`` from data ``x`` (2-D) to a latent ``z`` with a standard normal prior, so
(change of variables, Dinh et al. 2017, eq. 3)

    log G_phi(x) = log N(f(x); 0, I) + log |det df/dx|.

``f`` is the official RealNVP (Jeff-sjtu/res-loglikelihood-regression, ``rlepose/models/layers/real_nvp.py``
with ``nets`` / ``nett`` from ``regression_nf.py``): 6 affine couplings with masks ``[0, 1], [1, 0]``
alternating; coupling ``i`` keeps the masked coordinate ``m * x`` and maps the other one as

    x -> m * x + (1 - m) * (x - t_i(m * x)) * exp(-s_i(m * x)),     log |det| = -sum((1 - m) * s_i(m * x))

where ``s_i`` = Linear(2, 64) -> LeakyReLU -> Linear(64, 64) -> LeakyReLU -> Linear(64, 2) -> Tanh (the Tanh
bounds each log-scale to (-1, 1)) and ``t_i`` is the same network without the Tanh. ``log_prob`` applies the
couplings in reverse order, as the official ``backward_p``. The flow is only used by the loss: inference
never runs it.

Initialisation (REFERENCE.md §8.1): the official code defines ``RealNVP._init`` (xavier-uniform, gain 0.01,
on every flow Linear) but never calls it, so the official flow starts from PyTorch's default ``nn.Linear``
initialisation; that is our default (``xavier_gain=None``). mmpose's ``RealNVP`` (``mmpose/models/utils/
realnvp.py``) calls the xavier gain-0.01 initialisation in ``__init__``, a silent difference: pass
``xavier_gain=0.01`` to reproduce it. Either way the biases keep PyTorch's default uniform init, so even
mmpose's flow is not exactly the identity at the start (``s`` and ``t`` equal ``tanh(b)`` / ``b`` of the last
layer, up to ~0.12). mmpose also stores the prior's ``loc`` / ``cov`` as buffers; here the standard normal
is written out, so the state dict holds ``mask``, ``s.*`` and ``t.*`` (the official names).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LOG_2PI = math.log(2 * math.pi)


def _coupling_net(hidden: int, bounded: bool) -> nn.Sequential:
    """``Linear(2, hidden) -> LeakyReLU -> Linear(hidden, hidden) -> LeakyReLU -> Linear(hidden, 2) [-> Tanh]``."""
    layers: list[nn.Module] = [nn.Linear(2, hidden), nn.LeakyReLU(), nn.Linear(hidden, hidden), nn.LeakyReLU(),
                               nn.Linear(hidden, 2)]
    if bounded:
        layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class RealNVP(nn.Module):
    """The official RLE RealNVP on 2-D vectors with a standard normal prior (see the module docstring).

    Args:
        num_couplings: number of affine coupling layers (6 in the official code and mmpose).
        hidden: width of the scale / translation networks (64).
        xavier_gain: ``None`` keeps PyTorch's default Linear init (what the official training runs with);
            ``0.01`` re-initialises every weight with ``xavier_uniform_(gain=0.01)`` as mmpose does.
    """

    def __init__(self, num_couplings: int = 6, hidden: int = 64, xavier_gain: float | None = None) -> None:
        super().__init__()
        if num_couplings < 1 or hidden < 1:
            raise ValueError(f"RealNVP: num_couplings and hidden must be >= 1, got {num_couplings}, {hidden}")
        mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).repeat((num_couplings + 1) // 2, 1)[:num_couplings]
        self.register_buffer("mask", mask)
        # Attribute names and order as the official code, so its flow weights load as they are.
        self.t = nn.ModuleList([_coupling_net(hidden, bounded=False) for _ in range(num_couplings)])
        self.s = nn.ModuleList([_coupling_net(hidden, bounded=True) for _ in range(num_couplings)])
        if xavier_gain is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight, gain=xavier_gain)

    def inverse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Data -> latent: ``z = f(x)`` ``(N, 2)`` and ``log |det df/dx|`` ``(N,)`` for ``x`` of shape ``(N, 2)``."""
        log_det = x.new_zeros(x.shape[0])
        z = x
        for i in reversed(range(len(self.t))):
            m = self.mask[i]
            kept = m * z
            s = self.s[i](kept) * (1 - m)
            t = self.t[i](kept) * (1 - m)
            z = kept + (1 - m) * (z - t) * torch.exp(-s)
            log_det = log_det - s.sum(dim=1)
        return z, log_det

    def forward_map(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> data, the exact inverse of :meth:`inverse` (``(N, 2)`` -> ``(N, 2)``): used to sample."""
        x = z
        for i in range(len(self.t)):
            m = self.mask[i]
            kept = m * x
            s = self.s[i](kept) * (1 - m)
            t = self.t[i](kept) * (1 - m)
            x = kept + (1 - m) * (x * torch.exp(s) + t)
        return x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log G_phi(x)`` of ``(N, 2)`` points -> ``(N,)``, in the dtype of the flow's parameters.

        Computed with autocast off (a density is a sum of logs and exps that bf16 / fp16 would round
        badly); inputs are cast to the parameters' dtype (fp32 under Lightning's mixed precision).
        """
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"RealNVP.log_prob expects (N, 2) points, got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(self.mask.dtype)
            z, log_det = self.inverse(x)
            log_prior = -0.5 * (z * z).sum(dim=1) - _LOG_2PI  # log N(z; 0, I_2)
            return log_prior + log_det

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)
