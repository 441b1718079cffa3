"""ToyBench: perfect on ground truth, blind to noise, and each quality metric catches its own defect."""

from __future__ import annotations

import random

import pytest
import torch

from harness.eval.toybench import METRICS, score_clip, score_clips
from harness.toyworld import world

CLIPS = 32  # clips per degradation check


def _videos(pairs: list[tuple[world.Scene, world.Placement]]) -> list[torch.Tensor]:
    clips = world.render_batch([scene for scene, _ in pairs], [placement for _, placement in pairs])
    return [world.to_uint8_video(clip) for clip in clips]


@pytest.fixture(scope="module")
def eval_clips() -> tuple[list[torch.Tensor], list[str]]:
    """The 64 held-out evaluation scenes rendered as ground-truth uint8 videos, with their prompts."""
    pairs = world.eval_scenes(64)
    return _videos(pairs), [scene.prompt for scene, _ in pairs]


@pytest.fixture(scope="module")
def train_clips() -> tuple[list[torch.Tensor], list[str]]:
    """64 training-split scenes rendered as ground-truth uint8 videos, with their prompts."""
    rng = random.Random(2024)
    pairs = [world.sample_placed_scene(rng, "train") for _ in range(64)]
    return _videos(pairs), [scene.prompt for scene, _ in pairs]


@pytest.mark.parametrize("split", ["eval_clips", "train_clips"])
def test_ground_truth_scores_at_least_98_on_every_metric(split: str, request: pytest.FixtureRequest) -> None:
    """Ground-truth procedural clips score >= 98 on the mean of every metric (eval and train splits)."""
    videos, prompts = request.getfixturevalue(split)
    scores = score_clips(videos, prompts)
    assert scores["clips"] == 64
    assert set(scores) == {*METRICS, "clips"}
    for name in METRICS:
        assert scores[name] >= 98.0, f"{name}: {scores[name]:.2f}"


def test_float_clip_scores_as_its_uint8_video() -> None:
    """A float (frames, 3, H, W) clip in [-1, 1] scores exactly as its uint8 video does."""
    scene, placement = world.eval_scenes(1)[0]
    clip = world.render(scene, placement)
    assert score_clip(clip, scene.prompt) == score_clip(world.to_uint8_video(clip), scene.prompt)


def test_noise_gets_prompts_right_at_most_20_percent(eval_clips: tuple[list[torch.Tensor], list[str]]) -> None:
    """Uniform random uint8 videos get prompt_correctness <= 20% against the evaluation prompts."""
    _, prompts = eval_clips
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randint(0, 256, (world.FRAMES, world.HEIGHT, world.WIDTH, 3), generator=generator,
                           dtype=torch.uint8) for _ in prompts[:CLIPS]]  # fmt: skip
    assert score_clips(noise, prompts[:CLIPS])["prompt_correctness"] <= 20.0


def _scrambling_permutation(frames: int, seed: int) -> torch.Tensor:
    """A seeded frame permutation that is neither the identity nor the reversal."""
    generator = torch.Generator().manual_seed(seed)
    identity = torch.arange(frames)
    while True:
        permutation = torch.randperm(frames, generator=generator)
        if not (torch.equal(permutation, identity) or torch.equal(permutation, identity.flip(0))):
            return permutation


def test_shuffled_frames_drop_motion_smoothness_by_30_points(eval_clips) -> None:  # type: ignore[no-untyped-def]
    """Shuffling the frames (a fixed scrambling permutation) lowers motion_smoothness by >= 30 points."""
    videos, prompts = eval_clips[0][:CLIPS], eval_clips[1][:CLIPS]
    permutation = _scrambling_permutation(world.FRAMES, seed=0)
    before = score_clips(videos, prompts)["motion_smoothness"]
    after = score_clips([video[permutation] for video in videos], prompts)["motion_smoothness"]
    assert before - after >= 30.0, f"{before:.1f} -> {after:.1f}"


def _recolour_halfway(video: torch.Tensor, scene: world.Scene) -> torch.Tensor:
    """The object first stated, repainted from the middle frame on in a palette colour the scene lacks."""
    used = {obj.colour for obj in scene.objects}
    new = next(name for name in world.PALETTE if name not in used)
    old_rgb, new_rgb = (world.to_uint8_video(torch.tensor(world.PALETTE[c]).view(1, 3, 1, 1) * 2 - 1).view(3)
                        for c in (scene.objects[0].colour, new))  # fmt: skip
    video = video.clone()
    later = video[video.shape[0] // 2 :]
    mask = (later == old_rgb).all(dim=-1)
    assert mask.any(dim=(1, 2)).all(), "the object must be visible in every later frame"
    later[mask] = new_rgb
    return video


def test_colour_change_halfway_lowers_subject_consistency() -> None:
    """An object that changes colour halfway lowers subject_consistency (strictly, clip by clip)."""
    pairs = world.eval_scenes(CLIPS)
    videos = _videos(pairs)
    for (scene, _), video in zip(pairs, videos, strict=True):
        before = score_clip(video, scene.prompt)["subject_consistency"]
        after = score_clip(_recolour_halfway(video, scene), scene.prompt)["subject_consistency"]
        assert after < before, f"{scene.prompt}: {before:.1f} -> {after:.1f}"


def test_blank_background_scores_no_objects_but_a_perfect_background() -> None:
    """A video of the bare background: prompt_correctness 0, subject_consistency 0, background 100."""
    for scene, _ in world.eval_scenes(8):
        background = world.background_image(scene.background) * 2 - 1
        video = world.to_uint8_video(background.unsqueeze(0).repeat(world.FRAMES, 1, 1, 1))
        scores = score_clip(video, scene.prompt)
        assert scores["prompt_correctness"] == 0.0
        assert scores["subject_consistency"] == 0.0
        assert scores["background_consistency"] == 100.0


@pytest.mark.parametrize(
    "prompt",
    ["", "a red disk", "a huge red disk moves left on a gray background",
     "a small red disk moves left on a pink background", "a small red disk moves sideways on a gray background"],
)  # fmt: skip
def test_prompt_that_does_not_parse_raises_value_error(prompt: str) -> None:
    """A prompt outside the toy-world grammar raises ValueError."""
    video = torch.zeros(world.FRAMES, world.HEIGHT, world.WIDTH, 3, dtype=torch.uint8)
    with pytest.raises(ValueError):
        score_clip(video, prompt)


def test_score_clips_is_the_mean_of_score_clip() -> None:
    """score_clips returns each metric's mean over clips and the clip count (list or stacked tensor)."""
    pairs = world.eval_scenes(4)
    videos, prompts = _videos(pairs), [scene.prompt for scene, _ in pairs]
    videos[1] = torch.zeros_like(videos[1])  # one bad clip, so the mean is not trivially 100
    per_clip = [score_clip(video, prompt) for video, prompt in zip(videos, prompts, strict=True)]
    for batch in (videos, torch.stack(videos)):
        scores = score_clips(batch, prompts)
        assert scores["clips"] == 4
        for name in METRICS:
            assert scores[name] == pytest.approx(sum(s[name] for s in per_clip) / 4)
    with pytest.raises(ValueError):
        score_clips(videos, prompts[:3])
