# Session 21, call 1: svg2's variable blocks with straddling query tiles (probe), Wan 1.3B and 14B.
set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
export PYTHONPATH=.
nvidia-smi -L
mkdir -p $OUT/straddle
cp .ref/straddle/*.py $OUT/straddle/
timeout 540 python3 .ref/straddle/straddle_probe.py $OUT/straddle > $OUT/straddle/straddle.log 2>&1; echo probe rc=$?
cat $OUT/straddle/straddle.log | cut -c1-220 | tail -40
