"""The model family: the kinds, the distributions and objectives, the Flax NNX networks and the one factory
that builds them from a config (`cvae_exp.models.build`)."""
