"""Run VBench or VBench-2.0 through its Python API; executed by the evaluator venv's own interpreter.

Standalone on purpose (standard library + the evaluator only): the harness is not installed in that
venv. Usage: ``<venv>/bin/python driver.py REQUEST.json``. The request names the benchmark, the
flat video folder, the dimensions, the output folder, an explicit run name, the mode, the full-info
JSON and the device. Success is ``<out>/<name>_eval_results.json`` holding every requested
dimension; the caller checks that file, never this process's exit code alone.

Under torchrun (WORLD_SIZE > 1, one process per GPU) the evaluator's own distributed path deals the
videos of each dimension to the ranks and gathers the per-video results on rank 0.
"""

import json
import os
import sys


def main(request_path: str) -> int:
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    if request["benchmark"] == "vbench":
        from vbench import VBench as Evaluator
        from vbench.distributed import dist_init
    else:
        from vbench2 import VBench2 as Evaluator
        from vbench2.distributed import dist_init
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_init()
    full_info = os.path.join(request["out"], request["name"] + "_requested_info.json")
    if request["mode"] == "vbench_standard":
        _write_requested_info(Evaluator, request, full_info)
    else:
        _write_json(full_info, [])  # custom_input reads prompts from the file names
    evaluator = Evaluator(request["device"], full_info, request["out"])
    evaluator.evaluate(
        videos_path=request["videos"],
        name=request["name"],
        dimension_list=request["dimensions"],
        local=True,  # CLIP and DINO from the cache folders, never from the network
        mode=request["mode"],
    )
    return 0


def _write_requested_info(evaluator_class, request, path):
    """The evaluator's own metadata, restricted to the run's prompts (so only the run's videos are expected)."""
    package_dir = os.path.dirname(sys.modules[evaluator_class.__module__].__file__)
    shipped = [name for name in os.listdir(package_dir) if name.endswith("full_info.json")]
    with open(os.path.join(package_dir, shipped[0]), encoding="utf-8") as handle:
        entries = json.load(handle)
    wanted = set(request["labels"])
    kept = [e for e in entries if e["prompt_en"] in wanted and set(e["dimension"]) & set(request["dimensions"])]
    unknown = wanted - {e["prompt_en"] for e in kept}
    if unknown:
        raise SystemExit(
            f"{len(unknown)} prompt(s) are not in {shipped[0]} for these dimensions, e.g. {min(unknown)!r}"
        )
    _write_json(path, kept)


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
