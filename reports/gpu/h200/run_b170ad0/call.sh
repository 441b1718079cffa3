set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/dfa_sla $OUT/latency
timeout 100 python3 -m pytest -q -x tests/test_block_list_triton.py tests/test_xattn_scoring_triton.py -k "not autotuner" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
timeout 150 python3 -m harness.benchmarks.dfa_sla_gpu --out $OUT/dfa_sla --repeats 10 > $OUT/dfa_sla.log 2>&1; echo dfa_sla rc=$?
grep -v -i warn $OUT/dfa_sla.log | grep "sla:\|wan1\|wan14\|triton_blocks\|failed" | tail -8
timeout 230 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,sla --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/compiled_sla.json 2> $OUT/latency/compiled_sla.log; echo compile rc=$?
grep -v -i "warn\|originates\|auto_backend\|^ *$\|File " $OUT/latency/compiled_sla.log | tail -5
