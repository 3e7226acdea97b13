"""Play a sound on the UI's machine: fetch the artifact into the local cache, then hand it to
sounddevice (the optional ``audio`` extra) or the system's player, whichever is there."""

from __future__ import annotations

import atexit
import itertools
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from distill.shared.errors import DistillError

PLAYERS: tuple[tuple[str, list[str]], ...] = (
    ("paplay", []),
    ("aplay", ["-q"]),
    ("afplay", []),
    ("ffplay", ["-nodisp", "-autoexit", "-loglevel", "quiet"]),
    ("play", ["-q"]),
)


def system_player() -> list[str] | None:
    """The command line of the first audio player found on PATH, or None."""
    for name, args in PLAYERS:
        path = shutil.which(name)
        if path:
            return [path, *args]
    return None


def play_file(path: Path) -> str:
    """Play ``path`` (blocking until it ends); returns what happened, in words."""
    return _play(path)[1]


def _play(path: Path) -> tuple[bool, str]:
    """Whether ``path`` was played, and what happened, in words."""
    name = player_name()
    if name is None:
        return False, f"no audio player on this machine (install sounddevice or paplay/aplay); file at {path}"
    if name == "sounddevice":
        import sounddevice

        from distill.shared.audio.io import read_audio

        decoded = read_audio(path)
        sounddevice.play(decoded.samples.T, decoded.sample_rate, blocking=True)  # (frames, channels)
        return True, f"played {path.name} (sounddevice)"
    player = system_player()
    assert player is not None  # player_name found it
    done = subprocess.run([*player, str(path)], capture_output=True, timeout=600, check=False)
    if done.returncode != 0:
        return False, f"{name} could not play {path.name}: {done.stderr.decode(errors='replace')[:120]}; file at {path}"
    return True, f"played {path.name} ({name})"


def player_name() -> str | None:
    """What plays sound here: "sounddevice", a system player's name, or None."""
    try:
        import sounddevice

        if sounddevice.query_devices(kind="output"):
            return "sounddevice"
    except Exception:  # noqa: BLE001 - no module, no PortAudio, no output device: all mean "not this one"
        pass  # no module, no PortAudio, or no output device
    player = system_player()
    return Path(player[0]).name if player else None


# The WAV files sounds are played from: one folder for the process, removed when it exits. A
# sound that was not played stays there meanwhile, as the notice says ("file at ..."): it was
# in a TemporaryDirectory, deleted before the notice that named it was shown.
_folder: Path | None = None
_folder_lock = threading.Lock()  # sounds are played from worker threads
_numbers = itertools.count(1)


def play_folder() -> Path:
    """This process's folder of sounds to play (made on first use, removed at exit)."""
    global _folder
    with _folder_lock:
        if _folder is None or not _folder.is_dir():
            _folder = Path(tempfile.mkdtemp(prefix="distill-play-"))
            atexit.register(shutil.rmtree, _folder, ignore_errors=True)
        return _folder


def play_audio(audio: np.ndarray, sample_rate: int) -> str:
    """Play a float sound (samples,) on this machine, through a WAV file in
    :func:`play_folder`: removed once played, kept until the UI exits when it could not be
    (the message names it: the user can copy it off, or open it with a player of their own)."""
    from distill.shared.audio.export import within_full_scale
    from distill.shared.audio.io import write_audio

    path = play_folder() / f"sound-{next(_numbers)}.wav"
    write_audio(path, within_full_scale(audio), sample_rate)  # scaled down, not clipped
    played, message = _play(path)
    if played:
        path.unlink(missing_ok=True)
        return message
    return f"{message} (kept until the UI exits)"


def play_artifact(endpoint: str, sha256: str) -> str:
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.client import Client

    try:
        with Client(endpoint, timeout_s=60.0) as c:
            path = ArtifactClient(c).get_file(sha256)
    except DistillError as e:
        return f"could not fetch {sha256[:12]}: {e}"
    return play_file(path)
