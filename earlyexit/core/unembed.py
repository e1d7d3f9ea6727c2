"""The one path from a hidden state to logits that every lens goes through."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from earlyexit.core.arch import ArchSpec, ResolvedArch, resolve_arch
from earlyexit.core.errors import EarlyexitError


class NonFiniteLogits(EarlyexitError, FloatingPointError):
    """Half-precision logits that came out NaN or infinite (float16 overflows past 65,504)."""


def check_finite(logits: Tensor, dtype: torch.dtype) -> None:
    """Raise :class:`NonFiniteLogits` when ``logits`` (upcast from a half-precision head of ``dtype``) hold
    NaN or inf: statistics of them would be silently wrong."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        n = int(bad.sum())
        raise NonFiniteLogits(
            f"{n} of {logits.numel()} {str(dtype).replace('torch.', '')} logits are NaN or infinite: the model's "
            "hidden states or its output head overflowed"
            + (" float16 (largest value 65,504; the raw lens reads un-normed residual streams, which grow large)"
               if dtype == torch.float16 else "")
            + ". Load the model in bfloat16 (same memory, float32's range) or float32: "
            "load_model(name, dtype=torch.bfloat16).")

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

    @property
    def device(self) -> torch.device:
        """Where the head computes: its own device, or for a model dispatched by accelerate (``device_map``,
        offloading) the execution device of its hook."""
        from earlyexit.core.parallel import module_device

        return module_device(self.head)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def forward(self, hidden: Tensor, normed: bool = True, out: Tensor | None = None,
                transposed: bool = False) -> Tensor:
        """hidden ``[..., d]`` → float32 logits ``[..., V]``.

        ``out``: a contiguous float32 tensor of the result's shape to write into (a reused buffer
        saves allocating, and page-faulting, a large tensor per call). ``transposed``: compute a linear
        head as ``W @ hᵀ`` — with a few rows (one decoding step) and a large vocabulary this BLAS layout
        is faster on CPU than ``h @ Wᵀ``; the default is the head's own call, bit for bit the model's.

        Sharded and half-precision models: ``hidden`` is moved to the head's device when it is elsewhere
        (callers that read many entries move a step's states once, before), the head runs in its own
        dtype, and its output is upcast to float32 right away, before soft-capping and every statistic;
        half-precision logits that are NaN or inf raise :class:`NonFiniteLogits`. An offloaded head
        (weights on ``meta`` between calls) is always called as a module, so accelerate's hook loads it."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} != model hidden size {self.hidden_size}")
        dev = self.device
        if hidden.device != dev:
            hidden = hidden.to(dev)
        h = self.final_norm(hidden) if normed else hidden
        w = self.head.weight
        if h.device != dev:  # a final norm on another device than the head
            h = h.to(dev)
        if h.dtype != w.dtype:  # e.g. float32 hidden states read by a bfloat16 head
            h = h.to(w.dtype)
        at_hand = w.device.type != "meta"  # not offloaded by accelerate's hooks
        if out is None:
            if transposed and at_hand and self._plain_linear(h):
                return self._finish(self._head_transposed(h))
            return self._finish(self.head(h))
        if out.shape != (*h.shape[:-1], self.vocab_size) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {(*h.shape[:-1], self.vocab_size)}, got {tuple(out.shape)}")
        bias = getattr(self.head, "bias", None)
        if at_hand and isinstance(self.head, nn.Linear) and h.dtype == w.dtype == out.dtype:
            torch.matmul(h, w.t(), out=out)
            if bias is not None:
                out.add_(bias)
        else:  # the head's own call (offloaded, not linear, or half precision), upcast into the buffer
            out.copy_(self.head(h))
            if h.dtype in (torch.float16, torch.bfloat16):
                check_finite(out, h.dtype)
        if self.scale is not None:
            out.mul_(self.scale)
        if self.softcap is not None:  # the same float ops as postprocess, in place
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out

    def _finish(self, logits: Tensor) -> Tensor:
        """Head output → float32 (checked finite when it came in half precision) → post-processing."""
        if logits.dtype != torch.float32:
            low = logits.dtype
            logits = logits.float()
            if low in (torch.float16, torch.bfloat16):
                check_finite(logits, low)
        return self.postprocess(logits)

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
