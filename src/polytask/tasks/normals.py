"""Surface normals: a unit vector per pixel."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import MaximumRoamingNormalsMetric, MetricProtocol, NormalsMetric, check_protocol
from polytask.tasks.base import DepthFormat, Size, TargetProblemKind, Task, nan_problems
from polytask.tasks.codes import decode_directions, direction_codes
from polytask.tasks.probability import resize_bilinear
from polytask.viz import colorize_normals


class NormalsTask(Task):
    """Surface normals: L1 on the L2-normalised prediction; predictions are unit vectors ``(3, H, W)``.

    Targets are float32 ``(3, H, W)`` (x right, y down, z towards the camera; invalid pixels all 0,
    ignored pixels 255 in every channel). Predictions are saved as 8-bit RGB PNGs of
    ``floor((n + 1) 255 / 2)``.
    """

    higher_is_better = {"mean": False}
    transform_kind = "direction"
    prediction_format = "direction"

    def __init__(self, name: str = "normals") -> None:
        super().__init__(name, 3)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Normals L1: output and target ``(B, 3, H, W)``."""
        return losses.normals_l1(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Unit normals ``(B, 3, H, W)``."""
        return F.normalize(output.float(), p=2, dim=1)

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(3, H, W)``."""
        return (3, size[0], size[1])

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """NaNs."""
        return nan_problems(value)

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random unit vectors ``(B, 3, H, W)`` float32."""
        return F.normalize(torch.randn(batch_size, 3, *size, generator=generator), dim=1)

    def resize_prediction(self, value: torch.Tensor, size: Size) -> torch.Tensor:
        """Normals ``(3, H, W)`` resized bilinearly to ``size``, then renormalised to unit length."""
        return F.normalize(resize_bilinear(value, size), dim=0)

    def encode_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
        """uint8 ``(H, W, 3)`` codes, ``.png``.

        Raises:
            ValueError: a wrong shape or non-finite values.
        """
        self.check_prediction(value)
        return direction_codes(value.detach().cpu().numpy().transpose(1, 2, 0)), ".png"

    def quantize_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
        """``2 floor((n + 1) 255 / 2) / 255 - 1`` in float32 (channels at dim -3)."""
        codes = direction_codes(np.moveaxis(value.detach().cpu().numpy(), -3, -1))
        out = np.moveaxis(decode_directions(codes), -1, -3)
        return torch.from_numpy(np.ascontiguousarray(out)).to(value.device)

    def decode_prediction(self, stored: np.ndarray) -> torch.Tensor:
        """float32 ``(3, H, W)`` from the RGB PNG's ``(H, W, 3)`` codes."""
        return torch.from_numpy(np.ascontiguousarray(decode_directions(stored).transpose(2, 0, 1)))

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingNormalsMetric()
        return NormalsMetric()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_normals(value.float().cpu().numpy())
