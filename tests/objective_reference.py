"""Naive float64 implementations of the objectives, written straight from the spec's formulas.

The product code is written for speed (fused row sums, a custom backward, numpy for
per-sequence math); these are written for obviousness, so that comparing the two checks both
the loss values and autograd's gradients against the spec.
"""

from __future__ import annotations

import torch

CLAMP = 20.0


def aggregate(tok: torch.Tensor, m: torch.Tensor, mode: str) -> torch.Tensor:
    lengths = m.sum(-1)
    rows = (tok * m).sum(-1)
    valid = lengths > 0
    if not valid.any():
        return tok.sum() * 0.0
    if mode == "token-mean":
        return rows.sum() / lengths.sum()
    if mode == "seq-mean-token-mean":
        return (rows[valid] / lengths[valid]).mean()
    if mode == "seq-mean-token-sum":
        return rows[valid].mean()
    raise ValueError(mode)


def seq_advantage(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (a * m).sum(-1) / m.sum(-1).clamp(min=1)


def vespo_phi(s, k, lam):
    lam = torch.as_tensor(lam, dtype=torch.float64).clamp(min=1e-4)
    s = s.clamp(-CLAMP, CLAMP)
    return torch.nan_to_num(torch.exp(lam + k * s - lam * torch.exp(s)), nan=0.0, posinf=0.0, neginf=0.0)


def vespo(lp, mu, a, m, k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0, agg="token-mean", rho=None):
    r = (lp.detach() - mu).clamp(-CLAMP, CLAMP)
    s = (r * m).sum(-1)
    if rho is not None:
        s = s + (torch.log(rho).clamp(-CLAMP, CLAMP) * m).sum(-1)
    s = s.clamp(-CLAMP, CLAMP)
    pos = seq_advantage(a, m) >= 0
    k = torch.where(pos, torch.tensor(k_pos, dtype=s.dtype), torch.tensor(k_neg, dtype=s.dtype))
    lam = torch.where(pos, torch.tensor(lambda_pos, dtype=s.dtype), torch.tensor(lambda_neg, dtype=s.dtype))
    phi = vespo_phi(s, k, lam)
    return aggregate(-phi.unsqueeze(-1) * a * lp, m, agg), torch.exp(s), phi


def ratio(lp, mu):
    return torch.exp((lp - mu).clamp(-CLAMP, CLAMP))


def grpo(lp, mu, a, m, eps_low=0.2, eps_high=0.2, dual_clip=3.0, agg="token-mean"):
    r = ratio(lp, mu)
    pg = torch.maximum(-a * r, -a * r.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        pg = torch.where(a < 0, torch.minimum(pg, -a * dual_clip), pg)
    return aggregate(pg, m, agg)


def gspo(lp, mu, a, m, eps_low=3e-4, eps_high=4e-4, agg="seq-mean-token-mean"):
    s_bar = ((lp.detach() - mu).clamp(-CLAMP, CLAMP) * m).sum(-1) / m.sum(-1).clamp(min=1)
    r = torch.exp((lp - lp.detach() + s_bar.unsqueeze(-1)).clamp(max=10.0))
    pg = torch.maximum(-a * r, -a * r.clamp(1 - eps_low, 1 + eps_high))
    return aggregate(pg, m, agg)


def sapo(lp, mu, a, m, tau_pos=1.0, tau_neg=1.05, agg="seq-mean-token-mean"):
    r = ratio(lp, mu)
    tau = torch.where(a > 0, torch.tensor(tau_pos, dtype=lp.dtype), torch.tensor(tau_neg, dtype=lp.dtype))
    gate = torch.sigmoid(tau * (r - 1)) * 4 / tau
    return aggregate(-gate * a, m, agg)


def cispo(lp, mu, a, m, eps_low=0.2, eps_high=0.2, agg="token-mean"):
    w = ratio(lp, mu).detach().clamp(1 - eps_low, 1 + eps_high)
    return aggregate(-w * a * lp, m, agg)


REFERENCE = {"grpo": grpo, "gspo": gspo, "sapo": sapo, "cispo": cispo, "vespo": lambda *x, **kw: vespo(*x, **kw)[0]}
