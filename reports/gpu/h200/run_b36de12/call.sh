set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit) PYTHONPATH=.
nvidia-smi -L
timeout 200 python3 -m pytest -q tests/test_kmeans_triton.py tests/test_linear_attention_triton.py tests/test_xattn_scoring_triton.py -k "autotuner or pinned or counting or sort_without" > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 150 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb13 --models wan1.3b --densities 0.295 --configs 64x64x4x3r,128x64x4x3,128x64x8x4 > $OUT/vb13.log 2>&1; echo vb rc=$?
grep -v Warn $OUT/vb13.log | grep "ideal\|dense call\|FAIL" | tail -8
