"""Masked diffusion (MDLM) on the backbone: the noise schedule, SUBS and the ELBO loss."""
