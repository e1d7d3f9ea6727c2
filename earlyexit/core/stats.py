"""Per-layer statistics of lens distributions, computed chunk by chunk in float32.

Nothing here ever holds layers × positions × vocabulary at once: logits are formed for a chunk of
rows, reduced to small statistics, and dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from earlyexit.core.lenses import Lens

# Upper bound on the float32 logits held at once (bytes). 64 MiB keeps the working set near cache size
# on a laptop and is large enough that the matrix products stay efficient.
CHUNK_BYTES = 64 * 2**20
# For one decoding step (a batch's last positions, every layer) a larger bound lets all rows go through
# the head in one product: on 2 AVX2 cores a [496, 576] × [576, 49152] product runs at ~150 GFLOP/s,
# five times fewer rows at ~115, and one sequence's 31 rows at ~58.
STEP_CHUNK_BYTES = 256 * 2**20


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


class Workspace:
    """The two float32 buffers :func:`layer_stats` works in, kept between calls.

    A fresh buffer of a hundred MB costs a page fault per 4 KiB on first touch, which on a laptop CPU
    is a tenth of the time of the product that fills it; a loop that calls :func:`layer_stats` many
    times (one decoding step after another) keeps one workspace and pays that once.
    """

    def __init__(self) -> None:
        self._bufs: tuple[Tensor, Tensor] | None = None

    def get(self, numel: int, device) -> tuple[Tensor, Tensor]:
        bufs = self._bufs
        if bufs is None or bufs[0].numel() < numel or bufs[0].device != torch.device(device):
            bufs = self._bufs = (torch.empty(numel, device=device), torch.empty(numel, device=device))
        return bufs


def _buffer(flat: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view on the front of the flat buffer ``flat``."""
    return flat[:math.prod(shape)].view(*shape)


def chunk_rows(vocab_size: int, n_entries: int, chunk_bytes: int) -> int:
    """Rows that :func:`layer_stats` handles at once: two buffers of ``n_entries × rows × V`` floats
    (logits, then scratch) within ``chunk_bytes``."""
    return max(1, chunk_bytes // (2 * 4 * vocab_size * n_entries))


@torch.no_grad()
def layer_stats(
    lens: Lens,
    hidden: Tensor,
    entries: list[int],
    *,
    top_k: int = 5,
    targets: Tensor | None = None,
    final: Tensor | None = None,
    final_logits: Tensor | None = None,
    keep_probs: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
    workspace: "Workspace | None" = None,
) -> Stats:
    """Statistics of the distributions ``lens`` reads from ``hidden`` ``[E, N, d]`` (of hidden-state ``entries``).

    targets: ``[N, n_t]`` token ids whose probability and rank to report (or ``None``).
    final: ``[N, d]`` the final (entry L) hidden state of the same rows, to get KL to the final layer;
    or final_logits: ``[N, V]`` the model's own logits of those rows (saves a product when at hand).
    workspace: buffers to reuse across calls (see :class:`Workspace`).
    """
    E, N, _ = hidden.shape
    unembed = lens.unembed
    V = unembed.vocab_size
    if top_k < 1 or top_k > V:
        raise ValueError(f"top_k must be in 1..{V}, got {top_k}")
    if targets is not None and (targets.dim() != 2 or targets.shape[0] != N):
        raise ValueError(f"targets must be [N={N}, n_t], got {tuple(targets.shape)}")
    if final is not None and final_logits is not None:
        raise ValueError("give final (hidden states) or final_logits, not both")
    if final is not None and final.shape[0] != N:
        raise ValueError(f"final must be [N={N}, d], got {tuple(final.shape)}")
    if final_logits is not None and tuple(final_logits.shape) != (N, V):
        raise ValueError(f"final_logits must be [N={N}, V={V}], got {tuple(final_logits.shape)}")
    rows = min(N, chunk_rows(V, E, chunk_bytes))
    dev = hidden.device
    entropy = torch.empty(E, N, device=dev)
    top_ids = torch.empty(E, N, top_k, dtype=torch.long, device=dev)
    top_probs = torch.empty(E, N, top_k, device=dev)
    n_t = targets.shape[1] if targets is not None else 0
    t_probs = torch.empty(E, N, n_t, device=dev) if targets is not None else None
    t_ranks = torch.empty(E, N, n_t, dtype=torch.long, device=dev) if targets is not None else None
    with_kl = final is not None or final_logits is not None
    kl = torch.empty(E, N, device=dev) if with_kl else None
    probs = torch.empty(E, N, V, device=dev) if keep_probs else None
    if workspace is None:
        workspace = Workspace()
    logits_buf, scratch_buf = workspace.get(E * rows * V, dev)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        n = e - s
        logits = lens.logits(hidden[:, s:e], entries, out=_buffer(logits_buf, E, n, V))
        scratch = _buffer(scratch_buf, E, n, V)
        top_logits, top_ids[:, s:e] = logits.topk(top_k, dim=-1)
        row_max = top_logits[..., :1]  # [E, n, 1]
        if targets is not None:
            t_logit = logits.gather(-1, targets[s:e].unsqueeze(0).expand(E, -1, -1))  # [E, n, n_t]
            for j in range(n_t):  # rank = how many logits exceed the target's (counted as floats: fast)
                t_ranks[:, s:e, j] = torch.gt(logits, t_logit[..., j:j + 1], out=scratch).sum(-1).long()
        # z = logits − max ≤ 0 (in place); p̃ = exp(z); S = Σ p̃; log p = z − log S
        z = logits.sub_(row_max)
        p = torch.exp(z, out=scratch)
        log_s = p.sum(-1).log_()  # [E, n]
        top_probs[:, s:e] = (top_logits - row_max - log_s[..., None]).exp_()
        if targets is not None:
            t_probs[:, s:e] = (t_logit - row_max - log_s[..., None]).exp_()
        if probs is not None:
            probs[:, s:e] = p / log_s.exp()[..., None]
        # H = −Σ p log p = log S − Σ p̃·z / S
        entropy[:, s:e] = log_s - p.mul_(z).sum(-1) / log_s.exp()
        if with_kl:
            # KL(p_f ‖ p_e) = Σ p_f·(z_f − z_e) + log S_e − log S_f, written so that it is exactly 0
            # where the entry's logits equal the final ones
            if final_logits is not None:
                z_f = final_logits[s:e].float()
                z_f = z_f - z_f.amax(-1, keepdim=True)
            else:
                z_f = unembed(final[s:e], normed=False)  # entry L is already normed
                z_f = z_f.sub_(z_f.amax(-1, keepdim=True))
            log_s_f = z_f.exp().sum(-1).log_()  # [n]
            p_f = (z_f - log_s_f[:, None]).exp_()
            diff = torch.sub(z_f.unsqueeze(0), z, out=scratch)
            kl[:, s:e] = diff.mul_(p_f.unsqueeze(0)).sum(-1) + (log_s - log_s_f)
        del logits, z, p
    return Stats(entropy, top_ids, top_probs, t_probs, t_ranks, kl, probs)
