"""SmoothQuant scales and the outlier measure that picks the layers needing them. Pure maths.

Per input channel j: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``. Dividing the activation by
s and multiplying the weight's column j by s leaves the product unchanged in float, and moves
the outlier channels of X (which per-tensor int8 cannot represent) into W (quantized per row or
per group, so it copes better).
"""

from __future__ import annotations

import torch

__all__ = ["ALPHAS", "outlier_ratio", "smoothing_scales", "weight_channel_absmax"]

ALPHAS = (0.5, 0.65, 0.8)  # the migration strengths tried per layer
EPS = 1e-5


def weight_channel_absmax(weight: torch.Tensor | torch.nn.Module) -> torch.Tensor:
    """max |W| per input channel: dim 1 of a Linear (out, in) or Conv2d (out, in, kh, kw) weight."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"not a weight tensor: {type(weight).__name__}")
    w = weight.detach().abs().transpose(0, 1)
    return w.reshape(w.shape[0], -1).amax(1)


def smoothing_scales(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The per-channel scales s (float32, > 0) for one layer."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    a = act_absmax.float().clamp(min=EPS)
    w = weight_absmax.float().clamp(min=EPS)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    return s.clamp(min=EPS)


def outlier_ratio(act_absmax: torch.Tensor) -> float:
    """Largest channel range over the median one: how far per-tensor scaling wastes resolution."""
    a = act_absmax.float()
    return float(a.max() / a.median().clamp(min=EPS))
