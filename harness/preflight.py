"""One preflight per run: every check that needs only the spec, before any model is built or anything written.

`bench run` (through :func:`harness.generate.run`), its dry run, the default LinVideo conversion and `bench
latency` (:func:`check_method`) call it first. It checks

- the sampling against the model (VAE strides, patching, RoPE length) and the prompts against the model;
- that every prompt x seed is one video (a repeat would be counted twice in the metrics);
- every eval suite against the spec (the model it scores, toy grammar, VBench file names, clip length, a
  fidelity reference's cohort, an evaluator's environment);
- the method: its parameters, the model's layers and steps, the token grid, the device and dtype;
- the checkpoint: its own spec file and safetensors headers (no tensor is loaded) against the run's
  method, model and parameters, the teacher weights and sampling a distilled generator fixes, and the method's
  own check (:meth:`AttentionMethod.check_checkpoint`); its content then names the run (``RunSpec.checkpoint_id``).

Each failure is a :class:`HarnessError` with one clear line.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from harness.checkpoints import checkpoint_identity, identity_digest, inspect_checkpoint
from harness.distributed import current_ranks, rank_device
from harness.errors import HarnessError
from harness.eval.suites import SUITES, EvalOptions
from harness.models.base import MODELS, ModelAdapter
from harness.spec import RunSpec, Sampling
from harness.video import check_mp4_size
from methods import build_method
from methods.base import AttentionMethod, Schedule
from methods.kernels import check_kernel_choices

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class Prepared:
    """A validated spec with its resolved classes, ready to build.

    ``spec`` carries the checkpoint's ``checkpoint_id``; ``checkpoint_identity`` is the sha256 of each of the
    checkpoint's files (None without one).
    """

    spec: RunSpec
    adapter_cls: type[ModelAdapter]
    method: AttentionMethod
    device: torch.device
    dtype: torch.dtype
    checkpoint_identity: dict[str, str] | None = None


DEVICE_TYPES = ("cpu", "cuda")  # what the harness runs on; "auto" picks cuda when there is one


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a device; anything else (``tpu``, ``cuda:x``, ``mps``) or CUDA
    on a machine without it is a :class:`HarnessError` listing the valid names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise HarnessError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise HarnessError(f"unknown dtype {name!r}; use one of {sorted(set(DTYPES))}") from None


def preflight(spec: RunSpec, eval_options: EvalOptions | None = None, checkpoint_to_come: bool = False,
              allow_download: bool = False) -> Prepared:  # fmt: skip
    """Validate ``spec`` against the model and its weights, the method, the checkpoint and every eval suite; raises
    :class:`HarnessError` with a clear message. Nothing is built or written.

    ``checkpoint_to_come``: the caller trains the method's checkpoint next (a missing one is not an error).
    ``allow_download``: weights missing from the local hub cache will be downloaded (not an error).
    """
    adapter_cls = MODELS.get(spec.model)
    adapter_cls.validate_sampling(spec.sampling)
    check_mp4_size(spec.sampling.height, spec.sampling.width)
    adapter_cls.validate_prompts([*spec.prompts, spec.sampling.negative_prompt])
    check_one_video_each(spec)
    device, dtype = rank_device(resolve_device(spec.device), current_ranks()), resolve_dtype(spec.dtype)
    if spec.weights == "random" and adapter_cls.weights_kind == "pretrained" and spec.eval_suites:
        raise HarnessError("quality metrics are meaningless with --random-weights; drop --eval")
    adapter_cls.check_weights(spec.weights, allow_download)
    for name in spec.eval_suites:
        suite = SUITES.get(name)
        suite.check_model(spec.model)
        if suite.preflight is not None:
            suite.preflight(spec, eval_options or EvalOptions())
    schedule = Schedule(spec.dense_warmup_steps, spec.dense_layers)
    method = check_method(adapter_cls, spec.method, spec.method_params, schedule, spec.sampling, device, dtype)
    identity = _check_checkpoint(spec, method, checkpoint_to_come)
    if identity is not None:
        spec = replace(spec, checkpoint_id=identity_digest(identity))
    return Prepared(spec, adapter_cls, method, device, dtype, identity)


def check_method(adapter_cls: type[ModelAdapter], name: str, params: dict[str, Any], schedule: Schedule,
                 sampling: Sampling, device: torch.device, dtype: torch.dtype) -> AttentionMethod:  # fmt: skip
    """Construct the method (which checks its parameters, e.g. that xattn's stride divides its block size)
    and validate it against the model's layers and steps, the device and the dtype; the kernel variables set in the
    environment (``BENCH_LINEAR_BACKEND``, ...) first."""
    check_kernel_choices()
    method = build_method(name, schedule, **params)
    method.validate_for(adapter_cls.num_layers, sampling.steps)
    method.check_supported(device, dtype)
    return method


def check_one_video_each(spec: RunSpec) -> None:
    """Refuse a repeated seed, prompt or prompt label: each prompt x seed is one video, and a repeat would make
    the same video twice, counted twice in every metric (a repeated label would also overwrite its files)."""
    labels = spec.prompt_labels or spec.prompts
    for what, values in (("seed", spec.seeds), ("prompt", spec.prompts), ("prompt label", labels)):
        repeated = [(value, count) for value, count in Counter(values).items() if count > 1]
        if repeated:
            value, count = repeated[0]
            shown = value if isinstance(value, int) else repr(value[:80])
            raise HarnessError(f"{what} {shown} is given {count} times: each prompt x seed is one video, and a repeat "
                               "would count the same video twice in the metrics; give each once")  # fmt: skip


def _check_checkpoint(spec: RunSpec, method: AttentionMethod, checkpoint_to_come: bool) -> dict[str, str] | None:
    """The checkpoint's file identity after checking it fits the run (None without a checkpoint)."""
    stand_ins = sorted(set(spec.method_params) & set(method.untrained_params))
    if stand_ins and (spec.checkpoint is not None or checkpoint_to_come):
        raise HarnessError(f"{spec.method}: --param {', '.join(stand_ins)} stands in for a trained state (`bench "
                           "latency` without a checkpoint); this run loads a checkpoint, which fixes its own. Drop "
                           f"--param {', '.join(stand_ins)}")  # fmt: skip
    if spec.checkpoint is None:
        if method.capabilities.needs_training and not checkpoint_to_come:
            # Untrained states (linvideo's linear_layers) serve `bench latency` only, never a quality run.
            from harness.training import train_command  # training imports this module

            raise HarnessError(
                f"method {spec.method!r} needs a trained checkpoint: make one with "
                f"{train_command(spec.method, spec.model)}, then pass --checkpoint DIR"
            )
        return None
    path = Path(spec.checkpoint)
    summary = inspect_checkpoint(path, spec.method, folder=method.capabilities.needs_training)
    if summary.model and summary.model != spec.model:
        raise HarnessError(f"checkpoint {path} was trained on model {summary.model!r}; this run uses {spec.model!r}")
    if summary.weights and summary.weights != spec.weights:
        raise HarnessError(f"checkpoint {path} was distilled from {spec.model} weights {summary.weights!r}; this run "
                           f"loads {spec.weights!r} (the prompt encoder and VAE come from them): pass --weights "
                           f"{summary.weights}")  # fmt: skip
    for name, value in summary.fixed_sampling.items():
        if getattr(spec.sampling, name, None) != value:
            raise HarnessError(f"checkpoint {path} fixes {name} = {value} (its generator was trained so); this run "
                               f"asks for {name} = {getattr(spec.sampling, name, None)}: drop --{name}")  # fmt: skip
    ours = method.params()
    for name in method.state_params:
        if name in summary.state_params and summary.state_params[name] != ours.get(name):
            theirs = summary.state_params[name]
            raise HarnessError(
                f"checkpoint {path} was trained with {name}={theirs!r}, this run asks for {name}={ours.get(name)!r}: "
                f"pass --param {name}={theirs} or another checkpoint"
            )
    method.check_checkpoint(summary)
    return checkpoint_identity(path)
