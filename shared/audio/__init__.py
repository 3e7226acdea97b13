"""Audio in and out: reading and preparing sound files, log-mel and its inversion, metrics, augmentation, the dataset format."""
