"""Procedural clips whose truth is known, and the prompt grammar that states every attribute.

A scene is one or two objects (shape, palette colour, size) moving at constant velocity in a named
direction over a plain or gradient background. Rendering is exact (hard edges, palette colours), so
ToyBench can detect objects by colour distance and connected components without learned models.
A fixed split of attribute combinations is held out of training for evaluation.

Clips are float tensors in [-1, 1], shape ``(frames, 3, height, width)`` (the model's pixel space),
or uint8 ``(frames, height, width, 3)`` for videos.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from dataclasses import dataclass

import torch

FRAMES, HEIGHT, WIDTH = 8, 32, 32
SPEED_PX_PER_FRAME = 2.0  # an integer, so that integer start positions stay integer

# Object palette (RGB in [0, 1]); backgrounds use colours far from every object colour.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (0.95, 0.9, 0.1),
    "magenta": (0.9, 0.1, 0.9),
    "cyan": (0.1, 0.9, 0.9),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.0),
}
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "gray": (0.4, 0.4, 0.4),
    "navy": (0.05, 0.05, 0.35),
    "brown": (0.35, 0.2, 0.05),
}
GRADIENTS: dict[str, tuple[str, str]] = {"dusk": ("navy", "black"), "soil": ("brown", "black")}
SHAPES = ("square", "disk", "triangle")
SIZES: dict[str, float] = {"small": 3.0, "large": 5.0}  # half-extent in pixels
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str
    direction: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} moves {self.direction}"


@dataclass(frozen=True)
class Scene:
    """What a prompt states: objects and background (plain colour name or gradient name)."""

    objects: tuple[ObjectSpec, ...]
    background: str

    @staticmethod
    def example_prompt() -> str:
        return "a small red disk moves left on a gray background"

    @property
    def prompt(self) -> str:
        objects = " and ".join(obj.phrase() for obj in self.objects)
        if self.background in GRADIENTS:
            return f"{objects} on a {self.background} gradient background"
        return f"{objects} on a {self.background} background"


@dataclass(frozen=True)
class Placement:
    """Where each object starts (centre, pixels); together with the scene this fixes the clip."""

    starts: tuple[tuple[float, float], ...]


def combination_key(obj: ObjectSpec) -> str:
    return f"{obj.colour}-{obj.shape}-{obj.direction}"


def is_held_out(obj: ObjectSpec) -> bool:
    """The fixed evaluation split: 1 in 5 (colour, shape, direction) combinations never trains."""
    return int(hashlib.sha256(combination_key(obj).encode()).hexdigest(), 16) % 5 == 0


def all_objects() -> list[ObjectSpec]:
    return [ObjectSpec(*combo) for combo in itertools.product(SHAPES, PALETTE, SIZES, DIRECTIONS)]


def random_scene(rng: random.Random, split: str) -> Scene:
    """A scene whose objects all belong to ``split`` ('train' or 'eval'); colours distinct."""
    pool = [obj for obj in all_objects() if is_held_out(obj) == (split == "eval")]
    count = 1 if rng.random() < 0.5 else 2
    objects = [rng.choice(pool)]
    while len(objects) < count:
        candidate = rng.choice(pool)
        if candidate.colour != objects[0].colour:
            objects.append(candidate)
    background = rng.choice(list(BACKGROUNDS) + list(GRADIENTS))
    return Scene(tuple(objects), background)


def eval_scenes(count: int, seed: int = 1234) -> list[tuple[Scene, Placement]]:
    """The fixed held-out evaluation scenes (with the placements of their ground-truth clips)."""
    rng = random.Random(seed)
    return [sample_placed_scene(rng, "eval") for _ in range(count)]


def _path(start: tuple[float, float], direction: str, frames: int) -> list[tuple[float, float]]:
    dx, dy = DIRECTIONS[direction]
    return [(start[0] + dx * SPEED_PX_PER_FRAME * f, start[1] + dy * SPEED_PX_PER_FRAME * f) for f in range(frames)]


def place(scene: Scene, rng: random.Random, frames: int = FRAMES, size: int = HEIGHT) -> Placement | None:
    """Start positions keeping every object inside the frame and the objects apart at all times."""
    for _ in range(200):
        starts = []
        for obj in scene.objects:
            half = SIZES[obj.size] + 1
            travel = SPEED_PX_PER_FRAME * (frames - 1)
            dx, dy = DIRECTIONS[obj.direction]
            lo_x, hi_x = half - min(dx, 0) * travel, size - 1 - half - max(dx, 0) * travel
            lo_y, hi_y = half - min(dy, 0) * travel, size - 1 - half - max(dy, 0) * travel
            # Integer centres (and an integer speed) render every frame's shape identically.
            starts.append((float(rng.randint(math.ceil(lo_x), math.floor(hi_x))),
                           float(rng.randint(math.ceil(lo_y), math.floor(hi_y)))))  # fmt: skip
        if len(starts) < 2 or _apart(scene, starts, frames):
            return Placement(tuple(starts))
    return None  # some pairs of paths cannot be kept apart: the caller draws another scene


def _apart(scene: Scene, starts: list[tuple[float, float]], frames: int) -> bool:
    (a, b), (pa, pb) = (
        scene.objects,
        [_path(s, o.direction, frames) for s, o in zip(starts, scene.objects, strict=True)],
    )
    margin = SIZES[a.size] + SIZES[b.size] + 2
    return all(max(abs(x1 - x2), abs(y1 - y2)) > margin for (x1, y1), (x2, y2) in zip(pa, pb, strict=True))


def background_image(name: str, height: int = HEIGHT, width: int = WIDTH) -> torch.Tensor:
    """Background RGB in [0, 1], shape (3, H, W); gradients run top to bottom."""
    if name in GRADIENTS:
        top, bottom = (torch.tensor(BACKGROUNDS[c]) for c in GRADIENTS[name])
        weight = torch.linspace(0, 1, height).view(1, height, 1)
        return (top.view(3, 1, 1) * (1 - weight) + bottom.view(3, 1, 1) * weight).expand(3, height, width).clone()
    return torch.tensor(BACKGROUNDS[name]).view(3, 1, 1).expand(3, height, width).clone()


SHAPE_IDS = {name: index for index, name in enumerate(SHAPES)}


def _shape_masks(shape_id: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, half: torch.Tensor,
                 height: int, width: int) -> torch.Tensor:  # fmt: skip
    """Boolean masks (..., H, W) of shapes centred at (cx, cy) (pixels) with half-extent ``half``."""
    device = cx.device
    ys = torch.arange(height, device=device, dtype=torch.float32).view(height, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, width)
    dx, dy = xs - cx[..., None, None], ys - cy[..., None, None]
    h = half[..., None, None]
    square = (dx.abs() <= h) & (dy.abs() <= h)
    disk = dx**2 + dy**2 <= h**2
    triangle = (dy.abs() <= h) & (dx.abs() <= (dy + h) / 2)  # apex up, base at the bottom
    sid = shape_id[..., None, None]
    return torch.where(sid == 0, square, torch.where(sid == 1, disk, triangle))


def render_batch(scenes: list[Scene], placements: list[Placement], frames: int = FRAMES, height: int = HEIGHT,
                 width: int = WIDTH, device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """Clips as floats in [-1, 1], shape (batch, frames, 3, H, W), rendered on ``device``."""
    clips = torch.stack([background_image(scene.background, height, width) for scene in scenes]).to(device)
    clips = clips.unsqueeze(1).repeat(1, frames, 1, 1, 1)
    t = torch.arange(frames, device=device, dtype=torch.float32)
    for slot in range(max(len(scene.objects) for scene in scenes)):
        rows = [i for i, scene in enumerate(scenes) if len(scene.objects) > slot]
        objs = [scenes[i].objects[slot] for i in rows]
        start = torch.tensor([placements[i].starts[slot] for i in rows], device=device)
        velocity = torch.tensor([DIRECTIONS[o.direction] for o in objs], device=device) * SPEED_PX_PER_FRAME
        cx = start[:, 0:1] + velocity[:, 0:1] * t  # (objects, frames)
        cy = start[:, 1:2] + velocity[:, 1:2] * t
        half = torch.tensor([SIZES[o.size] for o in objs], device=device).view(-1, 1).expand_as(cx)
        shape_id = torch.tensor([SHAPE_IDS[o.shape] for o in objs], device=device).view(-1, 1).expand_as(cx)
        masks = _shape_masks(shape_id, cx, cy, half, height, width)  # (objects, frames, H, W)
        colour = torch.tensor([PALETTE[o.colour] for o in objs], device=device).view(-1, 1, 3, 1, 1)
        index = torch.tensor(rows, device=device)
        clips[index] = torch.where(masks.unsqueeze(2), colour, clips[index])
    return clips * 2 - 1


def render(scene: Scene, placement: Placement, frames: int = FRAMES, height: int = HEIGHT,
           width: int = WIDTH) -> torch.Tensor:  # fmt: skip
    """One clip as floats in [-1, 1], shape (frames, 3, H, W)."""
    return render_batch([scene], [placement], frames, height, width)[0]


def to_uint8_video(clip: torch.Tensor) -> torch.Tensor:
    """(frames, 3, H, W) in [-1, 1] -> uint8 (frames, H, W, 3)."""
    return ((clip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def sample_placed_scene(rng: random.Random, split: str = "train") -> tuple[Scene, Placement]:
    """A random scene of ``split`` with a valid placement (scenes that cannot be placed are redrawn)."""
    while True:
        scene = random_scene(rng, split)
        placement = place(scene, rng)
        if placement is not None:
            return scene, placement


def sample_clip(rng: random.Random, split: str = "train") -> tuple[Scene, torch.Tensor]:
    scene, placement = sample_placed_scene(rng, split)
    return scene, render(scene, placement)


def parse_prompt(prompt: str) -> Scene:
    """Invert :attr:`Scene.prompt` (ToyBench scores any clip against the scene its prompt states)."""
    body, _, background_part = prompt.partition(" on a ")
    background = background_part.removesuffix(" background").removesuffix(" gradient")
    objects = []
    for phrase in body.split(" and "):
        words = phrase.split()
        if len(words) != 6 or words[0] != "a" or words[4] != "moves":
            raise ValueError(f"not a toy-world prompt: {prompt!r}")
        objects.append(ObjectSpec(shape=words[3], colour=words[2], size=words[1], direction=words[5]))
    scene = Scene(tuple(objects), background)
    for obj in objects:
        known = obj.shape in SHAPES and obj.colour in PALETTE and obj.size in SIZES and obj.direction in DIRECTIONS
        if not known:
            raise ValueError(f"unknown attribute in toy-world prompt: {prompt!r}")
    if background not in BACKGROUNDS and background not in GRADIENTS:
        raise ValueError(f"unknown background in toy-world prompt: {prompt!r}")
    return scene
