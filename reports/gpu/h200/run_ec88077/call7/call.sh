set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/latency
timeout 520 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,svg2 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/compiled.json 2> $OUT/latency/compiled.log; echo latency rc=$?
grep -i "graph\|compiled\|svg2\|cudnn" $OUT/latency/compiled.log | grep -v -i warn | tail -8
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/latency/compiled.json'))
for n,e in d['methods'].items(): print(n, round(e['forward']['median_ms'],1), {k: v for k, v in e.items() if 'compile' in k})
PY
