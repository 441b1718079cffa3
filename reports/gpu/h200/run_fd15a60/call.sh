set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
mkdir -p $OUT/block_list
timeout 420 python3 -m harness.benchmarks.block_list_gpu --out $OUT/block_list --repeats 10 > $OUT/block_list.log 2>&1; echo block_list rc=$?
grep -v -i warn $OUT/block_list.log | tail -60
