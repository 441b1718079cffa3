"""A newcomer's catalogue: the ``bench`` CLI tried with bad input and failure situations, one verdict per case.

Each case (:mod:`harness.benchmarks.newcomer_cases`: every case of issue 19's kinds B-G with a CLI form, and
typos, bad numbers, odd paths, corrupt files, interrupted runs, ``--json``, ``--help``) runs
``[sys.executable, "-m", "harness.cli", ...]`` as a subprocess from the repository root, in its own temporary
folder (runs, caches, evaluator cache, Hugging Face home), with ``OMP_NUM_THREADS=1`` and a timeout, and gets
one verdict:

- ``OK``: a bad input exits 2 with a message on stderr naming the problem (the expected fragments present, no
  traceback, nothing written, no model built); a valid input exits 0 and its behaviour checks out.
- ``TRACEBACK``: a Python traceback in the output, whatever the exit code.
- ``LATE``: the error came only after expensive work. Structural: a model was built (a ``sitecustomize`` probe on
  ``PYTHONPATH`` marks every model build, :mod:`harness.benchmarks.newcomer_probe`), or the command left files in
  its folder; secondary: more than :data:`PREFLIGHT_CPU_SECONDS` of CPU time, or the timeout.
- ``SILENT``: a bad input accepted (exit 0), or a wrong result written (the case's check names what is wrong).
- ``WRONG-MESSAGE``: the message lacks the expected fragments, contains one that points the wrong way, or a
  valid input is refused; also a refusal with an exit code other than 2.
- ``ERROR``: the catalogue itself could not prepare the case (a fixture run failed).

A rich table, a one-line summary, and strict JSON results (cases, verdicts, messages, timings, git commit)::

    python -m harness.benchmarks.newcomer_catalogue --out reports/newcomer/results.json
    python -m harness.benchmarks.newcomer_catalogue --out /tmp/c.json --only run-typo-method help-run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PROBE_DIR = Path(__file__).resolve().with_name("newcomer_probe")
SHARED_PROMPTS = REPO.parent / "shared" / "data" / "vbench"
PROBE_FILE = ".models-built"  # in the case's folder; not an artifact of the command
VERDICTS = ("OK", "TRACEBACK", "LATE", "SILENT", "WRONG-MESSAGE", "ERROR")
TRACEBACK_MARK = "Traceback (most recent call last)"
#: CPU seconds a refusal may take (interpreter, torch import, preflight): above it the error came late.
PREFLIGHT_CPU_SECONDS = 10.0
WS = "{ws}"  # stands for the case's folder in arguments; "$WS" in the results
HARNESS_NOTES = ("note:", "warning:", "skipped")  # the CLI's own lines that may precede an error


@dataclass
class Invocation:
    """One finished (or timed-out) CLI subprocess."""

    args: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    cpu_seconds: float
    timed_out: bool

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class SetupError(Exception):
    """The catalogue could not prepare a case (a fixture or setup command failed)."""


def _environment(workspace: Path, columns: int) -> dict[str, str]:
    """A newcomer's environment, isolated in ``workspace``: caches empty, offline, one thread, the probe on."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        COLUMNS=str(columns),
        NO_COLOR="1",
        TERM="dumb",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONPATH=os.pathsep.join(p for p in (str(PROBE_DIR), env.get("PYTHONPATH", "")) if p),
        NEWCOMER_PROBE_FILE=str(workspace / PROBE_FILE),
        ATTENTION_BENCH_CACHE=str(workspace / ".cache" / "attention-bench"),
        BENCH_VBENCH_CACHE=str(workspace / ".cache" / "vbench"),
        HF_HOME=str(workspace / ".cache" / "huggingface"),
        HF_HUB_OFFLINE="1",
    )
    if SHARED_PROMPTS.is_dir():  # where a checkout keeps the VBench prompt lists (the CLI's own hint)
        env.setdefault("BENCH_VBENCH_PROMPTS", str(SHARED_PROMPTS))
    return env


def bench(
    args: Sequence[str],
    workspace: Path,
    timeout: float = 120.0,
    columns: int = 200,
    file_size_limit: int | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Invocation:
    """Run ``bench ARGS`` (``{ws}`` replaced by ``workspace``) from the repository root and wait for it.

    ``file_size_limit``: bytes any file the command writes may reach (``prlimit --fsize``: a full disk's stand-in).
    ``on_start``: called with the process right after it starts (e.g. to kill it mid-run); the call still waits.
    It must not reap the process (``proc.poll()``): :func:`running` tells whether it still runs.
    CPU time is the child's own (``wait4``), so a loaded machine does not make a refusal look late.
    """
    concrete = [_expand(arg.replace(WS, str(workspace))) for arg in args]
    command = [sys.executable, "-m", "harness.cli", *concrete]
    if file_size_limit is not None:
        command = ["prlimit", f"--fsize={file_size_limit}", "--", *command]
    timed_out = threading.Event()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=_environment(workspace, columns), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)  # fmt: skip

        def stop() -> None:
            timed_out.set()
            _kill_group(proc.pid)

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            if on_start is not None:
                on_start(proc)
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = (stream.read().decode("utf-8", "replace") for stream in (out, err))
    return Invocation(concrete, proc.returncode, stdout, stderr, seconds, usage.ru_utime + usage.ru_stime,
                      timed_out.is_set())  # fmt: skip


def running(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited yet, without reaping it (so that :func:`bench` still gets its CPU time)."""
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def _expand(arg: str) -> str:
    """A path pattern (``{ws}/runs/toy__sdpa__*.json``: a run id is a hash) as the one path it matches."""
    if "*" not in arg or not arg.startswith("/"):
        return arg
    matches = sorted(Path("/").glob(arg.lstrip("/")))
    return str(matches[0]) if len(matches) == 1 else arg


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# -- fixtures and workspaces ---------------------------------------------------------------------


class Fixtures:
    """Shared inputs (finished runs, a latency result), each built once, on first use, under a common folder."""

    def __init__(self, root: Path, builders: dict[str, Callable[[Path], None]]) -> None:
        self.root, self.builders = root, builders
        self._locks = {name: threading.Lock() for name in builders}
        self._done: dict[str, Path | SetupError] = {}

    def get(self, name: str) -> Path:
        with self._locks[name]:
            if name not in self._done:
                folder = self.root / name
                folder.mkdir(parents=True)
                try:
                    self.builders[name](folder)
                    self._done[name] = folder
                except SetupError as exc:
                    self._done[name] = exc
        done = self._done[name]
        if isinstance(done, SetupError):
            raise SetupError(f"fixture {name}: {done}")
        return done


@dataclass
class Workspace:
    """A case's own folder (``{ws}`` in its arguments) with access to the shared fixtures; ``cleanups`` run after
    the case whatever happened (e.g. unmounting a small file system)."""

    path: Path
    fixtures: Fixtures
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def copy_fixture(self, name: str, to: str) -> Path:
        """A copy of fixture ``name`` at ``{ws}/to`` (cases change their copy, never the fixture)."""
        target = self.path / to
        shutil.copytree(self.fixtures.get(name), target)
        return target

    def fixture(self, name: str) -> Path:
        """The shared fixture itself (read-only: for inputs the case only reads)."""
        return self.fixtures.get(name)

    def bench_ok(self, *args: str, timeout: float = 180.0) -> Invocation:
        """A setup command that must succeed."""
        return require_ok(bench(args, self.path, timeout))


def require_ok(result: Invocation) -> Invocation:
    if result.returncode != 0:
        raise SetupError(f"`bench {' '.join(result.args)}` exited {result.returncode}: {first_line(result)}")
    return result


# -- cases and verdicts --------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One thing a newcomer tries.

    Attributes:
        name: unique, kebab-case.
        kind: the issue 19 kind it belongs to (``B`` ... ``G``) or the area of an own case (``help``, ``typo``...).
        args: ``bench`` arguments; ``{ws}`` stands for the case's folder.
        expect: ``"error"`` (a refusal before any work) or ``"ok"`` (success, then ``check``).
        fragments: an error's message must contain each (case-insensitive, whitespace-normalised).
        forbidden: the output must contain none of these (a message pointing the wrong way).
        setup: prepares the case's folder (fixtures copied, files damaged, a run killed) before the command.
        during: called with the command's process as soon as it starts (e.g. to fill the disk once a model is
            built); the command is waited for after it returns.
        check: for ``ok`` cases, returns what is wrong with the result (None: right); verdict ``check_verdict``.
        source: where the case comes from (``issue 19 B: ...`` or ``own``).
        timeout: seconds before the command is killed.
        mid_run: the refusal comes mid-work by nature (a full disk): a built model and files left are not LATE.
        file_size_limit: see :func:`bench`.
        columns: the terminal width the command sees.
        heavy: started first (the long pole of the parallel run).
    """

    name: str
    kind: str
    args: tuple[str, ...]
    expect: str = "error"
    fragments: tuple[str, ...] = ()
    forbidden: tuple[str, ...] = ()
    setup: Callable[[Workspace], None] | None = None
    during: Callable[[Workspace, subprocess.Popen[bytes]], None] | None = None
    check: Callable[[Invocation, Workspace], str | None] | None = None
    check_verdict: str = "SILENT"
    source: str = "own"
    timeout: float = 120.0
    mid_run: bool = False
    file_size_limit: int | None = None
    columns: int = 200
    heavy: bool = False


@dataclass
class Outcome:
    """A case's verdict with what it rests on."""

    case: Case
    verdict: str
    reason: str
    message: str = ""
    returncode: int | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    new_paths: list[str] = field(default_factory=list)
    models_built: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        case = self.case
        return {
            "name": case.name,
            "kind": case.kind,
            "source": case.source,
            "expect": case.expect,
            "command": "bench " + " ".join(_shell_word(a.replace(WS, "$WS")) for a in case.args),
            "verdict": self.verdict,
            "reason": self.reason,
            "message": self.message,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 2),
            "cpu_seconds": round(self.cpu_seconds, 2),
            "new_paths": self.new_paths[:10],
            "models_built": self.models_built,
        }


def _shell_word(word: str) -> str:
    return word if re.fullmatch(r"[\w@%+=:,./$\[\]-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def normalise(text: str) -> str:
    """Rich's wrapping and click's boxes collapsed, so fragments match across line breaks."""
    return " ".join(text.replace("│", " ").split()).lower()


def first_line(result: Invocation) -> str:
    """The line a user reads first: a traceback's exception, an ``error:`` line, click's error, else the first."""
    lines = [line.strip(" │╭╮╰╯─") for line in result.stderr.splitlines()]
    lines = [line for line in lines if line]
    if TRACEBACK_MARK in result.output:
        tail = [line for line in result.output.splitlines() if line.strip() and not line.startswith(" ")]
        return tail[-1].strip() if tail else TRACEBACK_MARK
    for line in lines:
        if line.lower().startswith("error:") or line.startswith(("No such", "Invalid value", "Missing", "Got unexp")):
            return line
    if lines:
        return lines[0]
    out = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return out[0] if out else ""


def judge(case: Case, result: Invocation, ws: Workspace, new_paths: list[str], built: list[str]) -> Outcome:
    """The case's verdict from the command's result, the paths it left and the models it built."""
    outcome = _verdict(case, result, ws, new_paths, built)
    outcome.reason = outcome.reason.replace(str(ws.path), "$WS")
    return outcome


def _verdict(case: Case, result: Invocation, ws: Workspace, new_paths: list[str], built: list[str]) -> Outcome:
    base = dict(message=first_line(result).replace(str(ws.path), "$WS")[:300], returncode=result.returncode,
                seconds=result.seconds, cpu_seconds=result.cpu_seconds, new_paths=new_paths,
                models_built=built)  # fmt: skip
    text = normalise(result.output)
    if TRACEBACK_MARK in result.output:
        return Outcome(case, "TRACEBACK", "a traceback in the output", **base)
    if result.timed_out:
        return Outcome(case, "LATE", f"still running after {case.timeout:.0f} s (killed)", **base)
    wrong_way = [f for f in case.forbidden if f.lower() in text]
    if case.expect == "ok":
        if result.returncode != 0:
            return Outcome(case, "WRONG-MESSAGE", f"valid input refused (exit {result.returncode})", **base)
        if wrong_way:
            return Outcome(case, "WRONG-MESSAGE", f"the output says {wrong_way[0]!r}", **base)
        problem = case.check(result, ws) if case.check else None
        if problem:
            return Outcome(case, case.check_verdict, problem, **base)
        return Outcome(case, "OK", "worked as expected", **base)
    if result.returncode == 0:
        return Outcome(case, "SILENT", "bad input accepted (exit 0)", **base)
    if built and not case.mid_run:
        return Outcome(case, "LATE", f"error after a model was built ({built[0]})", **base)
    if new_paths and not case.mid_run:
        return Outcome(case, "LATE", f"error after writing {len(new_paths)} path(s), e.g. {new_paths[0]}", **base)
    if result.cpu_seconds > PREFLIGHT_CPU_SECONDS:
        return Outcome(case, "LATE", f"error after {result.cpu_seconds:.1f} CPU seconds", **base)
    problem = case.check(result, ws) if case.check else None
    if problem:
        return Outcome(case, case.check_verdict, problem, **base)
    if result.returncode != 2:
        return Outcome(case, "WRONG-MESSAGE", f"exit code {result.returncode}, not 2", **base)
    if not result.stderr.strip():
        return Outcome(case, "WRONG-MESSAGE", "no message on stderr", **base)
    missing = [f for f in case.fragments if normalise(f) not in text]
    if missing:
        return Outcome(case, "WRONG-MESSAGE", f"the message lacks {missing[0]!r}", **base)
    if wrong_way:
        return Outcome(case, "WRONG-MESSAGE", f"the message says {wrong_way[0]!r}", **base)
    noise = _noise(result.stderr)
    if noise:
        return Outcome(case, "WRONG-MESSAGE", f"the error follows {len(noise)} line(s) of other output, e.g. "
                       f"{noise[0][:80]!r}", **base)  # fmt: skip
    done = "no wrong file left" if case.mid_run else "before any work"
    return Outcome(case, "OK", f"refused with a clear message, {done}", **base)


def _noise(stderr: str) -> list[str]:
    """Lines on stderr before the ``error:`` line that are not the harness's own notes (library warnings...)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    index = next((i for i, line in enumerate(lines) if line.lower().startswith("error:")), 0)
    return [line for line in lines[:index] if not line.lower().startswith(HARNESS_NOTES)]


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != PROBE_FILE}


def model_built(ws: Workspace) -> bool:
    """Whether the case's command has built a model yet (the probe's mark)."""
    return (ws.path / PROBE_FILE).exists()


def _left_behind(folder: Path, before: set[str], args: Sequence[str]) -> list[str]:
    """Paths the command created, less the empty output folders it was told to use (checking that an output
    folder is writable may create it; a run folder inside it, or any file, is work done)."""
    named = {Path(arg.replace(WS, str(folder))) for arg in args if arg.startswith(WS)}
    allowed = {str(p.relative_to(folder)) for path in named for p in (path, *path.parents) if p.is_relative_to(folder)}
    new = sorted(_snapshot(folder) - before)
    return [p for p in new if not (p in allowed and (folder / p).is_dir() and not any((folder / p).iterdir()))]


def run_case(case: Case, root: Path, fixtures: Fixtures) -> Outcome:
    """Prepare the case's folder, run its command, judge the result."""
    ws = Workspace(root / case.name, fixtures)
    ws.path.mkdir(parents=True)
    try:
        return _prepared_and_judged(case, ws)
    finally:
        for cleanup in reversed(ws.cleanups):
            cleanup()


def _prepared_and_judged(case: Case, ws: Workspace) -> Outcome:
    try:
        if case.setup is not None:
            case.setup(ws)
    except Exception as exc:  # whatever stops the preparation is the catalogue's fault, not the command's
        return Outcome(case, "ERROR", f"setup failed: {type(exc).__name__}: {exc}")
    (ws.path / PROBE_FILE).unlink(missing_ok=True)  # what setup built is not the command's
    before = _snapshot(ws.path)
    during = case.during
    result = bench(case.args, ws.path, case.timeout, case.columns, case.file_size_limit,
                   on_start=None if during is None else lambda proc: during(ws, proc))  # fmt: skip
    probe = ws.path / PROBE_FILE
    built = sorted(set(probe.read_text().split("\n")) - {""}) if probe.exists() else []
    new_paths = _left_behind(ws.path, before, case.args)
    try:
        return judge(case, result, ws, new_paths, built)
    except Exception as exc:  # a check that trips over an unexpected result: the catalogue's fault, say so
        return Outcome(case, "ERROR", f"the check failed: {type(exc).__name__}: {exc}", first_line(result),
                       result.returncode, result.seconds, result.cpu_seconds)  # fmt: skip


def run_catalogue(cases: Sequence[Case], root: Path, fixtures: Fixtures, workers: int,
                  on_done: Callable[[Outcome], None] | None = None) -> list[Outcome]:  # fmt: skip
    """Every case on ``workers`` threads (heavy ones first); outcomes in the cases' order."""
    order = sorted(range(len(cases)), key=lambda i: not cases[i].heavy)
    outcomes: dict[int, Outcome] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_case, cases[i], root, fixtures): i for i in order}
        for future in as_completed(futures):
            outcome = future.result()
            outcomes[futures[future]] = outcome
            if on_done is not None:
                on_done(outcome)
    return [outcomes[i] for i in range(len(cases))]


# -- output --------------------------------------------------------------------------------------


def summary_line(outcomes: Sequence[Outcome], seconds: float) -> str:
    counts = Counter(o.verdict for o in outcomes)
    shown = ", ".join(f"{counts[v]} {v}" for v in VERDICTS if counts[v])
    return f"{len(outcomes)} cases in {seconds:.0f} s: {shown}"


def print_table(outcomes: Sequence[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="newcomer catalogue")
    for column in ("case", "kind", "verdict", "s", "message / reason"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        style = "green" if o.verdict == "OK" else "red"
        detail = o.message if o.verdict == "OK" else f"{o.reason}: {o.message}"
        table.add_row(o.case.name, o.case.kind, f"[{style}]{o.verdict}[/]", f"{o.seconds:.1f}", detail[:160])
    Console(width=int(os.environ.get("COLUMNS", "160"))).print(table)


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def results(outcomes: Sequence[Outcome], seconds: float, workers: int) -> dict[str, Any]:
    return {
        "kind": "newcomer-catalogue",
        "git": git_commit(),
        "python": sys.version.split()[0],
        "workers": workers,
        "seconds": round(seconds, 1),
        "summary": summary_line(outcomes, seconds),
        "counts": {v: sum(o.verdict == v for o in outcomes) for v in VERDICTS},
        "cases": [o.to_dict() for o in outcomes],
    }


def select(cases: Sequence[Case], only: Sequence[str]) -> list[Case]:
    """The named cases (a name or a kind), in catalogue order; an unknown name is an error."""
    names = {c.name for c in cases} | {c.kind for c in cases}
    unknown = sorted(set(only) - names)
    if unknown:
        raise SystemExit(f"unknown case or kind {unknown}; see --list")
    return [c for c in cases if not only or c.name in only or c.kind in only]


def main(argv: Sequence[str] | None = None) -> int:
    from harness.benchmarks.newcomer_cases import CASES, FIXTURES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Write the results here (strict JSON).")
    parser.add_argument("--only", nargs="+", default=[], help="Run only these cases or kinds.")
    parser.add_argument("--workers", type=int, default=2, help="Cases run at a time.")
    parser.add_argument("--list", action="store_true", help="List the cases and exit.")
    parser.add_argument("--keep", action="store_true", help="Keep the cases' folders (printed at the end).")
    options = parser.parse_args(argv)
    cases = select(CASES, options.only)
    if options.list:
        for case in cases:
            print(f"{case.name:45} {case.kind:8} {case.expect:5} {case.source}")
        return 0
    root = Path(tempfile.mkdtemp(prefix="newcomer-"))
    start = time.perf_counter()
    try:
        outcomes = run_catalogue(cases, root / "cases", Fixtures(root / "fixtures", FIXTURES), options.workers,
                                 on_done=lambda o: print(f"{o.verdict:13} {o.case.name}", flush=True))  # fmt: skip
        seconds = time.perf_counter() - start
        print_table(outcomes)
        print(summary_line(outcomes, seconds))
        if options.out is not None:
            options.out.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps(results(outcomes, seconds, options.workers), indent=1, allow_nan=False)
            options.out.write_text(payload + "\n")
            print(f"wrote {options.out}")
    finally:
        if options.keep:
            print(f"cases' folders kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
