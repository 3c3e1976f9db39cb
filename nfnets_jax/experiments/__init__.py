"""Small-scale experiments built on the project's own trainer.

agc_sweep: the paper's AGC finding (Brock et al. 2021, section 4, Figure 2) at small
  scale: batch size x learning rate x clipping threshold, with and without AGC.
"""
