"""Weight-only int8 for decoding on a CPU: ``load_model(..., quantize="int8")``.

Generating one token at a time, a small LM on a CPU reads every weight of its linear
layers once per token, so those reads are about half of a decode step
(``docs/embedded-model.md``, "Speed"). Here the language model's ``nn.Linear`` layers and
the LM head keep their weights in int8 (one float scale per output row, symmetric, round
to nearest) and multiply with ``torch.ops.aten._weight_int8pack_mm``: a quarter of the
bytes of float32. Activations go through the kernel in bfloat16, its fast path on x86
(float32 activations take it about 10x longer); everything else (the attention, the
norms, the KV cache and its scoring, the vision tower) stays as it was.

Measured on the default model (2 threads, ``bench/bench_embedded.py``): 1.6x faster
decoding (80 tokens in 3.20 s against 5.18 s), the same accuracy on 100 validation scenes
(``docs/embedded-model.md``, "Speed"). Not the default: every number in ``docs/`` was
measured in float32.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTIZE_CHOICES = ("int8",)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and one scale per output row.

    ``y = (x @ (weight_int8 * scale[:, None]).T) + bias``, with ``x`` rounded to bfloat16 on
    the way in and the result returned in ``x``'s dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # the largest entry of each row -> 127
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by."""
        return self.weight_int8.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight_int8, self.scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def language_model(model) -> nn.Module:
    """The decoder of an LVLM (or the model itself for a text-only LM)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def quantize_int8(model) -> int:
    """Replace the language model's ``nn.Linear`` layers and the LM head by :class:`Int8Linear`.

    In place; returns how many layers were replaced. The vision tower and the projector
    run once per image and are left in their dtype. CPU only.
    """
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("quantize='int8' is for decoding on a CPU; on a GPU use dtype=torch.bfloat16")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    replaced = 0
    for module in list(language_model(model).modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
                replaced += 1
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.from_linear(head))
        replaced += 1
    return replaced
