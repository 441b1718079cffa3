set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
timeout 300 python3 .ref/forward_vb.py > $OUT/forward_vb.log 2>&1; echo rc=$?
grep -v -i warn $OUT/forward_vb.log | tail -12
