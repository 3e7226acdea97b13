"""Play a sound on the UI's machine: fetch the artifact into the local cache, then hand it to
sounddevice (the optional ``audio`` extra) or the system's player, whichever is there."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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
    try:
        import sounddevice

        from distill.shared.audio.io import read_audio

        decoded = read_audio(path)
        sounddevice.play(decoded.samples.T, decoded.sample_rate, blocking=True)  # (frames, channels)
        return f"played {path.name} (sounddevice)"
    except (ImportError, OSError, DistillError):
        pass  # no sounddevice, or no usable output device: try a system player
    player = system_player()
    if player is None:
        return f"no audio player on this machine (install sounddevice or paplay/aplay); file at {path}"
    done = subprocess.run([*player, str(path)], capture_output=True, timeout=600, check=False)
    if done.returncode != 0:
        return f"{Path(player[0]).name} could not play {path.name}: {done.stderr.decode(errors='replace')[:120]}"
    return f"played {path.name} ({Path(player[0]).name})"


def play_artifact(endpoint: str, sha256: str) -> str:
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.client import Client

    try:
        with Client(endpoint, timeout_s=60.0) as c:
            path = ArtifactClient(c).get_file(sha256)
    except DistillError as e:
        return f"could not fetch {sha256[:12]}: {e}"
    return play_file(path)
