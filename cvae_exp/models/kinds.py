"""The model kinds, once: what each one has and how it is trained and scored.

Every place that behaves differently by `model.kind` asks this table instead of comparing strings, so
adding a kind, or changing what one has, is one line here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    latent: bool  # has z (a recognition, prior and generation network); False: the deterministic baseline
    recognition: bool  # has q(z | x, y): trained through it, importance-sampled, reconstructed
    prior_term: bool  # trains through the prior p(z | x) (the GSNN term), so it needs the learned prior
    fixed_prior: bool  # always the standard normal prior and no condition (the VAE)
    needs_condition: bool  # refuses data.condition=none (it predicts y from x); the cvae and vae accept it
    aided: bool  # can be built on a pre-trained baseline (model.baseline_run)

    @property
    def headline(self) -> str:
        """The estimator of cvae-eval's `ncll`: exact for the baseline, IS with q, MC without."""
        if not self.latent:
            return "exact"
        return "is" if self.recognition else "mc"


KINDS = {
    k.name: k
    for k in (
        Kind(
            "cvae",
            latent=True,
            recognition=True,
            prior_term=False,
            fixed_prior=False,
            needs_condition=False,
            aided=True,
        ),
        Kind(
            "vae", latent=True, recognition=True, prior_term=False, fixed_prior=True, needs_condition=False, aided=False
        ),
        Kind(
            "gsnn", latent=True, recognition=False, prior_term=True, fixed_prior=False, needs_condition=True, aided=True
        ),
        Kind(
            "hybrid",
            latent=True,
            recognition=True,
            prior_term=True,
            fixed_prior=False,
            needs_condition=True,
            aided=True,
        ),
        Kind(
            "baseline",
            latent=False,
            recognition=False,
            prior_term=False,
            fixed_prior=False,
            needs_condition=True,
            aided=False,
        ),
    )
}
NAMES = tuple(KINDS)


def kind(name: str) -> Kind:
    """The kind called `name` (validated configs only: config.validate refuses unknown names first)."""
    return KINDS[name]
