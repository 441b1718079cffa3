# Session 20, call 5: the kernel edit's CUDA tests; block_list_gpu with back-to-back times.
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
timeout 150 python3 -m pytest -q tests/test_block_list_triton.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
mkdir -p $OUT/block_list
timeout 380 python3 -m harness.benchmarks.block_list_gpu --out $OUT/block_list --repeats 10 > $OUT/block_list.log 2>&1; echo block_list rc=$?
grep -E "^  |^wan" $OUT/block_list.log | tail -12
