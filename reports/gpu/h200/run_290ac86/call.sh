# Session 21, call 2: triton-variable's CUDA tests; variable_blocks_gpu with each configuration's work x rate.
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
mkdir -p $OUT/vb
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_variable_blocks_triton.py > $OUT/pytest.log 2>&1; echo pytest rc=$?
tail -3 $OUT/pytest.log
timeout 380 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb --models wan1.3b,wan14b --densities 0.1,0.295,0.5 \
    --configs 64x64x4x3rt40,64x64x4x3t,64x64x4x3r > $OUT/vb/variable_blocks.log 2>&1; echo vb rc=$?
grep -v "^ *full" $OUT/vb/variable_blocks.log | cut -c1-200 | tail -45
