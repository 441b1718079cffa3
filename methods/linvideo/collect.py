"""Data-free collection: run the original model's sampler from noise and store its trajectory.

For each (prompt, seed) the teacher samples with its own sampler (dense attention, CFG as at
inference); every step stores ``(x_t, t, t_next, guided velocity u_t, prompt index)``. Shards are
safetensors files written atomically, one per batch of prompts, so an interrupted collection resumes
where it stopped; ``store.json`` records the spec that made the store. Under torchrun the ranks share the shards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from harness.atomic import atomic_path, write_json_atomic
from harness.distributed import Ranks
from harness.errors import HarnessError, check_choice
from harness.models.base import ModelAdapter
from harness.spec import Sampling

STORE_FILE, EMBEDDINGS_FILE = "store.json", "embeddings.safetensors"
JUMPS = ("next", "any")  # where a sampled state's one-step target lies: the next grid time, or any later one


@dataclass(frozen=True)
class CollectionSpec:
    """What determines a trajectory store; a store is only resumed or reused under the same spec."""

    model: str
    weights: str
    sampling: Sampling
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]  # seed i draws the noise of prompt i
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompts"], data["seeds"] = list(self.prompts), list(self.seeds)
        return data

    @property
    def shards(self) -> int:
        return -(-len(self.prompts) // self.batch_size)


def _shard_path(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.safetensors"


def collect(model: ModelAdapter, spec: CollectionSpec, out: Path, show_progress: bool = True,
            ranks: Ranks | None = None) -> TrajectoryStore:  # fmt: skip
    """Fill ``out`` with the teacher's trajectories (dense attention); resumes a half-done store.

    Under torchrun (``ranks`` sharded, in a process group) each rank samples every ``world_size``-th shard of
    prompts and writes its shard files, then waits for the others: one store (one ``store.json`` index, the same
    files) whatever the number of ranks, since each prompt's noise comes from its own seed.
    """
    from rich.progress import Progress
    from safetensors.torch import save_file

    from harness.distributed import barrier
    from harness.generate import initial_noise
    from methods import build_method

    ranks = ranks or Ranks()

    if len(spec.prompts) != len(spec.seeds) or not spec.prompts:
        raise HarnessError("collection needs one seed per prompt and at least one prompt")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / STORE_FILE
    if meta_path.exists():
        if json.loads(meta_path.read_text())["spec"] != json.loads(json.dumps(spec.to_dict())):
            raise HarnessError(f"{out} holds a trajectory store of another spec; use another folder")
    else:
        write_json_atomic(meta_path, {"spec": spec.to_dict(), "format": 1})
    latent_shape = type(model).latent_shape(spec.sampling)
    with model.use_method(build_method("sdpa")) as runtime, torch.inference_mode():
        cond_all = model.encode_prompts(list(spec.prompts)).float().cpu()
        uncond = model.encode_prompts([spec.sampling.negative_prompt]).float().cpu()
        if not (out / EMBEDDINGS_FILE).exists():
            with atomic_path(out / EMBEDDINGS_FILE) as tmp:
                save_file({"cond": cond_all.contiguous(), "uncond": uncond.contiguous()}, str(tmp))
        shards = ranks.share(range(spec.shards))
        with Progress(disable=not (show_progress and ranks.lead)) as progress:
            task = progress.add_task("collect trajectories", total=len(shards))
            for shard in shards:
                progress.advance(task)
                if _shard_path(out, shard).exists():
                    continue
                rows = range(shard * spec.batch_size, min((shard + 1) * spec.batch_size, len(spec.prompts)))
                noise = torch.cat([initial_noise((1, *latent_shape), spec.seeds[i]) for i in rows])
                steps: dict[str, list[torch.Tensor]] = {"x": [], "u": [], "t": [], "t_next": [], "prompt": []}

                def observe(index: int, t: float, t_next: float, x: torch.Tensor, u: torch.Tensor,
                            _steps: dict[str, list[torch.Tensor]] = steps, _rows: range = rows) -> None:  # fmt: skip
                    _steps["x"].append(x.float().cpu())
                    _steps["u"].append(u.float().cpu())
                    _steps["t"].append(torch.full((len(_rows),), t))
                    _steps["t_next"].append(torch.full((len(_rows),), t_next))
                    _steps["prompt"].append(torch.tensor(list(_rows)))

                cond = cond_all[rows.start : rows.stop].to(model.device, model.dtype)
                model.sample(
                    noise, cond, uncond.to(model.device, model.dtype), spec.sampling, runtime, observer=observe
                )
                with atomic_path(_shard_path(out, shard)) as tmp:
                    save_file({key: torch.cat(value).contiguous() for key, value in steps.items()}, str(tmp))
    barrier(ranks)
    return TrajectoryStore(out)


class TrajectoryStore:
    """A finished store, loaded in memory: sample training tuples from it."""

    def __init__(self, path: Path) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        self.path = path
        meta_path = path / STORE_FILE
        if not meta_path.is_file():
            raise HarnessError(f"{path} is not a trajectory store (no {STORE_FILE}); run the collection first")
        try:
            self.spec: dict[str, Any] = json.loads(meta_path.read_text())["spec"]
            shards = -(-len(self.spec["prompts"]) // self.spec["batch_size"])
            parts = [load_file(str(_shard_path(path, index))) for index in range(shards)]
            embeddings = load_file(str(path / EMBEDDINGS_FILE))
        except (OSError, KeyError, json.JSONDecodeError, SafetensorError) as exc:
            raise HarnessError(f"trajectory store {path} is incomplete or corrupt: {exc}") from exc
        # One shard is used as loaded: safetensors maps the file, so every process training from this store shares
        # its pages (a toy store of 1,024 prompts x 50 steps is 10 GB); several shards are concatenated (a copy).
        self.tensors = {key: parts[0][key] if len(parts) == 1 else torch.cat([part[key] for part in parts])
                        for key in parts[0]}  # fmt: skip
        self.cond, self.uncond = embeddings["cond"], embeddings["uncond"]
        times = self.tensors["t"]
        self.grid = torch.unique(times[times > 0])  # the sampler's times, ascending

    def __len__(self) -> int:
        return self.tensors["t"].numel()

    def sample(self, batch_size: int, generator: torch.Generator, jump: str = "next") -> dict[str, torch.Tensor]:
        """A random batch of stored states: x, u, t, t_next ``(B,)``, cond embeddings ``(B, L, D)``.

        Every sampler step is drawn alike, the last one (t_next = 0) included: ADM lands it at its ``t_min``
        (:func:`methods.linvideo.losses.landing_time`). ``jump="any"`` replaces each t_next by a time drawn
        uniformly from the sampler's times below t and 0, so that a one-step target may lie several sampler
        steps ahead (the stored ``u`` stays the velocity at ``t``).
        """
        check_choice("jump", jump, JUMPS)
        index = torch.randint(0, len(self), (batch_size,), generator=generator)
        batch = {key: value[index] for key, value in self.tensors.items()}
        batch["cond"] = self.cond[batch["prompt"]]
        if jump == "any":
            below = torch.searchsorted(self.grid, batch["t"])  # the sampler's times below t, all > 0
            pick = (torch.rand(batch_size, generator=generator) * (below + 1)).long()
            batch["t_next"] = torch.cat([torch.zeros(1, dtype=self.grid.dtype), self.grid])[pick]
        return batch
