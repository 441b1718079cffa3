set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/vb
CONFIGS=64x64x4x3r,64x64x4x3t,64x64x4x3rt24,64x64x4x3rt32,64x64x4x3rt40,64x64x4x3rt48
timeout 100 python3 -m pytest -q -x tests/test_variable_blocks_triton.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
timeout 200 python3 .ref/forward_vb.py $CONFIGS > $OUT/forward_vb.log 2>&1; echo rc=$?
grep -v -i warn $OUT/forward_vb.log | tail -4 | cut -c1-1500
timeout 200 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb --models wan1.3b --densities 0.295 --configs $CONFIGS --full-blocks 0 > $OUT/vb.log 2>&1; echo vb rc=$?
grep -v -i warn $OUT/vb.log | tail -9
