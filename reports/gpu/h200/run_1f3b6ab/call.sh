set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu --format=csv,noheader
timeout 200 python3 -m pytest -q tests/test_popularity_triton.py tests/test_svg2_plan.py tests/test_kernel_ops.py tests/test_kmeans_triton.py -k "popularity or plan or kernel_op or counting or sort or order or configuration or script or well_separated" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -3 $OUT/tests.log
timeout 100 python3 .ref/svg2_probe7.py wan1.3b > $OUT/svg2_probe7.log 2>&1; echo probe rc=$?
grep -v -i warn $OUT/svg2_probe7.log | tail -3 | cut -c1-600
