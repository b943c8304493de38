"""omnivae: structured-latent VAEs on Omniglot."""
