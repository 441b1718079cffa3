set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 100 python3 -m pytest -q -x tests/test_ranked_selection_triton.py tests/test_svg2_plan.py -k "svg2 or cost or long or plan" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
timeout 150 python3 .ref/svg2_probe7.py wan1.3b wan14b > $OUT/svg2_probe7.log 2>&1; echo probe rc=$?
grep -v -i warn $OUT/svg2_probe7.log | grep -v "^ *0\.00" | tail -40
mkdir -p $OUT/sparse13
timeout 230 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -14
