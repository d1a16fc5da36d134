"""Dense tasks whose predictions are probability maps, saved as 8-bit grey PNGs (saliency, boundaries)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from polytask.tasks.base import DepthFormat, Size, Task
from polytask.tasks.codes import probability_codes, quantize_probabilities


def resize_bilinear(value: torch.Tensor, size: Size) -> torch.Tensor:
    """A float map ``(H, W)`` or ``(C, H, W)`` resized bilinearly to ``size`` (same number of axes)."""
    planar = value[None] if value.dim() == 3 else value[None, None]
    out = F.interpolate(planar.float(), size=size, mode="bilinear", align_corners=False)[0]
    return out if value.dim() == 3 else out[0]


class ProbabilityMapTask(Task):
    """A dense task predicting a probability per pixel, ``(H, W)`` or ``(1, H, W)`` (:meth:`value_shape`).

    Files hold ``floor(255 p)`` as an 8-bit grey PNG; 16-bit PNGs are read too (``v / 65535``, as
    SEISM's readers do).
    """

    prediction_format = "probability"

    def resize_prediction(self, value: torch.Tensor, size: Size) -> torch.Tensor:
        """Probabilities resized bilinearly to ``size``."""
        return resize_bilinear(value, size)

    def encode_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
        """uint8 ``(H, W)`` ``floor(255 p)``, ``.png``.

        Raises:
            ValueError: a wrong shape or non-finite values.
        """
        self.check_prediction(value)
        array = value.detach().cpu().numpy()
        return probability_codes(array.reshape(array.shape[-2:])), ".png"

    def quantize_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
        """``floor(255 p) / 255`` in float32."""
        out = quantize_probabilities(value.detach().cpu().numpy())
        return torch.from_numpy(np.ascontiguousarray(out)).to(value.device)

    def decode_prediction(self, stored: np.ndarray) -> torch.Tensor:
        """The probabilities ``(H, W)`` read from the PNG, laid out as :meth:`value_shape`."""
        return torch.from_numpy(stored.reshape(self.value_shape((stored.shape[-2], stored.shape[-1]))))
