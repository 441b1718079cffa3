# Session 20, call 9: hedgehog's state pass with both feature halves in one program (probe).
set -u
export PYTHONPATH=.
nvidia-smi -L
cp .ref/gram_pairs_probe.py $OUT/
timeout 300 python3 .ref/gram_pairs_probe.py $OUT > $OUT/gram_pairs.log 2>&1; echo probe rc=$?
tail -20 $OUT/gram_pairs.log | cut -c1-220
