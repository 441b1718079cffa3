set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=.:/tmp/site
nvidia-smi -L
mkdir -p $OUT/sparse
timeout 480 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse --models wan1.3b,wan14b --methods radial,xattn > $OUT/sparse.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse.log | grep -i "chosen\|attention call\|forward\|model \| wan\|Total" | tail -30
