"""Per-layer statistics of lens distributions, computed chunk by chunk in float32.

Nothing here ever holds layers × positions × vocabulary at once: logits are formed for a chunk of
rows, reduced to small statistics, and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from earlyexit.unembed import Unembed

# Upper bound on the float32 logits held at once (bytes). 64 MiB keeps the working set near cache size
# on a laptop and is large enough that the matrix products stay efficient.
CHUNK_BYTES = 64 * 2**20


@dataclass
class Stats:
    """Statistics for ``n_entries`` hidden-state entries × ``N`` rows.

    entropy ``[E, N]`` (nats); top_ids / top_probs ``[E, N, k]``; target_probs / target_ranks
    ``[E, N, n_t]`` (rank 0 = the top token); kl_to_final ``[E, N]`` = KL(p_final ‖ p_entry);
    probs ``[E, N, V]`` only when asked.
    """

    entropy: Tensor
    top_ids: Tensor
    top_probs: Tensor
    target_probs: Tensor | None = None
    target_ranks: Tensor | None = None
    kl_to_final: Tensor | None = None
    probs: Tensor | None = None
    extra: dict = field(default_factory=dict)


def entry_logits(unembed: Unembed, hidden: Tensor, entries: list[int], lens: str) -> Tensor:
    """hidden ``[E, n, d]`` of hidden-state ``entries`` → logits ``[E, n, V]`` (float32)."""
    if hidden.dim() != 3 or hidden.shape[0] != len(entries):
        raise ValueError(f"hidden must be [E={len(entries)}, n, d], got {tuple(hidden.shape)}")
    norm_mask = [unembed.needs_norm(e, lens) for e in entries]
    if all(norm_mask) or not any(norm_mask):
        return unembed(hidden, normed=norm_mask[0])
    out = torch.empty(hidden.shape[0], hidden.shape[1], unembed.vocab_size, device=hidden.device)
    idx_n = [i for i, m in enumerate(norm_mask) if m]
    idx_r = [i for i, m in enumerate(norm_mask) if not m]
    out[idx_n] = unembed(hidden[idx_n], normed=True)
    out[idx_r] = unembed(hidden[idx_r], normed=False)
    return out


@torch.no_grad()
def layer_stats(
    unembed: Unembed,
    hidden: Tensor,
    entries: list[int],
    *,
    lens: str = "normed",
    top_k: int = 5,
    targets: Tensor | None = None,
    final: Tensor | None = None,
    keep_probs: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> Stats:
    """Statistics of the lens distributions of ``hidden`` ``[E, N, d]``.

    targets: ``[N, n_t]`` token ids whose probability and rank to report (or ``None``).
    final: ``[N, d]`` the final (entry L) hidden state of the same rows, to get KL to the final layer.
    """
    E, N, _ = hidden.shape
    V = unembed.vocab_size
    if top_k < 1 or top_k > V:
        raise ValueError(f"top_k must be in 1..{V}, got {top_k}")
    if targets is not None and (targets.dim() != 2 or targets.shape[0] != N):
        raise ValueError(f"targets must be [N={N}, n_t], got {tuple(targets.shape)}")
    if final is not None and final.shape[0] != N:
        raise ValueError(f"final must be [N={N}, d], got {tuple(final.shape)}")
    rows = max(1, chunk_bytes // (4 * V * (E + (final is not None))))
    dev = hidden.device
    entropy = torch.empty(E, N, device=dev)
    top_ids = torch.empty(E, N, top_k, dtype=torch.long, device=dev)
    top_probs = torch.empty(E, N, top_k, device=dev)
    n_t = targets.shape[1] if targets is not None else 0
    t_probs = torch.empty(E, N, n_t, device=dev) if targets is not None else None
    t_ranks = torch.empty(E, N, n_t, dtype=torch.long, device=dev) if targets is not None else None
    kl = torch.empty(E, N, device=dev) if final is not None else None
    probs = torch.empty(E, N, V, device=dev) if keep_probs else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        logits = entry_logits(unembed, hidden[:, s:e], entries, lens)  # [E, n, V]
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        entropy[:, s:e] = -(p * logp).sum(-1)
        tp, ti = logp.topk(top_k, dim=-1)
        top_ids[:, s:e], top_probs[:, s:e] = ti, tp.exp()
        if targets is not None:
            idx = targets[s:e].unsqueeze(0).expand(E, -1, -1)
            t_logit = logits.gather(-1, idx)
            t_probs[:, s:e] = logp.gather(-1, idx).exp()
            t_ranks[:, s:e] = (logits.unsqueeze(-2) > t_logit.unsqueeze(-1)).sum(-1)
        if final is not None:
            lpf = torch.log_softmax(unembed(final[s:e], normed=False), dim=-1)  # entry L is already normed
            kl[:, s:e] = (lpf.exp() * (lpf - logp)).sum(-1)
        if probs is not None:
            probs[:, s:e] = p
        del logits, logp, p
    return Stats(entropy, top_ids, top_probs, t_probs, t_ranks, kl, probs)
