set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/latency $OUT/vb14
timeout 200 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,svg2 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/eager.json 2> $OUT/latency/eager.log; echo latency rc=$?
python3 - <<'PY'
import json,os
d=json.load(open(os.environ['OUT']+'/latency/eager.json'))
for n,e in d['methods'].items(): print(n, round(e['forward']['median_ms'],1), e.get('speedup_vs_baseline'), e.get('attention_ms_per_layer'))
PY
timeout 250 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb14 --models wan14b --densities 0.295 --configs 64x64x4x3r,64x64x4x3t,64x64x4x3rt40 --full-blocks 0 > $OUT/vb14.log 2>&1; echo vb rc=$?
grep -v -i warn $OUT/vb14.log | tail -5
