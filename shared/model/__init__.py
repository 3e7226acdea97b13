"""Models and their files: configs, the RVQ-VAE, k-means init, checkpoint and weights formats."""
