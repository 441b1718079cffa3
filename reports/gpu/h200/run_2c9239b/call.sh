set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 170 python3 -m pytest -q -x tests/test_popularity_triton.py tests/test_svg2_plan.py tests/test_ranked_selection_triton.py -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
timeout 120 python3 .ref/svg2_probe6.py > $OUT/svg2_probe6.log 2>&1; echo probe rc=$?
grep -v -i warn $OUT/svg2_probe6.log | tail -62
mkdir -p $OUT/sparse13
timeout 200 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | grep -v "k-means .* configs" | tail -12
