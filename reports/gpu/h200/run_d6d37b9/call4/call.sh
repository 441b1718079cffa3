set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency
timeout 200 python3 -m harness.benchmarks.scaling_gpu --out $OUT/scaling > $OUT/scaling.log 2>&1; echo scaling rc=$?
grep -v -i warn $OUT/scaling.log | tail -12
timeout 290 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,radial --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/compiled_radial.json 2> $OUT/latency/compiled_radial.log; echo compile rc=$?
grep -v -i "warn\|originates\|auto_backend\|^ *$\|File " $OUT/latency/compiled_radial.log | tail -6
