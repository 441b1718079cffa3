set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
timeout 150 python3 -m pytest -q tests/test_kmeans_triton.py -k "script or configuration or failing_pair or every_pair" -p no:cacheprovider > $OUT/tests.log 2>&1; echo tests rc=$?; tail -2 $OUT/tests.log
