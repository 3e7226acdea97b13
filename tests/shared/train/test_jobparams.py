"""check_job_params: the params of the three Distill job services, checked as their workers
read them (the broker calls it at submit, each worker at the start of its job). Before it, the
broker took any params and a bad setting failed only when its stage ran: a pipeline's prior
with lr NaN after the RVQ-VAE had trained for minutes, a misspelt "trian" trained 8 minutes
with the defaults, preprocess's seed "abc" failed three attempts with a Python error and its
seed 1.7 became 1."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from distill.shared.errors import CONFIG, ConfigError, code_of
from distill.shared.train.jobparams import (
    KNOWN_KEYS,
    PREPROCESS,
    TRAIN_PRIOR,
    TRAIN_VQVAE,
    check_job_params,
)

SHA = "ab" * 32
FILES = [{"name": "kick.wav", "sha256": SHA}, {"name": "hat.wav", "sha256": "cd" * 32}]


def refused(service: str, params: Any) -> str:
    with pytest.raises(ConfigError) as e:
        check_job_params(service, params)
    assert code_of(e.value) == CONFIG  # final: the broker fails such a job after one attempt
    message = str(e.value)
    assert message.startswith(f"{service}: "), message
    return message


def prep(**extra: Any) -> dict[str, Any]:
    return {"files": FILES, **extra}


# --- what passes ----------------------------------------------------------------------------


@pytest.mark.parametrize("service, params", [
    (PREPROCESS, prep()),
    (PREPROCESS, prep(mel_config={"sample_rate": 44100, "n_mels": 64}, seed=7, val_fraction=0.2,
                      silence_threshold_db=-60.0)),
    (PREPROCESS, prep(mel_config=None, seed=2**40, val_fraction=0.5, silence_threshold_db=-60)),
    (PREPROCESS, prep(silence_threshold_db=-120.0)),
    (PREPROCESS, prep(silence_threshold_db=0)),
    (TRAIN_VQVAE, {}),  # the dataset from its preprocess dependency, every setting a default
    (TRAIN_VQVAE, {"model": {}, "train": {"epochs": 50}}),  # the README's Scripting example
    (TRAIN_VQVAE, {"dataset": SHA, "model": {"codebook_size": 64, "levels": 4, "n_mels": 64},
                   "train": {"minutes": 0.3, "lr": 1e-3, "augment": True}}),
    (TRAIN_VQVAE, {"model": None, "train": None}),
    (TRAIN_PRIOR, {}),
    (TRAIN_PRIOR, {"vqvae": SHA, "dataset": SHA, "name": "my drums", "prior": {"hidden": 64},
                   "train": {"minutes": 0.1, "peers": 2}}),
    (TRAIN_PRIOR, {"vqvae": None, "dataset": None, "prior": None, "train": None}),
    # valid over the sizes the stage chooses (it turns prev_codes on); levels and codebook_size
    # are the RVQ-VAE's to judge, when the stage has its codes
    (TRAIN_PRIOR, {"prior": {"earlier_codes": 2}}),
    (TRAIN_PRIOR, {"prior": {"codebook_size": 512, "levels": 8}}),
])  # fmt: skip
def test_params_the_workers_accept_pass(service: str, params: dict[str, Any]) -> None:
    check_job_params(service, params)


def test_other_services_are_not_checked() -> None:
    for service in ("distill.sleep", "distill.infer", "echo", "s23.nothing", ""):
        check_job_params(service, {"anything": [1, {"goes": math.nan}]})


# --- unknown top-level keys -----------------------------------------------------------------


def test_a_misspelt_top_level_key_is_refused_naming_it_and_the_known_ones() -> None:
    # "trian" trained 8 minutes with the default settings; "val_fracton" kept the default split
    message = refused(TRAIN_VQVAE, {"trian": {"epochs": 5}})
    assert "unknown keys ['trian']" in message
    assert "['dataset', 'model', 'train']" in message
    message = refused(PREPROCESS, prep(val_fracton=0.5))
    assert "unknown keys ['val_fracton']" in message
    assert "'val_fraction'" in message and "'silence_threshold_db'" in message
    message = refused(TRAIN_PRIOR, {"train": {}, "priors": {}, "epochs": 3})
    assert "unknown keys ['epochs', 'priors']" in message
    assert "['dataset', 'name', 'prior', 'train', 'vqvae']" in message


def test_every_service_lists_the_keys_its_worker_reads() -> None:
    assert {
        PREPROCESS: {"files", "mel_config", "seed", "silence_threshold_db", "val_fraction"},
        TRAIN_VQVAE: {"dataset", "model", "train"},
        TRAIN_PRIOR: {"vqvae", "dataset", "prior", "train", "name"},
    } == KNOWN_KEYS


def test_params_that_are_not_a_map_are_refused() -> None:
    for service in (PREPROCESS, TRAIN_VQVAE, TRAIN_PRIOR):
        assert "params must be a map, got list" in refused(service, [1, 2])


# --- the type of each top-level key ---------------------------------------------------------


@pytest.mark.parametrize("files, where", [
    (None, "params.files must be a non-empty list"),
    ([], "params.files must be a non-empty list"),
    ({}, "params.files must be a non-empty list"),
    ("kick.wav", "params.files must be a non-empty list"),
    ([{"name": "a", "sha256": "zz"}], "params.files[0] must be {name: str, sha256: hex}"),
    ([FILES[0], {"name": 5, "sha256": SHA}], "params.files[1] must be"),
    ([FILES[0], SHA], "params.files[1] must be"),
])  # fmt: skip
def test_preprocess_files_must_be_named_artifacts(files: Any, where: str) -> None:
    params = {"files": files} if files is not None else {}
    assert where in refused(PREPROCESS, params)


@pytest.mark.parametrize("service, key, kind", [
    (PREPROCESS, "mel_config", "MelConfig"),
    (TRAIN_VQVAE, "model", "VQVAEConfig"),
    (TRAIN_VQVAE, "train", "TrainConfig"),
    (TRAIN_PRIOR, "prior", "PriorConfig"),
    (TRAIN_PRIOR, "train", "PriorTrainConfig"),
])  # fmt: skip
@pytest.mark.parametrize("value", [5, [], "lr=1", [{"lr": 1e-3}], True])
def test_a_settings_map_of_another_type_is_refused(service: str, key: str, kind: str,
                                                   value: Any) -> None:  # fmt: skip
    params = {**(prep() if service == PREPROCESS else {}), key: value}
    message = refused(service, params)
    assert f"params.{key} must be a map of {kind} settings, got {value!r}" in message


@pytest.mark.parametrize("service, key", [
    (TRAIN_VQVAE, "dataset"), (TRAIN_PRIOR, "dataset"), (TRAIN_PRIOR, "vqvae"),
])  # fmt: skip
@pytest.mark.parametrize("value", ["zz", "AB" * 31, 5, ["ab" * 32], "j-0123456789"])
def test_artifact_ids_must_be_sha256(service: str, key: str, value: Any) -> None:
    assert f"params.{key} must be" in refused(service, {key: value})


def test_a_vqvae_dataset_given_as_none_is_refused_as_its_worker_refuses_it() -> None:
    # the RVQ-VAE worker takes the dataset from its dependency only when the key is absent
    assert "params.dataset must be a dataset artifact id" in refused(TRAIN_VQVAE, {"dataset": None})


@pytest.mark.parametrize("name", ["../x", "a/b", "", ". .", "..", "x" * 65, "tab\there", 5, None])
def test_the_prior_model_name_must_be_a_file_name(name: Any) -> None:
    assert "params.name must be 1..64 printable characters" in refused(TRAIN_PRIOR, {"name": name})


# --- the settings maps, read by their configs -----------------------------------------------


@pytest.mark.parametrize("service, params, field, reason", [
    # the audit's pipeline: its third stage failed after the RVQ-VAE had trained
    (TRAIN_PRIOR, {"train": {"minutes": 0.1, "lr": math.nan}}, "params.train",
     "PriorTrainConfig: lr must be a positive number"),
    (TRAIN_PRIOR, {"train": {"lr": "fast"}}, "params.train",
     "PriorTrainConfig: lr must be a number, got 'fast'"),
    (TRAIN_PRIOR, {"train": {"bogus_option": 1}}, "params.train",
     "PriorTrainConfig: unknown keys ['bogus_option']"),
    (TRAIN_PRIOR, {"train": {"window": 1}}, "params.train", "window must be in 2..100000"),
    (TRAIN_PRIOR, {"prior": {"hidden": -1}}, "params.prior", "PriorConfig: hidden must be in"),
    (TRAIN_PRIOR, {"prior": {"hiden": 64}}, "params.prior", "PriorConfig: unknown keys ['hiden']"),
    (TRAIN_PRIOR, {"prior": {"levels": 1.5}}, "params.prior", "levels must be an integer"),
    (TRAIN_PRIOR, {"prior": {"earlier_codes": 2, "prev_codes": False}}, "params.prior",
     "earlier_codes 2 needs prev_codes on"),
    (TRAIN_VQVAE, {"train": {"epochs": 0}}, "params.train", "TrainConfig: epochs must be >= 1"),
    (TRAIN_VQVAE, {"train": {"minutes": -1}}, "params.train", "minutes must be in"),
    (TRAIN_VQVAE, {"train": {"batch_size": 10**9}}, "params.train", "batch_size 1000000000 is over"),
    (TRAIN_VQVAE, {"train": {"grad_clip": math.nan}}, "params.train", "grad_clip must be > 0"),
    (TRAIN_VQVAE, {"model": {"levels": 1000}}, "params.model", "VQVAEConfig: levels must be in 1..16"),
    (TRAIN_VQVAE, {"model": {"n_mels": "x"}}, "params.model", "n_mels must be an integer"),
    (TRAIN_VQVAE, {"model": {"codebook_size": 0}}, "params.model", "codebook_size must be >= 2"),
    (PREPROCESS, prep(mel_config={"sample_rate": 0}), "params.mel_config",
     "mel_config.sample_rate must be a positive integer"),
    (PREPROCESS, prep(mel_config={"n_mels": 10**9}), "params.mel_config", "n_mels 1000000000 is over"),
    (PREPROCESS, prep(mel_config={"sr": 48000}), "params.mel_config", "unknown keys ['sr']"),
])  # fmt: skip
def test_a_bad_setting_is_refused_naming_its_map_and_field(service: str, params: dict[str, Any],
                                                          field: str, reason: str) -> None:  # fmt: skip
    message = refused(service, params)
    assert message.startswith(f"{service}: {field}: "), message
    assert reason in message, message


# --- preprocess's own numbers ---------------------------------------------------------------


@pytest.mark.parametrize("seed", ["abc", math.nan, None, 1.7, 1.0, True, -1, "7", [1]])
def test_preprocess_seed_must_be_a_non_negative_integer(seed: Any) -> None:
    # "abc", NaN and None failed three attempts with a Python error; 1.7 became 1
    message = refused(PREPROCESS, prep(seed=seed))
    assert f"params.seed must be a non-negative integer, got {seed!r}" in message


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, 1, 0.0, 1.0, -0.1, 1.5, "0.1", True, None])
def test_preprocess_val_fraction_must_be_a_share_in_the_open_interval(value: Any) -> None:
    message = refused(PREPROCESS, prep(val_fraction=value))
    assert "params.val_fraction must be a number in (0, 1)" in message and repr(value) in message


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "x", "-60", 100, 0.5, -121,
                                   -1e9, True, None])  # fmt: skip
def test_preprocess_silence_threshold_must_be_a_finite_dbfs_level(value: Any) -> None:
    # NaN was an IndexError in trim_silence (three attempts); 100 failed only after every
    # file was decoded ("no usable audio ... below the 100 dBFS silence threshold")
    message = refused(PREPROCESS, prep(silence_threshold_db=value))
    assert "params.silence_threshold_db must be a finite number in [-120, 0] dBFS" in message
    assert repr(value) in message


def test_a_huge_value_is_shown_cut_short() -> None:
    message = refused(PREPROCESS, {"files": "x" * 10_000})
    assert len(message) < 200 and message.endswith("...")


# --- torch-free ------------------------------------------------------------------------------


def test_the_checker_and_the_settings_modules_load_no_torch() -> None:
    """The broker imports the checker: it must not pull in torch (seconds and hundreds of MB
    for a process that only moves messages)."""
    code = ("import sys\n"
            "from distill.shared.train.jobparams import check_job_params\n"
            "import distill.shared.audio.settings, distill.shared.model.settings\n"
            "import distill.shared.train.settings\n"
            "check_job_params('distill.train.prior', {'prior': {'hidden': 64}, 'train': {}})\n"
            "print(sorted(m for m in ('torch', 'torchaudio', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_configs_are_the_same_classes_under_their_old_names() -> None:
    """Moved into the torch-free settings modules, imported from the old ones as before; a
    model file, checkpoint or recipe reads the same."""
    from distill.shared.audio import mel
    from distill.shared.audio import settings as audio_settings
    from distill.shared.model import prior, vqvae
    from distill.shared.model import settings as model_settings
    from distill.shared.train import loop
    from distill.shared.train import prior as prior_training
    from distill.shared.train import settings as train_settings
    from distill.shared.train import vqvae as vqvae_training

    assert mel.MelConfig is audio_settings.MelConfig
    assert mel.MAX_N_MELS == audio_settings.MAX_N_MELS == 512
    assert vqvae.VQVAEConfig is model_settings.VQVAEConfig
    assert prior.PriorConfig is model_settings.PriorConfig
    assert prior.choose_prior_config is model_settings.choose_prior_config
    assert loop.LoopConfig is train_settings.LoopConfig
    assert vqvae_training.TrainConfig is train_settings.TrainConfig
    assert prior_training.PriorTrainConfig is train_settings.PriorTrainConfig
    assert prior_training.LABEL_SMOOTHING == 0.1 and loop.MAX_EPOCHS == 100_000
    for cls in (mel.MelConfig, vqvae.VQVAEConfig, prior.PriorConfig, vqvae_training.TrainConfig,
                prior_training.PriorTrainConfig):
        assert cls.from_dict(cls().to_dict()) == cls()
    assert vqvae_training.TrainConfig().to_dict()["lr"] == 1e-3
    assert prior_training.PriorTrainConfig().to_dict()["lr"] == 8e-3
