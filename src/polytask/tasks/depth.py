"""Metric depth: a distance in metres per pixel."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from polytask import losses
from polytask.metrics import DepthMetric, MaximumRoamingDepthMetric, MetricProtocol, check_protocol
from polytask.tasks.base import DepthFormat, Size, TargetProblemKind, Task, nan_problems
from polytask.tasks.codes import DEPTH_PNG_SCALE, depth_codes
from polytask.tasks.probability import resize_bilinear
from polytask.viz import colorize_depth


class DepthTask(Task):
    """Metric depth with masked L1; predictions are depths in metres ``(1, H, W)``.

    Targets are float32 ``(1, H, W)`` metres (0 invalid, 255 ignored). Predictions are saved as
    float32 ``.npy`` ``(H, W)`` metres or 16-bit PNGs of millimetres (``depth_format``).
    """

    higher_is_better = {"rmse": False}
    transform_kind = "distance"
    prediction_format = "distance"

    def __init__(self, name: str = "depth") -> None:
        super().__init__(name, 1)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Masked L1: output and target ``(B, 1, H, W)``."""
        return losses.depth_l1(output, target)

    def postprocess(self, output: torch.Tensor) -> torch.Tensor:
        """Depth ``(B, 1, H, W)`` in float32, clamped at 0 as the InvPT post-processing does."""
        return output.float().clamp(min=0.0)

    def value_shape(self, size: Size) -> tuple[int, ...]:
        """``(1, H, W)``."""
        return (1, size[0], size[1])

    def target_problems(self, value: torch.Tensor) -> list[tuple[TargetProblemKind, str]]:
        """NaNs, then negative depths."""
        problems = nan_problems(value)
        if bool((value < 0).any()):
            problems.append(("out_of_range", "negative depth"))
        return problems

    def random_target(self, batch_size: int, size: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform depths in [0.5, 10) m, ``(B, 1, H, W)`` float32."""
        return 0.5 + 9.5 * torch.rand(batch_size, 1, *size, generator=generator)

    def _prediction_problem(self, value: torch.Tensor) -> str | None:
        problem = super()._prediction_problem(value)
        if problem is None and bool((value < 0).any()):
            return f"negative depth {float(value.min()):.4g} m"
        return problem

    def resize_prediction(self, value: torch.Tensor, size: Size) -> torch.Tensor:
        """Depth resized bilinearly to ``size``."""
        return resize_bilinear(value, size)

    def encode_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> tuple[np.ndarray, str]:
        """float32 ``(H, W)`` metres as ``.npy``, or uint16 millimetres as ``.png`` (``png16``).

        Raises:
            ValueError: a wrong shape, non-finite or negative values, depth beyond 65.535 m for
                ``png16``, or an unknown ``depth_format``.
        """
        self.check_prediction(value)
        array = value.detach().cpu().numpy()
        if depth_format == "npy":
            return array[0].astype(np.float32), ".npy"
        if depth_format == "png16":
            return depth_codes(array[0]), ".png"
        raise ValueError(f"depth_format must be 'npy' or 'png16', got {depth_format!r}")

    def quantize_prediction(self, value: torch.Tensor, depth_format: DepthFormat = "npy") -> torch.Tensor:
        """float32 metres (``npy``), or rounded to millimetres (``png16``)."""
        array = value.detach().cpu().numpy()
        if depth_format == "png16":
            out = depth_codes(array).astype(np.float32) / np.float32(DEPTH_PNG_SCALE)
        else:
            out = array.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(out)).to(value.device)

    def decode_prediction(self, stored: np.ndarray) -> torch.Tensor:
        """float32 ``(1, H, W)`` metres of a 16-bit PNG's millimetres or of an ``(H, W)`` ``.npy``.

        Raises:
            ValueError: non-finite or negative depths in a ``.npy``.
        """
        if stored.dtype.kind in "ui":
            depth = stored.astype(np.float32) / np.float32(DEPTH_PNG_SCALE)
        else:
            depth = stored.astype(np.float32)
            if not np.isfinite(depth).all():
                raise ValueError(f"{int((~np.isfinite(depth)).sum())} non-finite depth value(s)")
            if (depth < 0).any():
                raise ValueError(f"negative depth {depth.min():.4g} m")
        return torch.from_numpy(np.ascontiguousarray(depth)[None])

    def make_metric(self, protocol: MetricProtocol = "split_level") -> Metric:
        if check_protocol(protocol) == "maximum_roaming":
            return MaximumRoamingDepthMetric()
        return DepthMetric()

    def colorize(self, value: torch.Tensor) -> np.ndarray:
        return colorize_depth(value.float().cpu().numpy()[0])
