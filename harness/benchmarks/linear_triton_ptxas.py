"""The fused linear attention's kernels compiled for sm_90 without a GPU: ptxas's registers and spills, shared
memory, and the instructions that matter in the SASS, per kernel, feature map and autotune configuration.

Reads no device: Triton compiles each variant for a Hopper target at head dim 128 (bf16 operands, fp32 weight and
state), ptxas assembles it and cuobjdump disassembles it, both from Triton's own package. What to look for: spills
(``LDL``/``STL``: local memory, usually in the token loop), ``HGMMA`` (wgmma, Hopper's matrix path; ``HMMA`` is the
older mma.sync), ``BAR.SYNC`` (barriers, mostly layout conversions through shared memory), and shared memory above
about 113 KB (one program per SM). Needs Triton with its CUDA backend (not a GPU); a few seconds per variant.

    PYTHONPATH=.:<triton site> python -m harness.benchmarks.linear_triton_ptxas [gram output query value key ...]
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

from methods.kernels import linear_attention_triton as fused

BF16, F32 = "*bf16", "*fp32"
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SASS_COUNTS = ("LDL", "STL", "HGMMA", "HMMA", "MUFU.EX2", "BAR.SYNC")
MAPS = {"hedgehog": (0, True, 2), "relu": (1, False, 1), "elu": (2, False, 1)}  # KIND, HAS_W, halves


def variants(kernels: list[str], head_dim: int) -> list[tuple[str, Any, dict[str, str], dict[str, Any], tuple]]:
    """``(label, kernel, pointer types, constexprs, configs)`` of each requested kernel and map."""
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    output_types = {"q_ptr": BF16, "w_ptr": F32, "st_ptr": F32, "o_ptr": BF16, "den_ptr": F32, "eps": "fp32"}
    rows = []
    for name, (kind, has_w, halves) in MAPS.items():
        base = {"D": head_dim, "KIND": kind, "HAS_W": has_w, "BLOCK_D": block_d}
        table = {
            "gram": (fused._gram_partials, {"x_ptr": BF16, "y_ptr": BF16, "w_ptr": F32, "part_ptr": F32}, base,
                     fused.REDUCE_CONFIGS),
            "output": (fused._output, output_types, base | {"NH": halves, "NORMALISE": True}, fused.OUTPUT_CONFIGS),
            "value": (fused._output, output_types, base | {"NH": halves, "NORMALISE": False}, fused.OUTPUT_CONFIGS),
            "query": (fused._query_grads, {"q_ptr": BF16, "do_ptr": BF16, "o_ptr": BF16, "den_ptr": F32, "w_ptr": F32,
                                           "st_ptr": F32, "dp_ptr": BF16, "part_ptr": F32}, base, fused.QUERY_CONFIGS),
            "key": (fused._key_grads, {"k_ptr": BF16, "v_ptr": BF16, "w_ptr": F32, "ds_ptr": F32, "dp_ptr": BF16},
                    base, fused.KEY_CONFIGS),
        }  # fmt: skip
        rows += [(f"{kernel} {name}", *table[kernel]) for kernel in kernels if kernel in table]
    if "project" in kernels:
        types = {"dp_ptr": BF16, "x_ptr": BF16, "w_ptr": F32, "dx_ptr": BF16, "part_ptr": F32}
        for halves, has_w in ((2, True), (1, True), (2, False)):
            constants = {"D": head_dim, "NH": halves, "HAS_W": has_w, "WANT_DW": has_w, "BLOCK_D": block_d}
            label = f"project NH={halves}{' + W' if has_w else ''}"
            rows.append((label, fused._project_grads, types, constants, fused.PROJECT_CONFIGS))
    if "sum" in kernels:
        rows.append(("sum", fused._sum_groups, {"src_ptr": F32, "dst_ptr": F32}, {"BLOCK": fused.SUM_BLOCK},
                     ((None, 4, 3),)))  # fmt: skip
    return rows


def compile_report(kernel: Any, types: dict[str, str], constants: dict[str, Any], block: int | None, warps: int,
                   stages: int) -> str:  # fmt: skip
    """One variant's shared memory, ptxas's register and spill lines, and the SASS instruction counts."""
    function = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    constants = constants | ({"BLOCK_N": block} if block is not None else {})
    signature, attributes = {}, {}
    for index, name in enumerate(function.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = types.get(name, "i32")
        if signature[name].startswith("*") or name.startswith("s") or name == "CHUNK":  # as Triton specialises them
            attributes[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(function, signature, constants, attributes)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                                  "num_stages": stages})  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        ptx, cubin = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
        ptx.write_text(compiled.asm["ptx"])
        assembled = subprocess.run([str(TOOLS / "ptxas"), "-arch=sm_90a", "-v", str(ptx), "-o", str(cubin)],
                                   capture_output=True, text=True, check=True)  # fmt: skip
        sass = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    usage = [line.split(":", 1)[-1].strip() for line in assembled.stderr.splitlines()
             if "registers" in line or "spill" in line]  # fmt: skip
    counts = " ".join(f"{op}={sass.count(op)}" for op in SASS_COUNTS)
    return f"smem {compiled.metadata.shared / 1024:.0f} KB | {' | '.join(usage)} | {counts}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernels", nargs="*", default=["gram", "output", "query", "value", "key", "project", "sum"],
                        help="kernels to compile: gram output query value (the key pass's dv: the output kernel "
                             "without its normaliser) key project sum (default: all)")  # fmt: skip
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension D (default 128)")
    args = parser.parse_args(argv)
    for label, kernel, types, constants, configs in variants(args.kernels, args.head_dim):
        for block, warps, stages in configs:
            config = f"({block}, {warps}, {stages})" if block is not None else f"({warps} warps)"
            try:
                report = compile_report(kernel, types, constants, block, warps, stages)
            except Exception as exc:  # one variant's failure is reported, the others still compile
                report = f"FAILED {type(exc).__name__}: {str(exc)[:300]}"
            print(f"{label:22} {config:12} {report}", flush=True)


if __name__ == "__main__":
    main()
