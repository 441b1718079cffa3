"""The cases of the newcomer catalogue (:mod:`harness.benchmarks.newcomer_catalogue`) and the fixtures they share.

Every case of issue 19's kinds B-G that has a CLI form (G2, memory held by training's timer, has none: it is not
observable from the command line), then a newcomer's own trials: ``--help`` of every command, typos, unknown
options, bad numbers, odd paths, missing and corrupt files, interrupted and repeated runs, ``--json``. Cases stay
cheap: the toy model with one prompt of its grammar and 2 steps, or ``wan-tiny``, on the CPU.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.benchmarks.newcomer_catalogue import (
    REPO,
    WS,
    Case,
    Invocation,
    SetupError,
    Workspace,
    bench,
    model_built,
    require_ok,
    running,
)

TOY_PROMPT = "a small red disk moves left on a gray background"  # one prompt of the toy grammar
TOY_PROMPT_2 = "a large blue square moves up on a black background"
SHIPPED_LINVIDEO = REPO / "harness/toyworld/assets/linvideo/toy-3bf0c0ed51fa"
RUNS = f"{WS}/runs"
SYS_DIR = "/sys/newcomer-catalogue"  # a read-only place, even for root
TINY_RECORD = f"{RUNS}/wan-tiny__sdpa__*.json"  # the record of _tiny_pair's run (its id ends in a hash)
GPU_TABLE3 = REPO / "reports/gpu/h200/run_65b3f07/fewstep_toy/report/table3.csv"  # H200 few-step rows, no records


def command(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """``base`` with ``extra`` appended, an option of ``base`` that ``extra`` sets again dropped (so that a case
    reads as what a user would type). ``--prompt`` and ``--param`` repeat, so ``base`` never has them."""
    given = {arg for arg in extra if arg.startswith("--")}
    kept: list[str] = []
    skip = False
    for index, arg in enumerate(base):
        if skip:
            skip = False
            continue
        if arg in given:
            skip = index + 1 < len(base) and not base[index + 1].startswith("--")
            continue
        kept.append(arg)
    return (*kept, *extra)


def toy(*extra: str, prompt: str | None = TOY_PROMPT, eval_suites: str | None = "none") -> tuple[str, ...]:
    """``bench run`` on the toy model, CPU, one prompt of its grammar, 2 steps, no scoring, into ``{ws}/runs``."""
    base = ("run", "--model", "toy", "--device", "cpu", "--no-progress", "--steps", "2", "--runs-dir", RUNS)
    base += ("--prompt", prompt) if prompt is not None else ()
    base += ("--eval", eval_suites) if eval_suites is not None else ()
    return command(base, extra)


def tiny(*extra: str, eval_suites: str | None = "none") -> tuple[str, ...]:
    """``bench run`` on wan-tiny, CPU, 2 steps, no scoring, into ``{ws}/runs``."""
    base = ("run", "--model", "wan-tiny", "--device", "cpu", "--no-progress", "--steps", "2", "--runs-dir", RUNS)
    return command(base + (("--eval", eval_suites) if eval_suites is not None else ()), extra)


def tiny_latency(*extra: str) -> tuple[str, ...]:
    """``bench latency`` of sdpa and math on wan-tiny, CPU, 1 warm-up and 3 timed forwards."""
    base = ("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,math", "--warmup", "1",
            "--repeats", "3")  # fmt: skip
    return command(base, extra)


def train(*extra: str) -> tuple[str, ...]:
    """``bench train`` of linvideo on the toy: 1 layer, 1 step of 1 state from 1 prompt (seconds if accepted)."""
    base = ("train", "--out", f"{WS}/lv", "--model", "toy", "--target-layers", "1", "--steps", "1", "--batch-size",
            "1", "--prompts", "1", "--device", "cpu", "--no-progress")  # fmt: skip
    return command(base, extra)


TRAIN_3 = ("--steps", "3", "--checkpoint-every", "1")  # a training with a checkpoint after each step


def calibrate(*extra: str) -> tuple[str, ...]:
    """``bench calibrate`` of dfa on the toy: one prompt, 2 steps."""
    base = ("calibrate", "--out", f"{WS}/plan.json", "--model", "toy", "--prompts", "1", "--steps", "2", "--device",
            "cpu", "--no-progress")  # fmt: skip
    return command(base, extra)


def toy_train(*extra: str) -> tuple[str, ...]:
    """``bench toy train``: 1 step of 2 clips from a pool of 8, no evaluation."""
    base = ("toy", "train", "--out", f"{WS}/t", "--steps", "1", "--batch-size", "2", "--pool-size", "8",
            "--eval-clips", "0", "--device", "cpu", "--no-progress", "--no-compile")  # fmt: skip
    return command(base, extra)


# -- fixtures ------------------------------------------------------------------------------------


def _toy_run(folder: Path) -> None:
    """A runs folder with one finished toy sdpa run (one prompt, 2 steps, no scores)."""
    require_ok(bench(toy("--runs-dir", str(folder)), folder))


def _tiny_runs(folder: Path) -> None:
    """wan-tiny runs: sdpa and math of one cohort (2 steps), sdpa at height 32 and at 3 steps (other cohorts)."""
    for extra in (("--method", "sdpa"), ("--method", "math"), ("--height", "32"), ("--steps", "3")):
        require_ok(bench(tiny(*extra, "--runs-dir", str(folder)), folder))


def _toy_runs_params(folder: Path) -> None:
    """Toy runs scored by ToyBench (as ``make demo``): sdpa, and xattn with parameters (a long params cell)."""
    for extra in (("--method", "sdpa"), ("--method", "xattn", "--param", "threshold=0.8", "--param", "stride=4")):
        require_ok(bench(toy(*extra, "--runs-dir", str(folder), eval_suites=None), folder))


def _latency(folder: Path) -> None:
    require_ok(bench(tiny_latency("--out", str(folder / "latency.json")), folder))


def _trained(folder: Path) -> None:
    """An uninterrupted 3-step linvideo training of the toy (the reference a resumed one must equal)."""
    require_ok(bench(train(*TRAIN_3, "--out", str(folder / "lv")), folder, timeout=180))


def _plan(folder: Path) -> None:
    """A DFA plan of the toy model for 2 steps (one calibration prompt)."""
    require_ok(bench(calibrate("--out", str(folder / "plan.json")), folder))


FIXTURES: dict[str, Callable[[Path], None]] = {
    "toy_run": _toy_run,
    "tiny_runs": _tiny_runs,
    "toy_runs_params": _toy_runs_params,
    "latency": _latency,
    "plan": _plan,
    "trained": _trained,
}


# -- setups --------------------------------------------------------------------------------------


def make_file(name: str, content: str | bytes = "not a folder") -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        path = ws.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def small_disk(name: str, size: str) -> Callable[[Workspace], None]:
    """A tmpfs of ``size`` mounted at ``{ws}/NAME`` (a disk that fills), unmounted after the case; needs root."""

    def setup(ws: Workspace) -> None:
        target = ws.path / name
        target.mkdir()
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                                 capture_output=True, text=True, check=False)  # fmt: skip
        if mounted.returncode != 0:
            raise SetupError(f"cannot mount a {size} tmpfs (needs root): {mounted.stderr.strip()}")
        ws.cleanups.append(lambda: subprocess.run(["umount", str(target)], check=False))

    return setup


def fill_once_model_built(name: str, leave_free: int) -> Callable[[Workspace, subprocess.Popen[bytes]], None]:
    """Once the command has built its model (past every up-front check), fill ``{ws}/NAME`` to ``leave_free``."""

    def during(ws: Workspace, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 120
        while not model_built(ws) and running(proc) and time.monotonic() < deadline:
            time.sleep(0.01)
        target = ws.path / name
        with open(target / ".filler", "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(target).free - leave_free)

    return during


def make_dir(name: str) -> Callable[[Workspace], None]:
    return lambda ws: (ws.path / name).mkdir(parents=True)


def copy_linvideo(edit: Callable[[Path], None] | None = None) -> Callable[[Workspace], None]:
    """The shipped LinVideo conversion copied to ``{ws}/ckpt``, then ``edit``-ed (damaged, relabelled)."""

    def setup(ws: Workspace) -> None:
        target = ws.path / "ckpt"
        shutil.copytree(SHIPPED_LINVIDEO, target)
        if edit is not None:
            edit(target)

    return setup


def edit_json(relative: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / relative
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return edit


def truncate(relative: str, size: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        with open(folder / relative, "r+b") as handle:
            handle.truncate(size)

    return edit


REMOVE = object()


def with_key(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``data`` with the dotted ``path`` set to ``value`` (or removed when ``value`` is :data:`REMOVE`)."""
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    if value is REMOVE:
        node.pop(last)
    else:
        node[last] = value
    return data


def copy_fixture(name: str, to: str) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        ws.copy_fixture(name, to)

    return setup


def latency_baseline(change: Callable[[Any], Any]) -> Callable[[Workspace], None]:
    """``{ws}/baseline.json``: the latency fixture changed by ``change``."""

    def setup(ws: Workspace) -> None:
        data = json.loads((ws.fixture("latency") / "latency.json").read_text())
        (ws.path / "baseline.json").write_text(json.dumps(change(data)))

    return setup


def steps(*setups: Callable[[Workspace], None]) -> Callable[[Workspace], None]:
    def setup(ws: Workspace) -> None:
        for each in setups:
            each(ws)

    return setup


def damaged_record(change: Callable[[dict[str, Any]], dict[str, Any]], name: str) -> Callable[[Workspace], None]:
    """The toy run fixture at ``{ws}/runs`` plus a copy of its record, changed, as ``runs/NAME.json``."""

    def setup(ws: Workspace) -> None:
        runs = ws.copy_fixture("toy_run", "runs")
        record = json.loads(next(runs.glob("*.json")).read_text())
        (runs / f"{name}.json").write_text(json.dumps(change({**record, "run_id": name})))

    return setup


def kill_after_first_video(args: tuple[str, ...], videos: int) -> Callable[[Workspace], None]:
    """Start ``bench ARGS``, SIGKILL it once its first video's frames are saved (before the last is made)."""

    def setup(ws: Workspace) -> None:
        def kill_when_one_is_saved(proc: subprocess.Popen[bytes]) -> None:
            deadline = time.monotonic() + 170
            while time.monotonic() < deadline and running(proc):
                if len(list((ws.path / "runs").glob("*/frames/*.safetensors"))) >= 1:
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        result = bench(args, ws.path, timeout=180, on_start=kill_when_one_is_saved)
        saved = len(list((ws.path / "runs").glob("*/frames/*.safetensors")))
        if result.returncode != -signal.SIGKILL or not 1 <= saved < videos:
            raise SetupError(f"could not interrupt the run mid-way (exit {result.returncode}, {saved} saved)")

    return setup


def kill_training_after_first_checkpoint(args: tuple[str, ...]) -> Callable[[Workspace], None]:
    """Start ``bench ARGS`` (a training into ``{ws}/lv``), SIGKILL it once a resumable checkpoint is written."""

    def setup(ws: Workspace) -> None:
        state = ws.path / "lv" / "training_state.json"

        def kill_when_saved(proc: subprocess.Popen[bytes]) -> None:
            deadline = time.monotonic() + 170
            while time.monotonic() < deadline and running(proc):
                if state.exists():
                    os.killpg(proc.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        result = bench(args, ws.path, timeout=180, on_start=kill_when_saved)
        if result.returncode != -signal.SIGKILL or (ws.path / "lv" / "spec.json").exists():
            raise SetupError(f"could not interrupt the training mid-way (exit {result.returncode})")

    return setup


def same_as_uninterrupted(result: Invocation, ws: Workspace) -> str | None:
    """The resumed training's checkpoint equals the uninterrupted one, file by file."""
    reference = ws.fixture("trained") / "lv"
    for name in ("linvideo.safetensors", "transformer.safetensors"):
        ours = ws.path / "lv" / name
        if not ours.is_file() or ours.read_bytes() != (reference / name).read_bytes():
            return f"the resumed training's {name} differs from an uninterrupted one's"
    return None


def damage_saved_frames(ws: Workspace) -> None:
    """Cut a finished video's frames file to 64 bytes (a disk error after the kill)."""
    saved = next(ws.path.glob("runs/*/frames/*.safetensors"))
    truncate(saved.name, 64)(saved.parent)


def _tiny_pair(ws: Workspace, option: str, value: str) -> None:
    """``{ws}/runs``: the fixture's wan-tiny sdpa run alone; ``{ws}/ref.json``: its run made with ``OPTION VALUE``."""
    fixture = ws.fixture("tiny_runs")
    (ws.path / "runs").mkdir()
    for record_path in fixture.glob("*.json"):
        record = json.loads(record_path.read_text())
        spec = record["spec"]
        is_base = spec["method"] == "sdpa" and spec["sampling"]["height"] == 64 and spec["sampling"]["steps"] == 2
        if is_base:
            shutil.copy(record_path, ws.path / "runs" / record_path.name)
            shutil.copytree(fixture / record["run_id"], ws.path / "runs" / record["run_id"])
        if str(spec["sampling"][option.removeprefix("--")]) == value:
            shutil.copy(record_path, ws.path / "ref.json")
            shutil.copytree(fixture / record["run_id"], ws.path / record["run_id"])


def _run_with_checkpoint_elsewhere(ws: Workspace) -> None:
    """The linvideo run of ``{ws}/ckpt``'s copy at another path, into ``{ws}/runs_a``."""
    shutil.copytree(ws.path / "ckpt", ws.path / "elsewhere" / "copy")
    ws.bench_ok(*toy("--method", "linvideo", "--checkpoint", f"{WS}/elsewhere/copy", "--runs-dir", f"{WS}/runs_a"))


# -- checks --------------------------------------------------------------------------------------


def strict_loads(text: str) -> Any:
    """JSON as a strict parser reads it: NaN and Infinity refused."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def json_stdout(result: Invocation, ws: Workspace) -> str | None:
    """stdout is one strict JSON document and nothing else."""
    try:
        strict_loads(result.stdout)
    except ValueError as exc:
        return f"stdout is not JSON only ({exc}); it starts {result.stdout[:60]!r}"
    return None


def records(ws: Workspace, runs: str = "runs") -> list[dict[str, Any]]:
    return [strict_loads(p.read_text()) for p in sorted((ws.path / runs).glob("*.json"))]


def record_check(test: Callable[[dict[str, Any]], str | None]) -> Callable[[Invocation, Workspace], str | None]:
    """A check of the run's one record (there is one, it is strict JSON, then ``test``)."""

    def check(result: Invocation, ws: Workspace) -> str | None:
        try:
            found = records(ws)
        except ValueError as exc:
            return f"a record is not strict JSON: {exc}"
        return test(found[0]) if len(found) == 1 else f"{len(found)} records in the runs folder, expected one"

    return check


def videos_once(expected: int) -> Callable[[dict[str, Any]], str | None]:
    def test(record: dict[str, Any]) -> str | None:
        samples = [(v["prompt"], v["seed"]) for v in record["artifacts"]["videos"]]
        if len(samples) != expected or len(set(samples)) != expected:
            return f"the record lists {len(samples)} video(s) ({len(set(samples))} distinct), expected {expected}"
        return None

    return test


def both(*checks: Callable[[Invocation, Workspace], str | None]) -> Callable[[Invocation, Workspace], str | None]:
    def check(result: Invocation, ws: Workspace) -> str | None:
        return next((problem for c in checks if (problem := c(result, ws))), None)

    return check


def keep_first_block_false(record: dict[str, Any]) -> str | None:
    given, used = record["spec"]["method_params"].get("keep_first_block"), record["method_params_resolved"]
    if given is not False or used.get("keep_first_block") is not False:
        return f"keep_first_block=no recorded as {given!r} (spec) / {used.get('keep_first_block')!r} (resolved)"
    return None


def resumed(expected_videos: int) -> Callable[[dict[str, Any]], str | None]:
    def test(record: dict[str, Any]) -> str | None:
        if not record.get("resumed_videos"):
            return "the rerun made every video again (resumed_videos 0): the killed run's finished videos were lost"
        return videos_once(expected_videos)(record)

    return test


def frames_readable(result: Invocation, ws: Workspace) -> str | None:
    from safetensors import safe_open

    for path in (ws.path / "runs").glob("*/frames/*.safetensors"):
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as exc:  # any failure to read is the finding
            return f"a frames file the record joins is unreadable: {path.name} ({exc})"
    return None


def no_wrong_files(result: Invocation, ws: Workspace) -> str | None:
    """After a failed write: no 0-byte file and no record left in the runs folder."""
    runs = ws.path / "runs"
    empty = [p.name for p in runs.rglob("*") if p.is_file() and p.stat().st_size == 0]
    if empty:
        return f"a 0-byte file was left: {empty[0]}"
    if list(runs.glob("*.json")):
        return "a record was written for a run that failed"
    return None


def skipped_unchanged(result: Invocation, ws: Workspace) -> str | None:
    """The rerun of a finished spec says so and leaves the record as it was."""
    if "skipped" not in result.output:
        return "a finished spec was generated again"
    return record_check(videos_once(1))(result, ws)


def same_run_id(result: Invocation, ws: Workspace) -> str | None:
    """A checkpoint at another path with the same content names the same run."""
    first = [p.name for p in (ws.path / "runs_a").glob("*.json")]
    second = [p.name for p in (ws.path / "runs").glob("*.json")]
    if first != second:
        return f"the same checkpoint at another path gave another run id: {first} vs {second}"
    return None


def fidelity_strict(record: dict[str, Any]) -> str | None:
    """PSNR of a run against itself is infinite: null in strict JSON, with a note naming it."""
    scores = record.get("metrics", {}).get("fidelity", {})
    if "psnr" not in json.dumps(scores):
        return f"no psnr in the fidelity scores: {scores}"
    if not record.get("non_finite_as_null"):
        return "the infinite PSNR is not noted under non_finite_as_null"
    return None


def record_unchanged(name: str) -> Callable[[Invocation, Workspace], str | None]:
    """The run's record still equals the fixture's (a refused eval must not touch it)."""

    def check(result: Invocation, ws: Workspace) -> str | None:
        path = next(p for p in (ws.path / "runs").glob("*.json") if name in p.name)
        fixture = ws.fixture("tiny_runs") / path.name
        if path.read_bytes() != fixture.read_bytes():
            return f"the refused eval changed {path.name}"
        return None

    return check


def report_skips(bad: str) -> Callable[[Invocation, Workspace], str | None]:
    def check(result: Invocation, ws: Workspace) -> str | None:
        if bad not in result.stderr:
            return f"the unusable record {bad} is not named on stderr"
        if "sdpa" not in result.stdout:
            return "the readable record is missing from the report"
        return None

    return check


def no_corrupt_claim(result: Invocation, ws: Workspace) -> str | None:
    """A checkpoint's spec.json and a plan file beside the runs are not records: not skipped as 'corrupt'."""
    claims = [line.strip() for line in result.stderr.splitlines() if "corrupt" in line.lower()]
    return f"a file that is not a record is called corrupt: {claims[0][:160]}" if claims else None


def table_fits(width: int) -> Callable[[Invocation, Workspace], str | None]:
    """The console table's headers are whole words at ``width`` columns (not folded into 2-3 letter pieces)."""

    def check(result: Invocation, ws: Workspace) -> str | None:
        lines = result.stdout.splitlines()
        if any(len(line) > width for line in lines):
            return f"a line is wider than {width} columns"
        header = next((i for i, line in enumerate(lines) if "method" in line), None)
        if header is None:
            return "no header 'method' whole in the console table (folded into pieces)"
        cells = [cell.strip() for line in lines[header : header + 4] for cell in line.split("│") if cell.strip()]
        folded = [cell for cell in cells if len(cell) <= 3 and cell.isalpha()]
        if len(folded) >= 3:
            return f"headers folded into pieces at {width} columns: {folded[:6]}"
        return None

    return check


def latency_notes_load(result: Invocation, ws: Workspace) -> str | None:
    """The latency result notes the machine's load (beside or in its environment), and warns when a spread exceeds
    its median."""
    data = strict_loads((ws.path / "lat.json").read_text())
    if "machine_load" not in data and "load" not in json.dumps(data["environment"]).lower():
        return "the latency record does not note the machine's load"
    for name, entry in data["methods"].items():
        forward = entry["forward"]
        spread = forward.get("max_ms", forward["p75_ms"]) - forward.get("min_ms", forward["p25_ms"])
        if spread > forward["median_ms"] and "spread" not in result.output.lower():
            return f"{name}: spread {spread:.3g} ms > median {forward['median_ms']:.3g} ms without a warning"
    return None


def help_check(words: tuple[str, ...]) -> Callable[[Invocation, Workspace], str | None]:
    def check(result: Invocation, ws: Workspace) -> str | None:
        text = " ".join(result.stdout.split())
        if "Usage:" not in text:
            return "no usage line"
        missing = [w for w in words if w not in text]
        return f"the help lacks {missing}" if missing else None

    return check


def methods_json(result: Invocation, ws: Workspace) -> str | None:
    problem = json_stdout(result, ws)
    if problem:
        return problem
    rows = strict_loads(result.stdout)
    untyped = [(r["name"], p["name"]) for r in rows for p in r["parameters"] if not p.get("type") or not p.get("help")]
    return f"parameters without a type or help: {untyped[:3]}" if untyped else None


def backend_described(result: Invocation, ws: Workspace) -> str | None:
    """Every block-sparse method's ``backend`` offers flashinfer-bsr and its help says what ``auto`` runs."""
    problem = json_stdout(result, ws)
    if problem:
        return problem
    backends = [(r["name"], p) for r in strict_loads(result.stdout) for p in r["parameters"] if p["name"] == "backend"]
    if not backends:
        return "no method has a backend parameter"
    lacking = [name for name, p in backends if "flashinfer-bsr" not in p["choices"] or "flex-tuned on Hopper"
               not in p["help"] or "flashinfer-bsr (cuda" not in p["help"]]  # fmt: skip
    return f"backend of {lacking} lacks flashinfer-bsr, what it needs, or what auto runs" if lacking else None


def table3_once(own: int) -> Callable[[Invocation, Workspace], str | None]:
    """``{ws}/o/table3.csv`` holds every row of :data:`GPU_TABLE3` and ``own`` rows of the runs folder, each once."""

    def check(result: Invocation, ws: Workspace) -> str | None:
        with (ws.path / "o" / "table3.csv").open(newline="") as table, GPU_TABLE3.open(newline="") as gpu:
            rows, included = list(csv.DictReader(table)), len(list(csv.DictReader(gpu)))
        keys = [tuple(value for column, value in row.items() if column != "source") for row in rows]
        if len(set(keys)) < len(keys):
            return f"{len(keys) - len(set(keys))} row(s) of table3.csv are there twice"
        if len(rows) != included + own:
            return f"table3.csv has {len(rows)} rows, not {included} included + {own} of the runs folder"
        return None

    return check


def _report_of_these_runs(ws: Workspace) -> None:
    """The toy run at ``{ws}/runs`` and its report with the GPU rows at ``{ws}/first`` (as a user made it before)."""
    ws.copy_fixture("toy_run", "runs")
    require_ok(bench(("report", "--runs-dir", RUNS, "--out", f"{WS}/first", "--include", str(GPU_TABLE3)), ws.path))


def plan_json(result: Invocation, ws: Workspace) -> str | None:
    problem = json_stdout(result, ws)
    if problem:
        return problem
    plan = strict_loads(result.stdout)
    if not plan.get("total_videos"):
        return f"the plan counts no videos: {str(plan)[:100]}"
    if any(path.is_file() for path in ws.path.glob("runs/**/*")):
        return "the dry run wrote into the runs folder"
    return None


def eval_json(result: Invocation, ws: Workspace) -> str | None:
    problem = json_stdout(result, ws)
    if problem:
        return problem
    metrics = strict_loads(result.stdout)["metrics"].get("proxies", {})
    bad = [k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v)]
    if not metrics or bad:
        return f"proxies scores missing or not finite: {metrics}"
    return None


def trained_checkpoint(result: Invocation, ws: Workspace) -> str | None:
    folder = ws.path / "lv"
    wanted = ("spec.json", "linvideo.safetensors", "transformer.safetensors")
    missing = [name for name in wanted if not (folder / name).is_file()]
    return f"the checkpoint lacks {missing}" if missing else None


def plan_written(result: Invocation, ws: Workspace) -> str | None:
    plan = strict_loads((ws.path / "plan.json").read_text())
    return None if plan.get("method") == "dfa" and plan.get("choices") else f"not a DFA plan: {str(plan)[:100]}"


# -- the cases -----------------------------------------------------------------------------------

HELP = [
    ((), ("run", "report", "latency")),
    (("methods",), ("--json",)),
    (("models",), ("--json",)),
    (("run",), ("--method", "--param", "--seeds", "--dry-run")),
    (("latency",), ("--methods", "--repeats", "--out")),
    (("check",), ("--baseline", "--tolerance")),
    (("train",), ("--target-layers", "--out")),
    (("calibrate",), ("--out", "--threshold")),
    (("ablate",), ("One or more of alpha", "--steps")),
    (("eval",), ("A run record", "--suite")),
    (("report",), ("--runs-dir", "--out", "--include")),
    (("toy",), ("train",)),
    (("toy", "train"), ("--out", "--steps")),
    (("vbench",), ("setup", "check")),
    (("vbench", "setup"), ("--python",)),
    (("vbench", "check"), ("--json",)),
    (("vbench2",), ("setup", "check")),
    (("vbench2", "setup"), ("--python",)),
    (("vbench2", "check"), ("--json",)),
]
HELP_CASES = [
    Case(f"help-{'-'.join(words) or 'bench'}", "help", (*words, "--help"), expect="ok", check=help_check(shown))
    for words, shown in HELP
]

ISSUE_B = [
    Case("toy-prompt-outside-grammar", "B", toy(prompt="red disk", eval_suites=None), fragments=("red disk",),
         source="issue 19 B: --prompt 'red disk' (traceback after 55 s)"),
    Case("toy-empty-prompt", "B", toy(prompt="", eval_suites=None), fragments=("prompt",),
         source="issue 19 B: --prompt ''"),
    Case("vbench-prompt-with-slash", "B",
         tiny("--prompt", "a cat/dog runs", "--eval", "vbench", "--dimensions", "temporal_flickering"),
         fragments=("/",), source="issue 19 B: VBench file name with '/', checked only at scoring"),
    Case("vbench-prompt-over-255-bytes", "B",
         tiny("--prompt", "a fox runs " * 30, "--eval", "vbench", "--dimensions", "temporal_flickering"),
         fragments=("255",), source="issue 19 B: VBench file name over 255 bytes"),
    Case("vbench-6-videos-per-prompt", "B",
         tiny("--seeds", "0,1,2,3,4,5", "--eval", "vbench", "--dimensions", "temporal_flickering"),
         fragments=("at most 5 videos per prompt",), source="issue 19 B: more than 5 VBench videos per prompt"),
    Case("vbench2-21-videos-per-prompt", "B",
         tiny("--seeds", ",".join(map(str, range(21))), "--eval", "vbench2", "--dimensions", "Diversity"),
         fragments=("at most 20 videos per prompt",), source="issue 19 B: more than 20 VBench-2.0 videos per prompt"),
    Case("proxies-1-frame", "B", tiny("--frames", "1", eval_suites="proxies"), fragments=("at least 3 frames",),
         source="issue 19 B: proxies on a 1-frame clip (traceback after generation)"),
    Case("proxies-2-frames", "B", toy("--frames", "2", eval_suites="proxies"), fragments=("at least 3 frames",),
         source="issue 19 B: proxies on a 2-frame clip"),
    Case("tiny-frames-70", "B", tiny("--frames", "70"), fragments=("4k+1", "70"),
         source="issue 19 B: --frames 70 on wan-tiny (RoPE shape error after the model was built)"),
    Case("tiny-height-beyond-rope", "B", tiny("--height", "1040"), fragments=("RoPE", "1024"),
         source="issue 19 B: a size past the RoPE tables, checked before the model is built"),
    Case("ckpt-empty-folder", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/empty"), setup=make_dir("empty"),
         fragments=("empty", "spec.json"), source="issue 19 B: checkpoint = an empty folder"),
    Case("ckpt-single-file", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt/linvideo.safetensors"),
         setup=copy_linvideo(), fragments=("is a file",), source="issue 19 B: checkpoint = a single file"),
    Case("ckpt-truncated-safetensors", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         setup=copy_linvideo(truncate("transformer.safetensors", 4096)), fragments=("transformer.safetensors",),
         source="issue 19 B: truncated safetensors"),
    Case("ckpt-truncated-state", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         setup=copy_linvideo(truncate("linvideo.safetensors", 100)), fragments=("linvideo.safetensors",),
         source="issue 19 B: truncated safetensors (the method's state)"),
    Case("ckpt-other-method", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         setup=copy_linvideo(edit_json("spec.json", lambda s: {**s, "method": "sla"})), fragments=("sla", "linvideo"),
         source="issue 19 B: another method's checkpoint"),
    Case("ckpt-linvideo-for-sla", "B", toy("--method", "sla", "--checkpoint", f"{WS}/ckpt"), setup=copy_linvideo(),
         fragments=("linvideo",), source="issue 19 B: another method's checkpoint (sla given linvideo's)"),
    Case("ckpt-other-model", "B", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         setup=copy_linvideo(edit_json("spec.json", lambda s: with_key(s, "trajectory_store.model", "wan-tiny"))),
         fragments=("wan-tiny", "toy"), source="issue 19 B: another model's checkpoint"),
    Case("ckpt-toy-on-wan-tiny", "B", tiny("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         setup=copy_linvideo(), fragments=("toy", "wan-tiny"), source="issue 19 B: another model's checkpoint"),
    Case("ckpt-kernel-mismatch", "B", toy("--method", "linvideo", "--param", "kernel=relu", "--checkpoint",
         f"{WS}/ckpt"), setup=copy_linvideo(), fragments=("kernel",),
         source="issue 19 B: a kernel that does not match the checkpoint"),
    Case("check-negative-tolerance", "B", ("check", "--baseline", f"{WS}/baseline.json", "--tolerance", "-1"),
         setup=latency_baseline(lambda d: d), fragments=("--tolerance",),
         source="issue 19 B: bench check --tolerance -1 (after re-measuring, 118 s)"),
    Case("xattn-block-size-20", "B", toy("--method", "xattn", "--param", "block_size=20"),
         fragments=("block_size", "20"), source="issue 19 B: xattn --param block_size=20 (empty run folder left)"),
]  # fmt: skip

ISSUE_C = [
    Case("xattn-keep-first-block-no", "C", toy("--method", "xattn", "--param", "keep_first_block=no"), expect="ok",
         check=record_check(keep_first_block_false), source="issue 19 C: keep_first_block=no ran with True"),
    Case("radial-decay-factor-nan", "C", toy("--method", "radial", "--param", "decay_factor=NaN"),
         fragments=("decay_factor",), source="issue 19 C: decay_factor=NaN ran and wrote NaN"),
    Case("svg-seed-abc", "C", toy("--method", "svg", "--param", "seed=abc"), fragments=("seed", "abc"),
         source="issue 19 C: --param seed=abc (traceback)"),
    Case("dfa-window-abc", "C", toy("--method", "dfa", "--param", "window=abc"), fragments=("window", "abc"),
         source="issue 19 C: --param window=abc (traceback)"),
    Case("xattn-tau", "C", toy("--method", "xattn", "--param", "tau=0.5"), fragments=("tau", "threshold", "stride"),
         source="issue 19 C: --param tau=0.5 without the valid names"),
    Case("xattn-keep-first-block-maybe", "C", toy("--method", "xattn", "--param", "keep_first_block=maybe"),
         fragments=("keep_first_block", "maybe")),
    Case("xattn-threshold-out-of-range", "C", toy("--method", "xattn", "--param", "threshold=1.5"),
         fragments=("threshold", "1.5")),
    Case("xattn-stride-not-integer", "C", toy("--method", "xattn", "--param", "stride=8.0"), fragments=("stride",)),
    Case("svg-sparsity-inf", "C", toy("--method", "svg", "--param", "sparsity=inf"), fragments=("sparsity",)),
    Case("sla-backend-typo", "C", toy("--method", "radial", "--param", "backend=flexx"),
         fragments=("backend", "flexx", "flex")),
    Case("latency-param-typo", "C", tiny_latency("--methods", "xattn", "--param", "xattn.tau=0.5"),
         fragments=("tau", "threshold"), source="issue 19 C: the schema used by bench latency"),
    Case("latency-param-without-method", "C", tiny_latency("--param", "threshold=0.5"),
         fragments=("METHOD.KEY=VALUE",)),
]  # fmt: skip

ISSUE_D = [
    Case("toy-odd-size", "D", toy("--height", "33", "--width", "35"), fragments=("height", "33"),
         source="issue 19 D: an odd size refused up front (ffmpeg wrote a 0-byte mp4)"),
    Case("full-disk-before-run", "D", toy(), setup=small_disk("runs", "12k"), fragments=("free",),
         source="own (D): a disk without room refused up front (a 12 kB tmpfs as the runs folder; needs root)"),
    Case("full-disk-mid-run", "D", toy("--steps", "20"), setup=small_disk("runs", "210M"),
         during=fill_once_model_built("runs", leave_free=8192), mid_run=True, check=no_wrong_files,
         fragments=("no space left",), source="issue 19 D: a full disk mid-run (a 210 MB tmpfs runs folder filled "
         "to 8 kB free once the model is built; needs root)"),
    Case("file-size-limit-frames", "D", toy(), file_size_limit=20_000, mid_run=True, check=no_wrong_files,
         fragments=(".safetensors",), source="own (D): a write refused by a file-size limit (prlimit --fsize 20 kB; "
         "the frames file is 25 kB)"),
    Case("file-size-limit-mp4", "D", toy(), file_size_limit=2_000, mid_run=True, check=no_wrong_files,
         fragments=(".mp4",), source="issue 19 D: ffmpeg fails mid-run (prlimit --fsize 2 kB; the mp4 is 4 kB)"),
    Case("fidelity-against-itself-strict-json", "D",
         ("eval", f"{RUNS}/toy__sdpa__*.json", "--suite", "fidelity", "--runs-dir", RUNS), expect="ok",
         setup=copy_fixture("toy_run", "runs"),
         check=record_check(fidelity_strict), source="issue 19 D: psnr_db Infinity against itself in the record"),
]  # fmt: skip

ISSUE_E = [
    Case(f"{axis}-zero", "E", tiny(f"--{axis}", "0"), fragments=(axis, "0"),
         source=f"issue 19 E: --{axis} 0 became the model's default")
    for axis in ("height", "width", "frames", "fps")
] + [
    Case("linvideo-linear-layers-with-checkpoint", "E", toy("--method", "linvideo", "--param", "linear_layers=[5]",
         "--checkpoint", f"{WS}/ckpt"), setup=copy_linvideo(), fragments=("linear_layers",),
         source="issue 19 E: linear_layers ignored with a checkpoint, trained: false recorded"),
    Case("linvideo-linear-layers-default-conversion", "E", toy("--method", "linvideo", "--param", "linear_layers=[5]"),
         fragments=("linear_layers",), source="issue 19 E: linear_layers ignored with the shipped conversion"),
    Case("duplicate-seeds", "E", tiny("--seeds", "0,0"), fragments=("seed 0", "2 times"),
         source="issue 19 E: --seeds 0,0 counted one video twice"),
    Case("repeated-prompt", "E", toy("--prompt", TOY_PROMPT, "--prompt", TOY_PROMPT, prompt=None),
         fragments=("prompt", "2 times"),
         source="issue 19 E: a repeated --prompt counted one video twice"),
    Case("fidelity-reference-other-resolution", "E",
         ("eval", TINY_RECORD, "--suite", "fidelity", "--reference", f"{WS}/ref.json", "--runs-dir", RUNS),
         setup=lambda ws: _tiny_pair(ws, "--height", "32"), fragments=("height",),
         source="issue 19 E: fidelity against a run of another resolution (traceback)"),
    Case("fidelity-reference-other-steps", "E",
         ("eval", TINY_RECORD, "--suite", "fidelity", "--reference", f"{WS}/ref.json", "--runs-dir", RUNS),
         setup=lambda ws: _tiny_pair(ws, "--steps", "3"), fragments=("steps",), check=record_unchanged("sdpa"),
         source="issue 19 E: fidelity against another step count overwrote a valid score"),
    Case("checkpoint-run-id-independent-of-path", "E", toy("--method", "linvideo", "--checkpoint", f"{WS}/ckpt"),
         expect="ok", setup=steps(copy_linvideo(), _run_with_checkpoint_elsewhere), check=same_run_id, heavy=True,
         source="issue 19 E: the run id hashed the checkpoint's absolute path"),
]  # fmt: skip


ISSUE_F = [
    Case("check-baseline-is-a-list", "F", ("check", "--baseline", f"{WS}/baseline.json"),
         setup=make_file("baseline.json", "[]"), fragments=("baseline.json",),
         source="issue 19 F: bench check with a baseline that is a list (traceback)"),
    Case("check-baseline-without-spec", "F", ("check", "--baseline", f"{WS}/baseline.json"),
         setup=latency_baseline(lambda d: with_key(d, "spec", REMOVE)), fragments=("baseline.json", "spec"),
         source="issue 19 F: bench check with a baseline lacking its spec (traceback)"),
    Case("report-record-without-latency-stages", "F", ("report", "--runs-dir", RUNS, "--out", f"{WS}/report"),
         expect="ok", setup=damaged_record(lambda r: with_key(r, "latency.stages", REMOVE), "no_stages"),
         check=report_skips("no_stages"), source="issue 19 F: a record without latency stages aborted the report"),
    Case("report-out-under-a-file", "F", ("report", "--runs-dir", RUNS, "--out", f"{WS}/afile/report"),
         setup=steps(copy_fixture("toy_run", "runs"), make_file("afile")), fragments=("afile",),
         forbidden=("File exists",), source="issue 19 F: bench report --out under a file (traceback)"),
    Case("report-out-read-only", "F", ("report", "--runs-dir", RUNS, "--out", SYS_DIR),
         setup=copy_fixture("toy_run", "runs"), fragments=(SYS_DIR,),
         source="issue 19 F: bench report --out on a read-only disk (traceback)"),
    Case("ablate-on-wan-tiny", "F", ("ablate", "kernel", "--model", "wan-tiny", "--steps", "1", "--batch-size", "1",
         "--prompts", "1", "--device", "cpu", "--runs-dir", RUNS, "--train-dir", f"{WS}/ckpts", "--no-progress"),
         fragments=("wan-tiny",), forbidden=("pass --prompt-file",), timeout=90,
         source="issue 19 F: ablate on wan-tiny said 'pass --prompt-file'"),
    Case("sla-without-checkpoint", "F", toy("--method", "sla"), fragments=("sla", "checkpoint"),
         forbidden=("--target-layers",), source="issue 19 F: bench run --method sla suggested --target-layers"),
    Case("calibrate-out-under-a-file", "F", calibrate("--out", f"{WS}/afile/x.json"), setup=make_file("afile"),
         fragments=("afile",), forbidden=("File exists",), source="issue 19 F: --out afile/x.json said 'File exists'"),
    Case("latency-out-under-a-file", "F", tiny_latency("--out", f"{WS}/afile/x.json"), setup=make_file("afile"),
         fragments=("afile",), forbidden=("File exists",), source="issue 19 F: --out afile/x.json said 'File exists'"),
    Case("train-out-under-a-file", "F", train("--out", f"{WS}/afile/x"), setup=make_file("afile"), fragments=("afile",),
         forbidden=("File exists",), source="issue 19 F: --out afile/x said 'File exists'"),
    Case("toy-train-out-under-a-file", "F", toy_train("--out", f"{WS}/afile/x"), setup=make_file("afile"),
         fragments=("afile",),
         forbidden=("File exists",), source="issue 19 F: --out afile/x said 'File exists'"),
    Case("report-checkpoint-and-plan-not-corrupt", "F", ("report", "--runs-dir", RUNS, "--out", f"{WS}/report"),
         expect="ok", check=no_corrupt_claim, check_verdict="WRONG-MESSAGE",
         setup=steps(copy_fixture("toy_run", "runs"), lambda ws: shutil.copytree(SHIPPED_LINVIDEO, ws.path / "runs/lv"),
                     lambda ws: shutil.copy(ws.fixture("plan") / "plan.json", ws.path / "runs/plan.json")),
         source="issue 19 F: bench report called a checkpoint's spec.json and a plan file 'corrupt records'"),
    Case("report-console-80-columns", "F", ("report", "--runs-dir", RUNS, "--out", f"{WS}/report"), expect="ok",
         setup=copy_fixture("toy_runs_params", "runs"), columns=80, check=table_fits(80),
         check_verdict="WRONG-MESSAGE",
         source="issue 19 F: the console table broke every header into 2-3 letter pieces at 80 columns"),
    Case("linvideo-json-stdout", "F", toy("--method", "linvideo", "--json"), expect="ok", check=json_stdout,
         source="issue 19 F: --json printed the default-conversion notice on stdout before the JSON"),
    Case("latency-spread-and-load", "F", tiny_latency("--out", f"{WS}/lat.json"), expect="ok",
         check=latency_notes_load, source="issue 19 F: spread above the median without a warning; load not noted"),
]  # fmt: skip

TOY_3_SEEDS = toy("--seeds", "0,1,2", "--steps", "12")
ISSUE_G = [
    Case("killed-run-resumes", "G", TOY_3_SEEDS, expect="ok", setup=kill_after_first_video(TOY_3_SEEDS, 3),
         check=record_check(resumed(3)), heavy=True, timeout=180,
         source="issue 19 G: kill -9 mid-run, then the same command made every video again"),
    Case("killed-run-damaged-frames-resume", "G", TOY_3_SEEDS, expect="ok",
         setup=steps(kill_after_first_video(TOY_3_SEEDS, 3), damage_saved_frames),
         check=both(frames_readable, record_check(videos_once(3))), heavy=True, timeout=180,
         source="own (G): a finished video's frames damaged after the kill; the resume must not join them"),
    Case("rerun-finished-is-skipped", "G", toy(), expect="ok", setup=copy_fixture("toy_run", "runs"),
         check=skipped_unchanged),
    Case("rerun-with-corrupt-record", "G", toy(), expect="ok",
         setup=steps(copy_fixture("toy_run", "runs"),
                     lambda ws: next(ws.path.glob("runs/*.json")).write_text('{"kind": "run", "spec": {tru')),
         check=record_check(videos_once(1))),
    Case("killed-training-resumes", "G", train(*TRAIN_3), expect="ok",
         setup=kill_training_after_first_checkpoint(train(*TRAIN_3)), check=same_as_uninterrupted, heavy=True,
         timeout=180, source="own (G): kill -9 during bench train, then the same command (the issue found it "
         "byte-identical)"),
    Case("force-rerun", "G", toy("--force"), expect="ok", setup=copy_fixture("toy_run", "runs"),
         check=record_check(videos_once(1))),
]  # fmt: skip

TYPOS = [
    Case("run-typo-method", "typo", tiny("--method", "sdpaa"), fragments=("sdpaa", "did you mean", "sdpa")),
    Case("run-typo-method-linvideo", "typo", toy("--method", "linvido"), fragments=("linvido", "linvideo")),
    Case("run-typo-model", "typo", ("run", "--model", "wan1.3", "--runs-dir", RUNS), fragments=("wan1.3", "wan1.3b")),
    Case("run-typo-model-toy", "typo", ("run", "--model", "toyy", "--runs-dir", RUNS), fragments=("toyy", "toy")),
    Case("run-typo-suite", "typo", toy(eval_suites="toybnech"), fragments=("toybnech", "toybench")),
    Case("run-typo-protocol", "typo", tiny("--protocol", "linvideo-vbnch"), fragments=("linvideo-vbnch",)),
    Case("run-unknown-prompt-set", "typo", tiny("--prompt-set", "vbench:no_such_dimension"),
         fragments=("no_such_dimension",)),
    Case("run-typo-dtype", "typo", tiny("--dtype", "float8"), fragments=("float8",)),
    Case("run-unknown-device", "typo", tiny("--device", "tpu"), fragments=("tpu",)),
    Case("run-cuda-unavailable", "typo", tiny("--device", "cuda:99"), fragments=("cuda",)),
    Case("run-unknown-option", "typo", tiny("--stpes", "2"), fragments=("--stpes",)),
    Case("unknown-command", "typo", ("rnu",), fragments=("rnu",)),
    Case("ablate-typo-axis", "typo", ("ablate", "kernal", "--runs-dir", RUNS, "--train-dir", f"{WS}/c"),
         fragments=("kernal", "kernel")),
    Case("train-typo-kernel", "typo", train("--kernel", "hedgehogg"), fragments=("hedgehogg",)),
    Case("train-typo-objective", "typo", train("--objective", "adn"), fragments=("adn",)),
    Case("train-not-trainable-method", "typo", train("--method", "sdpa"),
         fragments=("sdpa",)),
    Case("eval-typo-suite", "typo", ("eval", f"{RUNS}/toy__sdpa__*.json", "--suite", "proxys", "--runs-dir", RUNS),
         setup=copy_fixture("toy_run", "runs"), fragments=("proxys", "proxies")),
    Case("latency-typo-method", "typo", tiny_latency("--methods", "sdpa,flsh"), fragments=("flsh",)),
    Case("latency-no-methods", "typo", tiny_latency("--methods", ","), fragments=("method",)),
    Case("latency-fa2-on-cpu", "typo", tiny_latency("--methods", "sdpa,fa2"), fragments=("fa2", "cpu")),
    Case("latency-typo-baseline", "typo", tiny_latency("--baseline", "sdpaa"), fragments=("sdpaa",)),
    Case("calibrate-not-calibratable", "typo", calibrate("--method", "sdpa"), fragments=("sdpa",)),
]  # fmt: skip

NUMBERS = [
    Case("steps-not-a-number", "number", tiny("--steps", "abc"), fragments=("--steps", "integer")),
    Case("steps-negative", "number", tiny("--steps", "-1"), fragments=("steps", "-1")),
    Case("cfg-nan", "number", tiny("--cfg", "nan"), fragments=("cfg",)),
    Case("cfg-inf", "number", tiny("--cfg", "inf"), fragments=("cfg",)),
    Case("shift-nan", "number", tiny("--shift", "nan"), fragments=("shift",)),
    Case("shift-negative", "number", tiny("--shift", "-1"), fragments=("shift",)),
    Case("dense-warmup-negative", "number", tiny("--dense-warmup-steps", "-1"), fragments=("warm-up",)),
    Case("dense-layers-out-of-range", "number", tiny("--dense-layers", "5"), fragments=("5", "2 layers")),
    Case("seeds-empty", "number", tiny("--seeds", ""), fragments=("seed",)),
    Case("latency-repeats-zero", "number", tiny_latency("--repeats", "0"), fragments=("repeats",)),
    Case("latency-warmup-negative", "number", tiny_latency("--warmup", "-1"), fragments=("warmup",)),
    Case("latency-step-negative", "number", tiny_latency("--step", "-1"), fragments=("--step", "-1")),
    Case("latency-sample-steps-negative", "number", tiny_latency("--sample-steps", "-1"), fragments=("sample",)),
    Case("check-tolerance-nan", "number", ("check", "--baseline", f"{WS}/baseline.json", "--tolerance", "nan"),
         setup=latency_baseline(lambda d: d), fragments=("--tolerance",)),
    Case("check-repeats-zero", "number", ("check", "--baseline", f"{WS}/baseline.json", "--repeats", "0"),
         setup=latency_baseline(lambda d: d), fragments=("--repeats",)),
    Case("calibrate-threshold-nan", "number", calibrate("--threshold", "nan"), fragments=("threshold",)),
    Case("calibrate-window-zero", "number", calibrate("--window", "0"), fragments=("window",)),
    Case("calibrate-prompts-zero", "number", calibrate("--prompts", "0"), fragments=("prompts",)),
    Case("train-steps-zero", "number", train("--steps", "0"), fragments=("steps",)),
    Case("train-lr-nan", "number", train("--lr", "nan"), fragments=("lr",)),
    Case("train-batch-size-zero", "number", train("--batch-size", "0"), fragments=("batch",)),
    Case("train-target-layers-beyond", "number", train("--target-layers", "99"), fragments=("99",)),
    Case("toy-train-width-not-multiple", "number", toy_train("--width", "100"), fragments=("width", "100")),
    Case("toy-train-dtype", "number", toy_train("--checkpoint-dtype", "float8"), fragments=("float8",)),
]  # fmt: skip

PATHS = [
    Case("runs-dir-under-a-file", "path", tiny("--runs-dir", f"{WS}/afile/runs"), setup=make_file("afile"),
         fragments=("afile",), forbidden=("File exists",)),
    Case("runs-dir-read-only", "path", tiny("--runs-dir", SYS_DIR), fragments=(SYS_DIR,)),
    Case("report-runs-dir-is-a-file", "path", ("report", "--runs-dir", f"{WS}/afile", "--out", f"{WS}/o"),
         setup=make_file("afile"), fragments=("afile",), forbidden=("does not exist",)),
    Case("report-runs-dir-missing", "path", ("report", "--runs-dir", f"{WS}/nope", "--out", f"{WS}/o"),
         fragments=("nope", "does not exist")),
    Case("report-only-corrupt", "path", ("report", "--runs-dir", RUNS, "--out", f"{WS}/o"),
         setup=make_file("runs/bad.json", "nope"), fragments=("bad.json", "no readable records")),
    Case("eval-missing-run", "path", ("eval", "no-such-run", "--runs-dir", RUNS), setup=make_dir("runs"),
         fragments=("no-such-run",)),
    Case("eval-corrupt-record", "path", ("eval", f"{WS}/runs/bad.json", "--runs-dir", RUNS),
         setup=make_file("runs/bad.json", '{"kind": "run", "spec": {tru'), fragments=("bad.json",)),
    Case("eval-toybench-on-wan-tiny", "path", ("eval", TINY_RECORD, "--suite", "toybench", "--runs-dir", RUNS),
         setup=lambda ws: _tiny_pair(ws, "--steps", "3"), fragments=("toybench", "wan-tiny")),
    Case("check-missing-baseline", "path", ("check", "--baseline", f"{WS}/none.json"), fragments=("none.json",)),
    Case("check-corrupt-baseline", "path", ("check", "--baseline", f"{WS}/b.json"), setup=make_file("b.json", "{x"),
         fragments=("b.json",)),
    Case("check-empty-baseline", "path", ("check", "--baseline", f"{WS}/b.json"), setup=make_file("b.json", ""),
         fragments=("b.json",)),
    Case("check-run-record-as-baseline", "path", ("check", "--baseline", f"{WS}/runs/r.json"),
         setup=lambda ws: shutil.copy(next(ws.copy_fixture("toy_run", "runs").glob("*.json")), ws.path / "runs/r.json"),
         fragments=("r.json", "latency")),
    Case("train-prompt-file-missing", "path", train("--prompt-file", f"{WS}/prompts.txt"), fragments=("prompts.txt",)),
    Case("toy-train-init-from-missing", "path", toy_train("--init-from", f"{WS}/t.st"), fragments=("t.st",)),
    Case("wan-weights-missing", "path", ("run", "--model", "wan1.3b", "--weights", f"{WS}/wan", "--device", "cpu",
         "--runs-dir", RUNS, "--eval", "none"), fragments=("does not exist",)),
    Case("wan-weights-offline", "path", ("run", "--model", "wan1.3b", "--device", "cpu", "--runs-dir", RUNS,
         "--eval", "none"), fragments=("--weights",)),
    Case("wan-random-weights-with-eval", "path", ("run", "--model", "wan1.3b", "--random-weights", "--device",
         "cpu", "--runs-dir", RUNS, "--eval", "proxies"), fragments=("random-weights",)),
    Case("dfa-plan-missing", "path", toy("--method", "dfa", "--param", f"plan={WS}/plan.json"),
         fragments=("plan.json",)),
    Case("dfa-plan-corrupt", "path", toy("--method", "dfa", "--param", f"plan={WS}/plan.json"),
         setup=make_file("plan.json", '{"format": 1, "method": "dfa", "choices": [["ful'), fragments=("plan.json",)),
    Case("dfa-plan-wrong-steps", "path", toy("--method", "dfa", "--param", f"plan={WS}/plan.json", "--steps", "5"),
         setup=lambda ws: shutil.copy(ws.fixture("plan") / "plan.json", ws.path / "plan.json"),
         fragments=("plan.json",)),
    Case("dfa-plan-wrong-shape", "path", toy("--method", "dfa", "--param", f"plan={WS}/plan.json"),
         setup=make_file("plan.json", '{"format": 1, "method": "dfa", "choices": {"a": 1}}'), fragments=("plan.json",),
         forbidden=("__init__()", "positional argument")),
    Case("eval-frames-missing", "path", ("eval", f"{RUNS}/toy__sdpa__*.json", "--suite", "proxies", "--runs-dir", RUNS),
         setup=steps(copy_fixture("toy_run", "runs"), lambda ws: shutil.rmtree(next(ws.path.glob("runs/*/frames")))),
         fragments=("frames",)),
    Case("xattn-param-of-another-method", "path", toy("--method", "xattn", "--param", f"plan={WS}/plan.json"),
         fragments=("plan", "threshold")),
    Case("protocol-contradicted", "path", ("run", "--model", "wan1.3b", "--protocol", "linvideo-vbench", "--steps",
         "10", "--dry-run", "--runs-dir", RUNS), fragments=("steps",)),
    Case("dimensions-without-vbench", "path", tiny("--dimensions", "temporal_flickering", eval_suites="proxies"),
         fragments=("--dimensions",)),
]  # fmt: skip

VALID = [
    Case("methods-json", "json", ("methods", "--json"), expect="ok", check=methods_json),
    Case("models-json", "json", ("models", "--json"), expect="ok", check=json_stdout),
    Case("run-json", "json", tiny("--json"), expect="ok", check=both(json_stdout, record_check(videos_once(1)))),
    Case("report-json", "json", ("report", "--runs-dir", RUNS, "--out", f"{WS}/o", "--json"), expect="ok",
         setup=copy_fixture("tiny_runs", "runs"), check=json_stdout),
    Case("latency-json", "json", tiny_latency("--json"), expect="ok", check=json_stdout),
    Case("dry-run-json", "json", ("run", "--model", "wan1.3b", "--protocol", "linvideo-vbench", "--dry-run",
         "--json", "--runs-dir", RUNS), expect="ok", check=plan_json),
    Case("eval-proxies-json", "json", ("eval", TINY_RECORD, "--suite", "proxies", "--runs-dir", RUNS,
         "--json"), expect="ok", setup=lambda ws: _tiny_pair(ws, "--steps", "3"), check=eval_json),
    Case("vbench-check-json", "json", ("vbench", "check", "--json"), expect="ok", check=json_stdout),
    Case("train-tiny", "valid", train("--steps", "2"), expect="ok",
         check=trained_checkpoint, heavy=True),
    Case("calibrate-tiny", "valid", calibrate(), expect="ok", check=plan_written, heavy=True),
    Case("dfa-with-plan", "valid", toy("--method", "dfa", "--param", f"plan={WS}/plan.json"), expect="ok",
         setup=lambda ws: shutil.copy(ws.fixture("plan") / "plan.json", ws.path / "plan.json"),
         check=record_check(videos_once(1))),
]  # fmt: skip

REPORT_INCLUDE = ("report", "--runs-dir", RUNS, "--out", f"{WS}/o", "--include")
TOY_RUN = copy_fixture("toy_run", "runs")
# The surfaces this session added: `bench report --include`, the flashinfer-bsr backend, `auto` on Hopper.
SURFACES = [
    Case("report-include-gpu-rows", "include", (*REPORT_INCLUDE, str(GPU_TABLE3)), expect="ok", setup=TOY_RUN,
         check=table3_once(1)),
    Case("report-include-twice", "include", (*REPORT_INCLUDE, str(GPU_TABLE3), "--include", str(GPU_TABLE3)),
         expect="ok", setup=TOY_RUN, check=table3_once(1), source="own: the same table given twice doubled its rows"),
    Case("report-include-own-earlier-report", "include", (*REPORT_INCLUDE, f"{WS}/first/table3.csv"), expect="ok",
         setup=_report_of_these_runs, check=table3_once(1),
         source="own: an earlier report of the same runs included doubled their rows"),
    Case("report-include-without-few-step-runs", "include", (*REPORT_INCLUDE, str(GPU_TABLE3)), expect="ok",
         setup=copy_fixture("tiny_runs", "runs"), check=table3_once(0)),
    Case("report-include-folder", "include", (*REPORT_INCLUDE, str(GPU_TABLE3.parent)), setup=TOY_RUN,
         fragments=("report", "is a folder")),
    Case("report-include-not-table3", "include", (*REPORT_INCLUDE, str(GPU_TABLE3.with_name("runs.csv"))),
         setup=TOY_RUN, fragments=("runs.csv", "not a table3.csv")),
    Case("report-include-missing", "include", (*REPORT_INCLUDE, f"{WS}/nope/table3.csv"), setup=TOY_RUN,
         fragments=("nope/table3.csv", "does not exist")),
    Case("methods-json-backend", "backend", ("methods", "--json"), expect="ok", check=backend_described),
    Case("radial-cuda-only-backend-on-cpu", "backend", toy("--method", "radial", "--param", "backend=flashinfer-bsr"),
         fragments=("flashinfer-bsr", "runs on cuda, not cpu", "here use auto"),
         source="own: failed in the first sparse step, after the model was built"),
    Case("latency-cuda-only-backend-on-cpu", "backend", tiny_latency("--methods", "sdpa,xattn", "--param",
         "xattn.backend=flashinfer-bsr"), fragments=("xattn", "flashinfer-bsr", "not cpu")),
    Case("backend-nonsense", "backend", toy("--method", "radial", "--param", "backend=nonsense"),
         fragments=("nonsense", "auto", "flashinfer-bsr")),
    Case("backend-capitals", "backend", toy("--method", "svg", "--param", "backend=FLEX"),
         fragments=("FLEX", "did you mean 'flex'"), source="own: no suggestion for a name in capitals"),
]  # fmt: skip

CASES: list[Case] = [*ISSUE_B, *ISSUE_C, *ISSUE_D, *ISSUE_E, *ISSUE_F, *ISSUE_G, *TYPOS, *NUMBERS, *PATHS, *VALID,
                     *SURFACES, *HELP_CASES]  # fmt: skip
assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"
