"""The params of Distill's three job services, checked as their workers read them.

:func:`check_job_params` runs twice: in the broker at ``submit`` (so a pipeline whose last stage
has a bad setting is refused before its first stage trains for minutes), and at the start of
each worker's job (so a job an older broker let in fails on its first attempt, with the same
message). Every failure is a :class:`~distill.shared.errors.ConfigError` (code ``config``, which
the broker treats as final) naming the service, the field and the reason.

Plain Python, no torch: the broker imports it, so it reads the settings through their torch-free
modules (``distill.shared.{audio,model,train}.settings``). What needs the job's input stays in
the workers: the RVQ-VAE's ``n_mels`` against the dataset's, the prior's ``levels`` and
``codebook_size`` against the RVQ-VAE's codes, and the dataset or RVQ-VAE a job takes from its
dependencies' results.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from distill.shared.audio.settings import MelConfig
from distill.shared.configs import is_int, is_number
from distill.shared.errors import ConfigError
from distill.shared.ids import is_sha256
from distill.shared.model.settings import PriorConfig, VQVAEConfig, choose_prior_config
from distill.shared.train.settings import PriorTrainConfig, TrainConfig

PREPROCESS = "distill.preprocess"
TRAIN_VQVAE = "distill.train.vqvae"
TRAIN_PRIOR = "distill.train.prior"

# The top-level keys each service's worker reads (its module docstring says what each holds).
KNOWN_KEYS: dict[str, frozenset[str]] = {
    PREPROCESS: frozenset({"files", "mel_config", "seed", "silence_threshold_db", "val_fraction"}),
    TRAIN_VQVAE: frozenset({"dataset", "model", "train"}),
    TRAIN_PRIOR: frozenset({"vqvae", "dataset", "prior", "train", "name"}),
}

# preprocess's trim threshold, in dBFS: 0 is full scale (no file is louder); -120 is below the
# noise floor of any recording a person would train on (a 16-bit file's is about -96)
MIN_SILENCE_THRESHOLD_DB = -120.0
MAX_SILENCE_THRESHOLD_DB = 0.0

# the prior's model name: 1..64 printable characters, no path separators (NAME.distill)
MODEL_NAME_RE = re.compile(r"[^/\\\x00-\x1f]{1,64}")


def is_model_name(name: object) -> bool:
    """A name ``train.prior`` may give its model file (``NAME.distill``)."""
    return (isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None
            and name.strip(". ") != "")  # fmt: skip


def check_job_params(service: str, params: Any) -> None:
    """Raise ConfigError when ``params`` of a job for ``service`` would fail as its worker
    reads them; services other than the three Distill job services are not checked."""
    check = _CHECKS.get(service)
    if check is None:
        return
    if not isinstance(params, dict):
        raise ConfigError(f"{service}: params must be a map, got {type(params).__name__}")
    known = KNOWN_KEYS[service]
    unknown = sorted(str(k) for k in params if k not in known)
    if unknown:
        raise ConfigError(f"{service}: params: unknown keys {unknown}; it reads {sorted(known)}")
    check(service, params)


def prior_settings(overrides: dict[str, Any]) -> PriorConfig:
    """The prior's settings ``overrides`` read over the sizes the prior stage would choose
    (``earlier_codes`` needs ``prev_codes``, which it turns on): their types and bounds. Whether
    ``levels`` and ``codebook_size`` fit the RVQ-VAE's codes is the stage's to say."""
    sized, _ = choose_prior_config(1, 2, 0)
    return PriorConfig.from_dict({**sized.to_dict(), **overrides})


# --- per service ---------------------------------------------------------------------------


def _preprocess(service: str, params: dict[str, Any]) -> None:
    files = params.get("files")
    if not isinstance(files, list) or not files:
        raise ConfigError(f"{service}: params.files must be a non-empty list of "
                          f"{{name, sha256}}, got {_shown(files)}")  # fmt: skip
    for k, f in enumerate(files):
        name = f.get("name") if isinstance(f, dict) else None
        sha = f.get("sha256") if isinstance(f, dict) else None
        if not isinstance(name, str) or not is_sha256(sha):
            raise ConfigError(f"{service}: params.files[{k}] must be {{name: str, sha256: hex}}, "
                              f"got {_shown(f)}")  # fmt: skip
    _settings(service, params, "mel_config", MelConfig.from_dict, "MelConfig")
    if "seed" in params:
        seed = params["seed"]
        if not is_int(seed) or seed < 0:
            raise ConfigError(f"{service}: params.seed must be a non-negative integer, got "
                              f"{_shown(seed)}")  # fmt: skip
    if "val_fraction" in params:
        value = params["val_fraction"]
        if not is_number(value) or not 0.0 < float(value) < 1.0:
            raise ConfigError(f"{service}: params.val_fraction must be a number in (0, 1) (the "
                              "share of files held out for validation), got "
                              f"{_shown(value)}")  # fmt: skip
    if "silence_threshold_db" in params:
        value = params["silence_threshold_db"]
        low, high = MIN_SILENCE_THRESHOLD_DB, MAX_SILENCE_THRESHOLD_DB
        if not is_number(value) or not low <= float(value) <= high:
            raise ConfigError(f"{service}: params.silence_threshold_db must be a finite number "
                              f"in [{low:g}, {high:g}] dBFS, got {_shown(value)}")  # fmt: skip


def _train_vqvae(service: str, params: dict[str, Any]) -> None:
    if "dataset" in params:  # else the job takes it from its preprocess dependency
        _artifact(service, params, "dataset", "a dataset artifact id")
    _settings(service, params, "model", VQVAEConfig.from_dict, "VQVAEConfig")
    _settings(service, params, "train", TrainConfig.from_dict, "TrainConfig")


def _train_prior(service: str, params: dict[str, Any]) -> None:
    for key, what in (("vqvae", "an RVQ-VAE weights artifact id"),
                      ("dataset", "a dataset artifact id")):  # fmt: skip
        if params.get(key) is not None:  # absent or None: from the dependencies' results
            _artifact(service, params, key, what)
    if "name" in params and not is_model_name(params["name"]):
        raise ConfigError(f"{service}: params.name must be 1..64 printable characters without "
                          f"'/', got {_shown(params['name'])}")  # fmt: skip
    _settings(service, params, "prior", prior_settings, "PriorConfig")
    _settings(service, params, "train", PriorTrainConfig.from_dict, "PriorTrainConfig")


_CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {
    PREPROCESS: _preprocess,
    TRAIN_VQVAE: _train_vqvae,
    TRAIN_PRIOR: _train_prior,
}


def _settings(service: str, params: dict[str, Any], key: str,
              read: Callable[[dict[str, Any]], object], kind: str) -> None:  # fmt: skip
    """``params[key]``, when given, read as its worker reads it: absent or None is the
    defaults, a map goes through the config's ``from_dict``."""
    value = params.get(key)
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{service}: params.{key} must be a map of {kind} settings, got "
                          f"{_shown(value)}")  # fmt: skip
    try:
        read(value)
    except ConfigError as e:
        raise ConfigError(f"{service}: params.{key}: {e}") from None


def _artifact(service: str, params: dict[str, Any], key: str, what: str) -> None:
    if not is_sha256(params[key]):
        raise ConfigError(f"{service}: params.{key} must be {what} (sha256 hex), got "
                          f"{_shown(params[key])}")  # fmt: skip


def _shown(value: object) -> str:
    """A value for a message: its repr, cut short (params may be large)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
