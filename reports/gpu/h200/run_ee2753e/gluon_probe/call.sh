# Session 20, call 6: the Gluon block-list kernel (FlashAttention-3's intra-warpgroup overlap) against triton-blocks.
set -u
export PYTHONPATH=.
nvidia-smi -L
cp .ref/gluon_blocks.py .ref/gluon_probe.py $OUT/
timeout 420 python3 .ref/gluon_probe.py $OUT > $OUT/gluon_probe.log 2>&1; echo probe rc=$?
tail -45 $OUT/gluon_probe.log
