"""ToyBench: exact, weight-free scores of a toy-world clip against the prompt that asked for it.

The toy world (:mod:`harness.toyworld.world`) renders palette-coloured shapes with hard edges over a
known background, so every attribute a prompt states can be measured directly: a pixel is foreground
when its colour is far from the expected background at that pixel, foreground pixels take the nearest
palette colour, and each stated object is tracked, frame by frame, as the largest 4-connected
component of its colour (extended over its soft, half-way-blended edge pixels, which exact renders do
not have). Every metric is a percentage in [0, 100]; each stands in for a VBench
dimension:

- ``prompt_correctness``: 100 when every stated object has its colour, shape, size and direction
  right, else 0 (stands in for VBench object class, color, spatial relationship and overall
  consistency: does the clip show what the prompt says).
- ``colour``, ``shape``, ``size``, ``direction``: the percentage of stated objects with that one
  attribute right (the per-attribute breakdown of ``prompt_correctness``; ``colour`` ~ VBench color,
  ``shape``/``size`` ~ object class).
- ``subject_consistency`` (~ VBench subject consistency): frames in which the object is present with
  its usual area and fill ratio.
- ``motion_smoothness`` (~ VBench motion smoothness): frames whose centroid lies on the
  least-squares constant-velocity line.
- ``dynamic_degree`` (~ VBench dynamic degree): the fitted displacement along the prompt's direction
  against the displacement the world's constant speed gives.
- ``background_consistency`` (~ VBench background consistency): pixels away from the objects that
  keep the expected background colour.
- ``imaging_quality`` (~ VBench imaging quality): pixels that are either the expected background or
  a palette colour (noise, blur and off-palette colours lower it).

Ground-truth procedural clips score 100 on every metric; uniform noise almost never gets a prompt
right; shuffled frames break motion smoothness; an object that changes colour breaks subject
consistency (``tests/test_toybench.py`` checks all four).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from harness.toyworld import world

METRICS: tuple[str, ...] = (
    "prompt_correctness",
    "colour",
    "shape",
    "size",
    "direction",
    "subject_consistency",
    "motion_smoothness",
    "dynamic_degree",
    "background_consistency",
    "imaging_quality",
)

# -- thresholds (RGB distances are Euclidean in [0, 1]^3) -------------------------------------------
# Foreground: farther than this from the expected background. The nearest palette colour to any
# background (plain or any row of a gradient) is 0.56 away, uint8 rounding moves a colour by
# under 0.004, so 0.25 splits them with margin on both sides.
FOREGROUND_DISTANCE = 0.25
# A foreground pixel takes the nearest palette colour within this distance, else it is off-palette.
# The closest palette pair (yellow/orange) is 0.37 apart, so nearest-colour assignment is never
# ambiguous, and 0.3 still accepts a generated object whose colour is somewhat off.
PALETTE_DISTANCE = 0.3
# Components smaller than this are specks, not objects (the smallest rendered object, a small
# triangle, has 25 pixels; noise makes many 1-2 pixel clusters of every colour).
MIN_COMPONENT_PIXELS = 3
# Soft edges: an off-palette foreground pixel next to an object joins it when it is at least this far
# along the line from the background to the object's colour (half-way: the half-maximum contour,
# which a symmetric blur leaves where the hard edge was).
SOFT_EDGE_BLEND = 0.5
# colour: the object's colour component is present in at least this fraction of frames (6 of 8).
COLOUR_PRESENCE = 0.75
# shape: nearest rendered prototype in (fill ratio, ASYMMETRY_WEIGHT * vertical asymmetry). Fill
# separates squares (1.0) from disks (0.59-0.67) and triangles (0.50-0.51), but small disks and
# triangles differ by only 0.08 in fill and a blur raises a triangle's fill (its apex thins out) to
# 0.64-0.73; the apex-up asymmetry (triangles 0.16, still 0.11-0.13 after a 3x3 blur; squares and
# disks 0) survives, so it is weighted to decide between them.
ASYMMETRY_WEIGHT = 4.0
# direction: the first-to-last centroid displacement must be at least this fraction of the
# displacement the world's speed gives over the clip (SPEED_PX_PER_FRAME * (frames - 1)).
DIRECTION_MIN_FRACTION = 1.0 / 3.0
# subject consistency: a frame is consistent when the object's area is within this relative
# distance of its median area and its fill ratio within FILL_TOLERANCE of its median fill. Rendered
# objects at integer positions are identical in every frame (0 and 0 on ground truth); a colour
# change removes the object from its colour's components, which no tolerance hides.
AREA_TOLERANCE = 0.25
FILL_TOLERANCE = 0.15
# motion smoothness: a frame is smooth when its centroid is within this many pixels of the
# least-squares line (ground truth: 0; one frame out of order: about SPEED_PX_PER_FRAME or more).
SMOOTH_RESIDUAL_PX = 1.5
MIN_SMOOTH_FRAMES = 3  # fewer detected frames make a line fit meaningless: smoothness 0
MIN_FIT_FRAMES = 2  # dynamic degree needs a slope, which two frames give
# background consistency and imaging quality: "is that colour" means within this distance. Exact
# renders are within 0.004 (uint8 rounding); 0.1 is below half the smallest distance between two
# reference colours (0.37, yellow/orange), so a pixel can never match two of them.
COLOUR_TOLERANCE = 0.1

_PALETTE_NAMES = tuple(world.PALETTE)
_PALETTE = np.array([world.PALETTE[name] for name in _PALETTE_NAMES], dtype=np.float32)  # (colours, 3)


@dataclass(frozen=True)
class Component:
    """One object's pixels in one frame: the largest component of its colour, with its soft edge."""

    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive
    mask: np.ndarray  # (H, W) bool

    @property
    def fill(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return self.area / ((x1 - x0 + 1) * (y1 - y0 + 1))

    @property
    def asymmetry(self) -> float:
        """Centroid below the box centre, as a fraction of box height (apex-up triangles ~0.16)."""
        _, y0, _, y1 = self.bbox
        return (self.centroid[1] - (y0 + y1) / 2) / (y1 - y0 + 1)


# -- input ----------------------------------------------------------------------------------------


def _as_rgb(video: torch.Tensor) -> np.ndarray:
    """uint8 (F, H, W, 3) or float [-1, 1] (F, 3, H, W) -> float32 (F, H, W, 3) in [0, 1]."""
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor video, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"a uint8 video must be (frames, H, W, 3), got {tuple(video.shape)}")
    elif video.is_floating_point():
        if video.dim() != 4 or video.shape[1] != 3:
            raise ValueError(f"a float clip must be (frames, 3, H, W) in [-1, 1], got {tuple(video.shape)}")
        video = world.to_uint8_video(video.detach().float().cpu())
    else:
        raise ValueError(f"a video must be uint8 or floating point, got {video.dtype}")
    if video.shape[0] < 1 or video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"empty video: {tuple(video.shape)}")
    return video.detach().cpu().numpy().astype(np.float32) / 255.0


def _background(name: str, height: int, width: int) -> np.ndarray:
    """Expected background (H, W, 3) in [0, 1], as the uint8 video would hold it."""
    image = world.background_image(name, height, width)  # (3, H, W) in [0, 1]
    return np.round(image.permute(1, 2, 0).numpy() * 255.0).astype(np.float32) / 255.0


# -- measurement ----------------------------------------------------------------------------------


def _classes(rgb: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Per pixel: palette index, -1 for background, -2 for off-palette foreground. (F, H, W) int."""
    foreground = np.linalg.norm(rgb - background, axis=-1) > FOREGROUND_DISTANCE
    distances = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1)  # (F, H, W, colours)
    nearest = distances.argmin(axis=-1)
    on_palette = np.take_along_axis(distances, nearest[..., None], axis=-1)[..., 0] <= PALETTE_DISTANCE
    return np.where(foreground, np.where(on_palette, nearest, -2), -1)


def _label_components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class within each frame of (F, H, W).

    Returns labels of the same shape: for pixels of a class, the smallest flat index in their
    component; -1 elsewhere. Min-label propagation with pointer jumping (a few passes at 32x32).
    """
    size = classes.size
    active = classes >= 0
    labels = np.where(active, np.arange(size).reshape(classes.shape), size)
    same_v = active[:, 1:, :] & (classes[:, 1:, :] == classes[:, :-1, :])
    same_h = active[:, :, 1:] & (classes[:, :, 1:] == classes[:, :, :-1])
    while True:
        new = labels.copy()
        np.minimum(new[:, 1:, :], np.where(same_v, labels[:, :-1, :], size), out=new[:, 1:, :])
        np.minimum(new[:, :-1, :], np.where(same_v, labels[:, 1:, :], size), out=new[:, :-1, :])
        np.minimum(new[:, :, 1:], np.where(same_h, labels[:, :, :-1], size), out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], np.where(same_h, labels[:, :, 1:], size), out=new[:, :, :-1])
        flat = new.reshape(-1)
        inside = flat < size
        flat[inside] = flat[flat[inside]]  # pointer jumping: a label's own label is as small or smaller
        if np.array_equal(new, labels):
            return np.where(active, labels, -1)
        labels = new


def _largest(labels: np.ndarray, classes: np.ndarray, colour: int) -> np.ndarray | None:
    """Mask of the largest component of ``colour`` in one frame's (H, W) labels, or None (specks)."""
    of_colour = labels[classes == colour]
    if of_colour.size == 0:
        return None
    values, counts = np.unique(of_colour, return_counts=True)
    best = int(counts.argmax())  # ties: the smallest label, i.e. the first in raster order
    if counts[best] < MIN_COMPONENT_PIXELS:
        return None
    return labels == values[best]


def _grow(mask: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """``mask`` extended by the ``allowed`` pixels 4-connected to it (a flood fill in one frame)."""
    while True:
        padded = np.pad(mask, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        grown = mask | (neighbours & allowed)
        if np.array_equal(grown, mask):
            return mask
        mask = grown


def _component(mask: np.ndarray) -> Component:
    ys, xs = np.nonzero(mask)
    return Component(
        area=int(mask.sum()),
        centroid=(float(xs.mean()), float(ys.mean())),
        bbox=(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
        mask=mask,
    )


@dataclass(frozen=True)
class _Analysis:
    scene: world.Scene
    rgb: np.ndarray  # (F, H, W, 3)
    background: np.ndarray  # (H, W, 3)
    tracks: tuple[tuple[Component | None, ...], ...]  # per stated object, per frame


def _analyse(rgb: np.ndarray, scene: world.Scene) -> _Analysis:
    frames, height, width, _ = rgb.shape
    background = _background(scene.background, height, width)
    classes = _classes(rgb, background)
    labels = _label_components(classes)
    stated = [_PALETTE_NAMES.index(obj.colour) for obj in scene.objects]
    tracks = []
    for colour in stated:
        # Soft edges: a palette component is extended to the adjacent foreground pixels that are
        # nearer its colour than the background (half-way or more along background -> colour) and
        # not another stated object's colour, so a blurred object keeps its shape. Exact renders
        # have no such pixels (their edges are hard), so this changes nothing on ground truth.
        towards = _PALETTE[colour] - background  # (H, W, 3)
        blend = np.einsum("fhwc,hwc->fhw", rgb - background, towards) / np.einsum("hwc,hwc->hw", towards, towards)
        others = np.isin(classes, [c for c in stated if c != colour])
        allowed = (classes != -1) & ~others & (blend >= SOFT_EDGE_BLEND)
        track = []
        for f in range(frames):
            core = _largest(labels[f], classes[f], colour)
            track.append(None if core is None else _component(_grow(core, allowed[f])))
        tracks.append(tuple(track))
    return _Analysis(scene, rgb, background, tuple(tracks))


@functools.cache
def _prototypes() -> dict[tuple[str, str], tuple[float, float, float]]:
    """(shape, size) -> (area, fill, asymmetry) of a rendered object, measured as clips are."""
    centre = (float(world.WIDTH // 2), float(world.HEIGHT // 2))
    references = {}
    for shape in world.SHAPES:
        for size in world.SIZES:
            scene = world.Scene((world.ObjectSpec(shape, _PALETTE_NAMES[0], size, "right"),), "black")
            clip = world.render(scene, world.Placement((centre,)), frames=1)
            (component,) = _analyse(_as_rgb(clip), scene).tracks[0]
            if component is None:
                raise RuntimeError(f"ToyBench does not detect a rendered {size} {shape}: check the thresholds")
            references[(shape, size)] = (float(component.area), component.fill, component.asymmetry)
    return references


def _classify_shape(component: Component) -> str:
    def distance(reference: tuple[float, float, float]) -> float:
        _, fill, asymmetry = reference
        return math.hypot(component.fill - fill, ASYMMETRY_WEIGHT * (component.asymmetry - asymmetry))

    return min(_prototypes().items(), key=lambda item: distance(item[1]))[0][0]


def _classify_size(area: float, shape: str) -> str:
    """Nearest rendered area of ``shape`` (compared as ratios: log distance)."""
    references = _prototypes()
    return min(world.SIZES, key=lambda size: abs(math.log(area / references[(shape, size)][0])))


def _line_fit(track: Sequence[Component | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Least-squares constant-velocity fit of the centroids: detected frames (n,), residuals (n, 2) and
    slope (2,) in pixels per frame; None below MIN_FIT_FRAMES detections."""
    frames = np.array([f for f, c in enumerate(track) if c is not None], dtype=np.float64)
    if frames.size < MIN_FIT_FRAMES:
        return None
    points = np.array([c.centroid for c in track if c is not None], dtype=np.float64)
    design = np.stack([np.ones_like(frames), frames], axis=1)
    coefficients, *_ = np.linalg.lstsq(design, points, rcond=None)  # (2, 2): intercept, slope
    residuals = points - design @ coefficients
    return frames, residuals, coefficients[1]


def _object_scores(track: Sequence[Component | None], obj: world.ObjectSpec) -> dict[str, float]:
    """Per-object scores in [0, 1] (attributes as 0/1)."""
    frames = len(track)
    found = [c for c in track if c is not None]
    expected = world.SPEED_PX_PER_FRAME * (frames - 1)
    dx, dy = world.DIRECTIONS[obj.direction]
    axis = 0 if dx != 0 else 1
    sign = dx if dx != 0 else dy

    colour = len(found) >= COLOUR_PRESENCE * frames

    votes = Counter(_classify_shape(c) for c in found)
    ranked = votes.most_common()
    winner = ranked[0][0] if ranked and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]) else None
    shape = winner == obj.shape

    size = False
    if found:
        median_area = float(np.median([c.area for c in found]))
        size = _classify_size(median_area, winner or obj.shape) == obj.size

    direction = False
    if len(found) >= 2:
        displacement = np.subtract(found[-1].centroid, found[0].centroid)
        along, across = displacement[axis] * sign, abs(displacement[1 - axis])
        direction = bool(along > across and along >= DIRECTION_MIN_FRACTION * expected)

    consistency = 0.0
    if found:
        median_area = float(np.median([c.area for c in found]))
        median_fill = float(np.median([c.fill for c in found]))
        steady = [
            abs(c.area - median_area) <= AREA_TOLERANCE * median_area and abs(c.fill - median_fill) <= FILL_TOLERANCE
            for c in found
        ]
        consistency = sum(steady) / frames  # absent frames count as inconsistent

    smoothness = dynamic = 0.0
    fit = _line_fit(track)
    if fit is not None:
        fit_frames, residuals, slope = fit
        if fit_frames.size >= MIN_SMOOTH_FRAMES:
            smoothness = float(np.mean(np.hypot(residuals[:, 0], residuals[:, 1]) <= SMOOTH_RESIDUAL_PX))
        measured = float(slope[axis]) * sign * (frames - 1)
        if measured > 0 and expected > 0:
            dynamic = min(measured, expected) / max(measured, expected)

    return {
        "colour": float(colour),
        "shape": float(shape),
        "size": float(size),
        "direction": float(direction),
        "subject_consistency": consistency,
        "motion_smoothness": smoothness,
        "dynamic_degree": dynamic,
    }


def _background_consistency(analysis: _Analysis) -> float:
    rgb, background = analysis.rgb, analysis.background
    frames, height, width, _ = rgb.shape
    close = np.linalg.norm(rgb - background, axis=-1) <= COLOUR_TOLERANCE  # (F, H, W)
    per_frame = []
    for f in range(frames):
        objects = np.zeros((height, width), dtype=bool)
        for track in analysis.tracks:
            if track[f] is not None:
                objects |= track[f].mask
        padded = np.pad(objects, 1)
        dilated = np.zeros_like(objects)
        for oy in range(3):
            for ox in range(3):
                dilated |= padded[oy : oy + height, ox : ox + width]
        outside = ~dilated
        per_frame.append(float(close[f][outside].mean()) if outside.any() else 1.0)
    return float(np.mean(per_frame))


def _imaging_quality(analysis: _Analysis) -> float:
    rgb = analysis.rgb
    to_background = np.linalg.norm(rgb - analysis.background, axis=-1)
    to_palette = np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1).min(axis=-1)
    return float((np.minimum(to_background, to_palette) <= COLOUR_TOLERANCE).mean())


# -- public API -----------------------------------------------------------------------------------


def score_clip(video: torch.Tensor, prompt: str) -> dict[str, float]:
    """ToyBench scores (percentages, keys :data:`METRICS`) of one clip against its prompt.

    ``video`` is uint8 ``(frames, H, W, 3)`` (as :func:`world.to_uint8_video` makes) or a float clip
    in [-1, 1] ``(frames, 3, H, W)``. Raises ValueError if the prompt is not a toy-world prompt.
    """
    scene = world.parse_prompt(prompt)
    analysis = _analyse(_as_rgb(video), scene)
    per_object = [_object_scores(track, obj) for track, obj in zip(analysis.tracks, scene.objects, strict=True)]
    attributes = ("colour", "shape", "size", "direction")
    scores = {
        "prompt_correctness": 100.0 * all(o[a] == 1.0 for o in per_object for a in attributes),
        **{key: 100.0 * float(np.mean([o[key] for o in per_object])) for key in per_object[0]},
        "background_consistency": 100.0 * _background_consistency(analysis),
        "imaging_quality": 100.0 * _imaging_quality(analysis),
    }
    return {name: float(scores[name]) for name in METRICS}


def score_clips(videos: Sequence[torch.Tensor] | torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Mean of each ToyBench metric over clips (clip i against prompt i), plus ``clips``: the count."""
    count = len(videos)
    if count != len(prompts):
        raise ValueError(f"{count} videos but {len(prompts)} prompts")
    if count == 0:
        raise ValueError("no clips to score")
    per_clip = [score_clip(video, prompt) for video, prompt in zip(videos, prompts, strict=True)]
    means: dict[str, float] = {name: float(np.mean([s[name] for s in per_clip])) for name in METRICS}
    means["clips"] = count
    return means
