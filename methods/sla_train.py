"""SLA's fine-tuning: the whole DiT and the per-layer projections, with SLA attention in every layer.

The paper fine-tunes Wan 1.3B for 2,000 steps at batch 64 on 20k real clips; here the data are the
teacher's own trajectories (data-free collection, as LinVideo), the objective ADM or MSE, through
:class:`harness.finetune.AttentionFineTuner` (a task of the training engine, so FSDP2 under torchrun too).
The result is a checkpoint folder that ``bench run --method sla --checkpoint DIR`` loads: the projections,
the fine-tuned transformer, and ``spec.json`` with the config and the training log summary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from harness.atomic import write_json_atomic
from harness.checkpoints import save_tensors
from harness.finetune import AttentionFineTuner, FineTuneSettings
from harness.models.base import ModelAdapter
from harness.train.engine import Run
from methods.linvideo.collect import TrajectoryStore
from methods.sla import STATE_FILE, TRANSFORMER_FILE, SlaProjections, SparseLinearAttention

SPEC_FILE = "spec.json"


@dataclass(frozen=True)
class SlaTrainConfig(FineTuneSettings):
    """One SLA fine-tune: the loop's settings plus the attention's (paper defaults)."""

    critical: float = 0.05
    negligible: float = 0.10
    block_size: Any = "auto"

    def method(self) -> SparseLinearAttention:
        """The SLA attention this config trains (its parameters are validated here)."""
        return SparseLinearAttention(critical=self.critical, negligible=self.negligible, block_size=self.block_size)

    def validate(self, num_layers: int | None = None) -> None:
        super().validate()
        self.method()


class SlaTrainer(AttentionFineTuner):
    """Fine-tunes the student transformer and SLA's zero-initialised projections together."""

    def __init__(self, config: SlaTrainConfig, teacher: ModelAdapter, store: TrajectoryStore, out: Path) -> None:
        method = config.method()
        tc = teacher.transformer.config
        self.projections = SlaProjections(tc.num_layers, tc.attention_head_dim).to(teacher.device)
        method.attach(self.projections, trained=False)
        super().__init__(config, teacher, store, out, method)

    def method_modules(self) -> dict[str, nn.Module]:
        return {"sla": self.projections}

    def finish(self, run: Run) -> Path:
        transformer = run.gather(self.student.transformer)
        if not run.ranks.lead:
            return self.out
        self.method.attach(self.projections, trained=True)
        self.method.save_state(self.out / STATE_FILE)
        save_tensors(transformer, self.out / TRANSFORMER_FILE)
        write_json_atomic(self.out / SPEC_FILE, {
            "method": "sla", "config": asdict(self.config), "layout": run.layout.record(),
            "trajectory_store": self.store.spec, "steps": run.step, "train_seconds": run.seconds,
            "seconds_per_step": run.seconds / max(run.step, 1),
            "final_losses": run.losses[-1] if run.losses else None,
        })  # fmt: skip
        return self.out
