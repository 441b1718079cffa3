set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
mkdir -p $OUT/sparse13
timeout 120 python3 .ref/svg2_probe3.py 2>&1 | grep -v -i warn | tee $OUT/svg2_probe3.log; echo probe rc=$?
timeout 200 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -12
python3 - <<'PY'
import json, os
d = json.load(open(os.environ["OUT"] + "/sparse13/sparse_attention_wan1.3b.json"))
s = d["methods"]["svg2"]
for key in ("selection_in_calls_ms", "calls_back_to_back_ms", "kernels_back_to_back_ms", "selection_in_calls_share_of_dense"):
    print(key, s[key])
for o in s["selection_top_ops"]:
    print(round(o["self_ms"], 4), o["count"], o["op"][:90])
PY
