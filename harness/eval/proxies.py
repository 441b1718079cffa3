"""Weight-free proxies of three VBench dimensions, for any model: trends and CI, never paper tables.

Each follows VBench's procedure with a classical stand-in for its learned model (OpenCV Farneback
optical flow instead of RAFT and AMT), on the decoded frames before mp4 encoding:

- ``proxy_flicker``: VBench's temporal-flickering formula, (255 - mean |f_t - f_{t-1}|) / 255, without
  its RAFT static-video pre-filter.
- ``proxy_dynamic_degree``: frames subsampled to about 8 fps; per pair the mean of the top 5 % flow
  magnitudes; a video is dynamic if at least round(4 N / 16) pairs (N sampled frames) exceed 6 min(H, W) / 256
  pixels. Per video 100 (dynamic) or 0; the mean over videos is VBench's fraction of dynamic videos.
  ``proxy_flow_px`` is the mean of those per-pair magnitudes (pixels per sampled pair).
- ``proxy_motion_smoothness``: the odd frames are dropped and predicted from their even neighbours by
  a flow-based midpoint warp (half the Farneback flow each way, blended); (255 - MAE) / 255.

All scores are percentages except ``proxy_flow_px``. Every name starts with ``proxy_`` so no table can
mistake one for the VBench dimension it stands in for.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

TARGET_FPS = 8.0
TOP_FRACTION = 0.05
MIN_FRAMES = 3  # motion smoothness predicts each odd frame from its two neighbours


def score_clip(video: torch.Tensor, fps: int) -> dict[str, float]:
    """All proxies of one clip: uint8 frames ``(F, H, W, 3)`` written at ``fps`` frames per second."""
    frames = _frames(video)
    dynamic, flow_px = dynamic_degree(frames, fps)
    return {
        "proxy_flicker": flicker(frames),
        "proxy_dynamic_degree": 100.0 if dynamic else 0.0,
        "proxy_flow_px": flow_px,
        "proxy_motion_smoothness": motion_smoothness(frames),
    }


def flicker(frames: np.ndarray) -> float:
    """(255 - mean absolute difference of consecutive frames) / 255, in percent."""
    diffs = np.abs(np.diff(frames.astype(np.float32), axis=0))
    return 100.0 * (255.0 - float(diffs.mean())) / 255.0


def dynamic_degree(frames: np.ndarray, fps: int) -> tuple[bool, float]:
    """(is the clip dynamic by VBench's rule, mean top-5 % flow magnitude per sampled pair in pixels)."""
    step = max(1, round(fps / TARGET_FPS))
    sampled = frames[::step]
    scores = [_top_magnitude(_flow(a, b)) for a, b in itertools.pairwise(sampled)]
    threshold = 6.0 * min(frames.shape[1:3]) / 256.0
    needed = round(4 * len(sampled) / 16.0)  # VBench counts sampled frames, not pairs
    moving = sum(score > threshold for score in scores)
    return bool(scores) and moving >= needed, float(np.mean(scores)) if scores else 0.0


def motion_smoothness(frames: np.ndarray) -> float:
    """(255 - MAE of odd frames predicted from their even neighbours) / 255, in percent."""
    if len(frames) < MIN_FRAMES:
        raise ValueError(f"motion smoothness needs at least {MIN_FRAMES} frames, got {len(frames)}")
    errors = []
    for middle in range(1, len(frames) - 1, 2):
        predicted = midpoint(frames[middle - 1], frames[middle + 1])
        errors.append(np.abs(predicted.astype(np.float32) - frames[middle].astype(np.float32)).mean())
    return 100.0 * (255.0 - float(np.mean(errors))) / 255.0


def midpoint(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The frame halfway between two frames: each warped half-way along the flow between them, blended."""
    import cv2

    forward, backward = _flow(before, after), _flow(after, before)
    height, width = before.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))

    # Backward warping: the middle pixel p came from before at p - F/2 and from after at p - B/2.
    def half_way(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
        return cv2.remap(image, grid_x - flow[..., 0] / 2, grid_y - flow[..., 1] / 2, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip

    from_before, from_after = half_way(before, forward), half_way(after, backward)
    return ((from_before.astype(np.float32) + from_after.astype(np.float32)) / 2).round().astype(np.uint8)


def _flow(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dense Farneback flow from frame ``a`` to frame ``b``, ``(H, W, 2)`` in pixels."""
    import cv2

    gray_a, gray_b = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (a, b))
    window = max(5, min(15, min(a.shape[:2]) // 4 | 1))  # small frames need a small window
    return cv2.calcOpticalFlowFarneback(
        gray_a, gray_b, None, pyr_scale=0.5, levels=3, winsize=window, iterations=3, poly_n=5, poly_sigma=1.1, flags=0
    )


def _top_magnitude(flow: np.ndarray) -> float:
    magnitude = np.linalg.norm(flow, axis=-1).ravel()
    count = max(1, int(len(magnitude) * TOP_FRACTION))
    return float(np.partition(magnitude, -count)[-count:].mean())


def _frames(video: torch.Tensor) -> np.ndarray:
    array = video.numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (F, H, W, 3), got {array.dtype} {tuple(array.shape)}")
    if len(array) < 2:
        raise ValueError("proxies need at least 2 frames")
    return np.ascontiguousarray(array)
