"""``distill.train.prior``: a trained RVQ-VAE and its dataset in, a ``.distill`` model out.

Job params (every key optional)::

    {"vqvae": sha256,      # the RVQ-VAE weights artifact (kind "vqvae"); absent: the "model" of
                           # the one dependency whose result has one (a distill.train.vqvae job)
     "dataset": sha256,    # the dataset artifact; absent: the "dataset" of that same dependency
                           # (or of the one dependency that has a "dataset")
     "prior": {...},       # PriorConfig overrides; "levels" and "codebook_size" come from the
                           # RVQ-VAE (giving other values is an error); the rest default to
                           # choose_prior_config's size for the number of training code steps
     "train": {...},       # PriorTrainConfig overrides (distill.shared.train.prior); "minutes"
                           # absent: the device's default budget (see DEFAULT_MINUTES), 0: no
                           # budget, epochs only
     "name": str}          # the model's name (1..64 printable characters, no "/"); default
                           # "model"; the artifact is named NAME.distill

Result::

    {"model": sha256,      # the .distill file (artifact kind "model", name NAME.distill)
     "model_id": str,      # the file's header checksum: the id exported audio refers to
     "name": str,
     "vqvae": sha256, "dataset": sha256,
     "codes": sha256,      # the cached code sequences (artifact kind "codes"), reused by retries
     "encoding": {"cached": bool, "seconds": float, "files": int, "code_steps": int},
     "epochs": int, "best_epoch": int, "best_val_bits": float,
     "stopped": "epochs" | "budget" | "early_stopping",
     "metrics": {...},     # the last epoch's row (below)
     "baselines": {"unigram_bits": float, "bigram_bits": float, "val_codes": int,
                   "validated_on": "val" | "train"},
     "chosen": {"prior": PriorConfig dict, "why": str, "overridden": [keys]},
     "budget": {"minutes": float, "source": "params" | "default", "why": str,
                "planned_epochs": int, "steps": int, "spent_s": float, "stopped": str},
     "train_config": PriorTrainConfig dict}

Per epoch the job publishes a metrics row and a progress event with ``epoch``, ``epochs`` (the
planned last epoch), ``train_bits`` and ``val_bits`` (NLL in bits per code), ``unigram_bits``
and ``bigram_bits`` (the baselines on the same validation codes), ``best_val``, ``best_epoch``,
``lr``, ``epoch_s``, ``eta_s``; a ``checkpoint`` event per stored checkpoint (paced by
``checkpoint_every_s``). A retried job resumes from its last checkpoint.
"""

from __future__ import annotations

SERVICE = "distill.train.prior"
