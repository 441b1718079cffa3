set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/latency $OUT/linvideo_compile
(export CUDA_VISIBLE_DEVICES=1
 timeout 480 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,svg2 \
   --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json > $OUT/latency/compile_svg2.json 2> $OUT/latency/compile_svg2.log
 echo "compile rc=$?" >> $OUT/latency/compile_svg2.log) &
export CUDA_VISIBLE_DEVICES=0
timeout 150 python3 -m harness.cli latency --model wan1.3b --random-weights --methods cudnn,radial,xattn,svg,svg2 \
  --param xattn.fixed_density=0.344 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --json \
  > $OUT/latency/eager_sparse.json 2> $OUT/latency/eager_sparse.log; echo eager rc=$?
timeout 320 python3 -m harness.benchmarks.linvideo_gpu --out $OUT/linvideo_compile --compile --models wan1.3b --dense cudnn --train-model '' > $OUT/linvideo_compile.log 2>&1; echo linvideo rc=$?
wait
tail -2 $OUT/latency/compile_svg2.log
python3 - <<'PY'
import json,os
for name in ('eager_sparse','compile_svg2'):
    try: d=json.load(open(os.environ['OUT']+f'/latency/{name}.json'))
    except Exception as e: print(name, 'unreadable', e); continue
    for n,e in d['methods'].items():
        c=e.get('compiled') or {}
        print(name, n, round(e['forward']['median_ms'],1), round(e.get('speedup_vs_baseline') or 0,3), 'compiled', round((c.get('forward') or {}).get('median_ms') or 0,1), c.get('speedup_vs_baseline'), c.get('graphs'), c.get('graph_breaks'))
PY
grep -v Warn $OUT/linvideo_compile.log | tail -8
