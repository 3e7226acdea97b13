"""What a log-mel frame means (:class:`MelConfig`) and its bounds: plain Python, no torch.

The features themselves are in :mod:`distill.shared.audio.mel`, which re-exports all of this;
the settings live here so that what reads or checks them without computing a feature (the
broker checking a job's params at submit) loads no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from distill.shared.configs import at_most, config_from_dict, is_int, is_number, require
from distill.shared.errors import ConfigError

MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768_000
# Upper bounds, checked before anything is allocated (the reason is in each message).
MAX_N_FFT = 16_384
MAX_N_MELS = 512
MAX_CHUNK_FRAMES = 2_048
MAX_FRAMES_PER_SECOND = 1_000  # a 1-ms hop: over 10x the default's 94


@dataclass(frozen=True)
class MelConfig:
    """Everything that decides what a log-mel frame means. Never changes for a model."""

    # 48 kHz: the rate most people record and export at; resampling everything to one rate
    # keeps one model valid for all of a person's files.
    sample_rate: int = 48000
    # 2048 at 48 kHz = 43 ms windows: ~23 Hz bins resolve low drums and bass notes.
    n_fft: int = 2048
    # 512 = 10.7 ms per frame (4x overlap), fine enough for drum transients, and Griffin-Lim
    # needs at least 4x overlap to reconstruct phase well.
    hop_length: int = 512
    # 128 mels: enough detail for timbre while staying a small image for the conv encoder.
    n_mels: int = 128
    # 0 Hz: keep the sub-bass that kicks and field recordings carry.
    f_min: float = 0.0
    # None = Nyquist: keep cymbal and hi-hat air up to the top.
    f_max: float | None = None
    # 1e-5 (-100 dB): below anything a 24-bit recording holds after normalisation; the same
    # floor HiFi-GAN uses, so log values stay in a familiar range (about -11.5 .. +5).
    log_floor: float = 1e-5
    # 94 frames = 1.0 s at 48 kHz / 512: long enough for a whole one-shot and its decay.
    chunk_frames: int = 94
    # 50% overlap between chunks of long files: every moment appears at two chunk positions,
    # which doubles the data for small collections at no recording cost.
    chunk_overlap: float = 0.5

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def n_freqs(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def frames_per_second(self) -> float:
        """Mel frames a second of sound (an RVQ-VAE makes one code step per ``downsample``)."""
        return self.sample_rate / self.hop_length

    @property
    def chunk_samples(self) -> int:
        """Samples whose centred STFT gives exactly ``chunk_frames`` frames."""
        return (self.chunk_frames - 1) * self.hop_length

    @property
    def chunk_hop_frames(self) -> int:
        """Frames between the starts of two consecutive chunks of a long file."""
        return max(1, round(self.chunk_frames * (1.0 - self.chunk_overlap)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MelConfig:
        """Build from a plain dict; missing keys take defaults, unknown keys are an error."""
        return config_from_dict(cls, d, "mel_config")


def _validate(c: MelConfig) -> None:
    for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "chunk_frames"):
        v = getattr(c, name)
        if not is_int(v) or v < 1:
            raise ConfigError(f"mel_config.{name} must be a positive integer, got {v!r}")
    for name in ("f_min", "log_floor", "chunk_overlap"):
        if not is_number(getattr(c, name)):
            raise ConfigError(
                f"mel_config.{name} must be a finite number, got {getattr(c, name)!r}"
            )
    if not MIN_SAMPLE_RATE <= c.sample_rate <= MAX_SAMPLE_RATE:
        raise ConfigError(
            f"mel_config.sample_rate {c.sample_rate} is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz"
        )
    require(
        [
            at_most(c.n_fft, MAX_N_FFT, "n_fft", "0.34 s windows at 48 kHz"),
            at_most(c.n_mels, MAX_N_MELS, "n_mels", "4x the default; the model grows with it"),
            at_most(c.chunk_frames, MAX_CHUNK_FRAMES, "chunk_frames", "~22 s chunks at 48 kHz"),
        ],
        "mel_config",
    )
    if c.n_fft < 16:
        raise ConfigError(f"mel_config.n_fft must be at least 16, got {c.n_fft}")
    if c.hop_length > c.n_fft:
        raise ConfigError(f"mel_config.hop_length {c.hop_length} exceeds n_fft {c.n_fft}")
    if c.sample_rate / c.hop_length > MAX_FRAMES_PER_SECOND:
        # a model file with hop 1 took 54 s and 2.8 GB for half a second of sound
        raise ConfigError(
            f"mel_config.hop_length {c.hop_length} at {c.sample_rate} Hz makes "
            f"{c.sample_rate / c.hop_length:.0f} frames a second, over {MAX_FRAMES_PER_SECOND} "
            f"(a hop of {c.sample_rate // MAX_FRAMES_PER_SECOND} samples; the default makes 94): "
            "every second of sound costs that many frames to encode and decode")  # fmt: skip
    if c.n_mels > c.n_fft // 2 + 1:
        raise ConfigError(
            f"mel_config.n_mels {c.n_mels} exceeds n_fft // 2 + 1 = {c.n_fft // 2 + 1}"
        )
    if c.chunk_frames < 2:
        raise ConfigError(f"mel_config.chunk_frames must be at least 2, got {c.chunk_frames}")
    nyquist = c.sample_rate / 2
    if not 0.0 <= c.f_min < nyquist:
        raise ConfigError(f"mel_config.f_min {c.f_min} must be in [0, {nyquist}) Hz")
    if c.f_max is not None and (not is_number(c.f_max) or not c.f_min < c.f_max <= nyquist):
        raise ConfigError(f"mel_config.f_max {c.f_max!r} must be in (f_min, {nyquist}] Hz or None")
    if not 0.0 < c.log_floor < 1.0:
        raise ConfigError(f"mel_config.log_floor must be in (0, 1), got {c.log_floor}")
    if not 0.0 <= c.chunk_overlap < 1.0:
        raise ConfigError(f"mel_config.chunk_overlap must be in [0, 1), got {c.chunk_overlap}")
