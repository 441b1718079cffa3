set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
mkdir -p $OUT/latency
timeout 330 python3 -m harness.cli latency --model wan1.3b --random-weights --compile --methods cudnn,svg2 --param svg2.fixed_density=0.295 --step 12 --warmup 1 --repeats 3 --out $OUT/latency/compiled.json > $OUT/latency/compiled.log 2>&1; echo latency rc=$?
python3 - <<'PY'
import json, os
try:
    d = json.load(open(os.environ["OUT"] + "/latency/compiled.json"))
    for n, e in d["methods"].items():
        c = e.get("compiled") or {}
        print(n, round(e["forward"]["median_ms"], 1), c.get("forward", {}).get("median_ms"), c.get("graphs"), c.get("graph_breaks"), c.get("recompiles"), c.get("error"))
except Exception as e:
    print("latency unreadable", e)
PY
grep -i -E "recompil|graph break|error" $OUT/latency/compiled.log | head -5
