"""The one config reader (distill.shared.configs), as the three configs use it."""

from __future__ import annotations

import pytest

from distill.shared.audio.mel import MelConfig
from distill.shared.configs import config_from_dict, is_int, is_number
from distill.shared.errors import ConfigError
from distill.shared.model.vqvae import VQVAEConfig
from distill.shared.train.vqvae import TrainConfig


@pytest.mark.parametrize("cls", [MelConfig, VQVAEConfig, TrainConfig])
def test_round_trip_and_defaults(cls: type) -> None:
    default = cls()
    assert cls.from_dict(default.to_dict()) == default
    assert cls.from_dict({}) == default


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (MelConfig, {"n_mels": 64.0}, "n_mels must be an integer"),
        (MelConfig, {"n_mel": 64}, r"unknown keys \['n_mel'\]"),
        (MelConfig, [], "must be a map"),
        (VQVAEConfig, {"dilations": [1, "3"]}, "dilations must be an integer"),
        (VQVAEConfig, {"rotation_trick": 1}, "rotation_trick must be true or false"),
        (VQVAEConfig, {"codebook_size": True}, "codebook_size must be an integer"),
        (TrainConfig, {"lr": "fast"}, "lr must be a number"),
        (TrainConfig, {"schedule": 3}, "schedule must be a string"),
        (TrainConfig, {"epochs": 0}, "epochs must be >= 1"),
    ],
)
def test_bad_values_name_the_key(cls: type, data: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cls.from_dict(data)


def test_types_are_read_from_type_hints() -> None:
    cfg = VQVAEConfig.from_dict({"dilations": [1, 2], "codebook_size": None, "ema_decay": 0})
    assert cfg.dilations == (1, 2) and cfg.codebook_size is None
    assert isinstance(cfg.ema_decay, float)
    mel = config_from_dict(MelConfig, {"f_max": 20000}, "mel_config")
    assert mel.f_max == 20000.0 and isinstance(mel.f_max, float)


def test_is_int_and_is_number() -> None:
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(2.5) and not is_number(float("nan")) and not is_number(False)
