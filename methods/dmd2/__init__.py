"""DMD2 (Yin et al., 2024, "Improved Distribution Matching Distillation"): a few-step generator distilled from a
teacher, without the teacher's CFG at sampling time.

- :mod:`methods.dmd2.sampler`: the generator's fixed times and its step (x0 from the velocity, then re-noise).
- :mod:`methods.dmd2.generator`: the ``dmd2`` method ``bench run --method dmd2 --checkpoint DIR`` runs: the
  generator's weights, its own sampler, any softmax method in its layers.
- :mod:`methods.dmd2.losses`: the distribution matching gradient and the fake score's flow-matching loss.
- :mod:`methods.dmd2.train`: the training task on :mod:`harness.train` (``bench train --method dmd2``).

DMD2's GAN term (a classifier on the fake score's features) is left out: the generator is trained by the
distribution matching gradient alone (plus an optional regression on teacher ODE pairs).
"""
