"""The one path from a hidden state to logits that every lens goes through."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from earlyexit.core.arch import ArchSpec, ResolvedArch, resolve_arch

class Unembed(nn.Module):
    """Final norm → output head → logit post-processing (soft-capping, scaling).

    ``normed=False`` skips the final norm (the "raw" lens of the original study and of DoLa).
    The hidden-state entry L from ``output_hidden_states`` is already normed by transformers, so
    callers pass ``normed=False`` for it (see :meth:`for_entry`).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
    >>> unembed = Unembed(LlamaForCausalLM(cfg))
    >>> unembed(torch.zeros(3, 16)).shape
    torch.Size([3, 64])
    """

    def __init__(self, model: nn.Module, arch: ArchSpec | ResolvedArch | None = None):
        super().__init__()
        resolved = arch if isinstance(arch, ResolvedArch) else resolve_arch(model, arch)
        self.arch = resolved
        self.final_norm = resolved.final_norm
        self.head = resolved.head
        self.n_layers = resolved.n_layers
        self.softcap = resolved.softcap
        self.scale = resolved.scale

    @property
    def vocab_size(self) -> int:
        return int(self.head.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.head.weight.shape[1])

    def postprocess(self, logits: Tensor) -> Tensor:
        """Apply the model's own logit post-processing to head outputs."""
        if self.scale is not None:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward(self, hidden: Tensor, normed: bool = True, out: Tensor | None = None,
                transposed: bool = False) -> Tensor:
        """hidden ``[..., d]`` → float32 logits ``[..., V]``.

        ``out``: a contiguous float32 tensor of the result's shape to write into (a reused buffer
        saves allocating, and page-faulting, a large tensor per call). ``transposed``: compute a linear
        head as ``W @ hᵀ`` — with a few rows (one decoding step) and a large vocabulary this BLAS layout
        is faster on CPU than ``h @ Wᵀ``; the default is the head's own call, bit for bit the model's."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} != model hidden size {self.hidden_size}")
        h = self.final_norm(hidden) if normed else hidden
        if out is None:
            if transposed and self._plain_linear(h):
                return self.postprocess(self._head_transposed(h)).float()
            return self.postprocess(self.head(h)).float()
        if out.shape != (*h.shape[:-1], self.vocab_size) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {(*h.shape[:-1], self.vocab_size)}, got {tuple(out.shape)}")
        w, bias = self.head.weight, getattr(self.head, "bias", None)
        if isinstance(self.head, nn.Linear) and h.dtype == w.dtype == out.dtype:
            torch.matmul(h, w.t(), out=out)
            if bias is not None:
                out.add_(bias)
            if self.scale is not None:
                out.mul_(self.scale)
            if self.softcap is not None:  # the same float ops as postprocess, in place
                out.div_(self.softcap).tanh_().mul_(self.softcap)
            return out
        return out.copy_(self.postprocess(self.head(h)))

    def _plain_linear(self, h: Tensor) -> bool:
        w = getattr(self.head, "weight", None)
        return isinstance(self.head, nn.Linear) and w is not None and h.dtype == w.dtype

    def _head_transposed(self, h: Tensor) -> Tensor:
        w, bias = self.head.weight, self.head.bias
        flat = h.reshape(-1, h.shape[-1])
        out = torch.mm(w, flat.t()).t().contiguous()
        if bias is not None:
            out = out + bias
        return out.view(*h.shape[:-1], w.shape[0])
