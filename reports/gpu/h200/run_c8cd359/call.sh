set -u
export BENCH_GIT_COMMIT=$(cat .ref/commit)
nvidia-smi -L
mkdir -p $OUT/vb $OUT/sparse13
timeout 330 python3 -m harness.benchmarks.variable_blocks_gpu --out $OUT/vb --models wan1.3b,wan14b --densities 0.295 \
  --configs 64x64x4x3r,64x64x4x3t,64x64x4x2t,64x64x4x4t,64x32x4x3t,128x64x8x3t --full-blocks 64 > $OUT/vb.log 2>&1; echo vb rc=$?
grep -v -i warn $OUT/vb.log | tail -40
timeout 200 python3 -m harness.benchmarks.sparse_gpu --out $OUT/sparse13 --models wan1.3b --methods svg2 --svg2-densities "" > $OUT/sparse13.log 2>&1; echo sparse rc=$?
grep -v -i warn $OUT/sparse13.log | tail -25
