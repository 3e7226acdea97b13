"""Training: the generic loop pieces (hooks, schedule, RNG state, codebook statistics) and the trainers."""
