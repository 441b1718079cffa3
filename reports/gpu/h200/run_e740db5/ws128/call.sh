# Session 21, call 3: triton-variable's whole-tile loop at 128 rows under warp specialisation (probe).
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
mkdir -p $OUT/ws128
cp .ref/ws128/*.py $OUT/ws128/
timeout 540 python3 .ref/ws128/ws128_probe.py $OUT/ws128 > $OUT/ws128/ws128.log 2>&1; echo probe rc=$?
cut -c1-260 $OUT/ws128/ws128.log | tail -30
