"""``bench run --method dmd2 --checkpoint DIR``: a DMD2 few-step generator, sampled in its steps without CFG.

The generator is a model's own transformer with distilled weights, so it enters the harness as a method whose
checkpoint loading swaps the transformer's weights (as LinVideo's and SLA's do) and which brings its own
sampler (:meth:`AttentionMethod.scheduler`). Its checkpoint fixes the sampling it was trained for (steps, CFG 1,
shift: ``spec.json``'s ``fixed_sampling``, the defaults of a run and checked by the preflight), names the model
and teacher weights it was distilled from, and its init (the dense teacher, or a method's checkpoint whose
attention the generator keeps, such as LinVideo's linear layers). Its layers run any softmax method
(``attention``): every layer of a dense generator, the softmax layers of a LinVideo one, so that each sparse
method is measured inside the same 4-step generator (the paper's Tab. III).

Checkpoint folder: ``spec.json``, ``transformer.safetensors`` (the generator), ``dmd2.safetensors`` (its times),
and the init method's state file when it has one (``linvideo.safetensors``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.errors import HarnessError
from methods.base import METHODS, AttentionContext, AttentionMethod, Capabilities, Density, Schedule, register_method
from methods.dmd2.sampler import FewStepScheduler
from methods.inner import build_inner, parse_inner
from methods.params import Param

if TYPE_CHECKING:
    from harness.checkpoints import CheckpointSummary

STATE_FILE, TRANSFORMER_FILE, SPEC_FILE = "dmd2.safetensors", "transformer.safetensors", "spec.json"
DENSE = "sdpa"  # the init attention of a generator distilled from the dense teacher


def init_method_params(name: str) -> tuple[str, ...]:
    """The parameters through which an init method takes the generator's softmax attention (LinVideo's
    ``softmax_method``/``softmax_params``), or ``()`` for one that runs its own attention in every layer."""
    names = {param.name for param in METHODS.get(name).parameters}
    return ("softmax_method", "softmax_params") if {"softmax_method", "softmax_params"} <= names else ()


@register_method("dmd2", aliases=("dmd",))
class Dmd2Generator(AttentionMethod):
    """A DMD2 generator (see the module docstring); its attention calls go to :attr:`inner`."""

    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        needs_training=True,
        notes="few-step generator distilled by DMD2 (bench train --method dmd2; GAN term left out): its own "
        "sampler, no CFG; --param attention=METHOD runs any softmax method in its layers",
    )
    parameters = (
        Param("attention", "method", None, "softmax method of the generator's layers (a LinVideo generator's softmax "
              "layers); default: as trained (sdpa)", optional=True),
        Param("attention_params", "object", None, "the attention method's parameters as JSON (default: its own)",
              optional=True),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        self.attention = build_inner("dmd2 attention", self.settings["attention"] or DENSE,
                                     self.settings["attention_params"], self.schedule, "attention_params")  # fmt: skip
        self.inner: AttentionMethod = self.attention
        self.times: tuple[float, ...] = ()
        self.description = ""

    @classmethod
    def parse_params(cls, raw: dict[str, Any]) -> dict[str, Any]:
        return parse_inner("dmd2", super().parse_params(raw), "attention", "attention_params",
                           "the generator's layers")  # fmt: skip

    def params(self) -> dict[str, Any]:
        """The attention, the generator (what it is, its times) and, for a LinVideo generator, its init method's
        parameters (which then run the attention in its softmax layers, and record it as they ran it)."""
        if self.inner is self.attention:
            return {"attention": self.attention.name, "attention_params": self.attention.params(),
                    "generator": self.description, "times": list(self.times), "init_attention": None}  # fmt: skip
        return {"attention": self.attention.name, "attention_params": self.settings["attention_params"],
                "generator": self.description, "times": list(self.times),
                "init_attention": {"method": self.inner.name, **self.inner.params()}}  # fmt: skip

    def configure(self, times: tuple[float, ...], inner: AttentionMethod | None, description: str) -> None:
        """Sample in ``times`` with ``inner`` in the layers (``None``: :attr:`attention`); what loading a checkpoint
        sets, and what training sets to evaluate the generator as it samples."""
        self.times, self.inner, self.description = tuple(times), inner or self.attention, description

    # -- the run -------------------------------------------------------------------------------

    def scheduler(self, sampling: Any) -> FewStepScheduler:
        if not self.times:
            raise HarnessError("dmd2 needs its generator: pass --checkpoint DIR (made by `bench train --method dmd2`)")
        return FewStepScheduler(self.times)

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        super().validate_for(num_layers, num_steps)
        self.attention.validate_for(num_layers, num_steps)

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        super().check_supported(device, dtype)
        for method in {id(m): m for m in (self.attention, self.inner)}.values():
            method.check_supported(device, dtype)

    def begin_video(self) -> None:
        for method in {id(m): m for m in (self.attention, self.inner)}.values():
            method.begin_video()

    def runs_dense(self, ctx: AttentionContext) -> bool:
        """Every call goes to :attr:`inner`: dense where its rules or this method's schedule say so."""
        return super().runs_dense(ctx) or self.inner.runs_dense(ctx)

    def route(self, ctx: AttentionContext) -> Any:
        """:attr:`inner`'s route: every call goes to it."""
        return self.inner.route(ctx)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
            dense: bool | None = None) -> tuple[torch.Tensor, Density]:  # fmt: skip
        return self.inner.run(q, k, v, ctx, dense)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
               ) -> tuple[torch.Tensor, Density]:  # fmt: skip
        return self.inner.attend(q, k, v, ctx)

    # -- the checkpoint ------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"times": torch.tensor(self.times, dtype=torch.float64)} if self.times else {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"times"} or tensors["times"].dim() != 1 or not len(tensors["times"]):
            raise HarnessError(f"dmd2 state holds no generator times (keys {sorted(tensors)})")
        self.times = tuple(float(t) for t in tensors["times"])

    def check_checkpoint(self, summary: CheckpointSummary) -> None:
        """A generator whose init runs its own attention everywhere (SLA's) takes no ``attention``; its init
        method's state file must be whole."""
        from harness.checkpoints import state_file_name, state_file_params

        init = str(summary.spec.get("init_attention", DENSE))
        if init == DENSE:
            return
        if self.settings["attention"] is not None and not init_method_params(init):
            raise HarnessError(f"checkpoint {summary.path} is a generator running {init} in every layer (its init); "
                               "--param attention applies to a dense or LinVideo generator: drop it")  # fmt: skip
        state_file_params(summary.path / state_file_name(init), init)

    def load_checkpoint(self, path: Path, transformer: nn.Module) -> None:
        """The generator's weights into ``transformer``, its times, and its init method's state (if any)."""
        from harness.checkpoints import load_module_weights, state_file_name, state_file_params

        spec = json.loads((path / SPEC_FILE).read_text())
        self.load_state(path / STATE_FILE)
        load_module_weights(transformer, path / TRANSFORMER_FILE)
        init = str(spec.get("init_attention", DENSE))
        inner = None
        if init != DENSE:
            state = path / state_file_name(init)
            cls = METHODS.get(init)
            recorded = state_file_params(state, init)
            params = {name: recorded[name] for name in cls.state_params if name in recorded}
            if self.settings["attention"] is not None:
                method_key, params_key = init_method_params(init)
                params |= {method_key: self.settings["attention"], params_key: self.settings["attention_params"]}
            inner = cls(schedule=self.schedule, **params)
            inner.load_state(state)
        self.configure(self.times, inner, str(spec.get("generator", "")))
