# Session 20, call 7: svg2's k-means assignment in Gluon (the next tile's product overlapping this tile's epilogue).
set -u
export PYTHONPATH=.
nvidia-smi -L
cp .ref/gluon_assign.py $OUT/
timeout 420 python3 .ref/gluon_assign.py $OUT > $OUT/gluon_assign.log 2>&1; echo probe rc=$?
tail -40 $OUT/gluon_assign.log | cut -c1-220
