"""``distill demo``: from nothing but the installed package to a model and its sounds.

Starts a private local cluster (the ``distill up`` supervisor: a broker and one preprocess,
RVQ-VAE, prior and inference worker, on free loopback ports with their data in a temporary
folder), trains a small model on the bundled CC0 one-shots through the same pipeline ``distill
train DIR`` submits, then asks the inference worker for 8 new sounds (a generate job) and a
reconstruction of each training file (encode, then decode), writes everything into
``./distill-demo/`` beside the ``.distill`` file, and shuts the cluster down, leaving no process
behind (also on Ctrl-C or an error).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import typer

from distill.shared.cli.common import fail
from distill.shared.errors import DistillError

DEMO_SERVICES = ["preprocess", "vqvae", "prior", "infer"]
DEMO_HOME_PREFIX = "distill-demo"  # the private cluster's folder: see _demo_home
DEMO_SECONDS = 2.0  # each generated sound: long enough for a hit and its tail
DEMO_COUNT = 8
DEMO_SEED = 1
DEMO_TEMPERATURE = 0.9  # a little below 1: fewer odd draws from a model trained for minutes
DEMO_TRIM_DB = 60.0  # each sound ends where it has faded 60 dB under its peak: the hit, not the
# hit and the rest of DEMO_SECONDS in silence (a sound that rings on keeps its length)


def bundled_sounds() -> list[Path]:
    """The bundled one-shots (FLAC), sorted by name."""
    folder = Path(str(resources.files("distill.shared") / "assets" / "demo"))
    return sorted(folder.glob("*.flac"))


def _free_port_block() -> int:
    """A port P with P, P+1 and P+2 free on loopback (MDP, events out, events in)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        try:
            for i in range(3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
    raise OSError("no block of 3 free loopback ports")


def _say(message: str) -> None:
    typer.secho(message, fg=typer.colors.CYAN, err=True)


class DemoCluster:
    """The supervisor's children, started and stopped from this process (no signal handlers
    of its own: the command's ``finally`` stops them)."""

    def __init__(self, home: Path, services: list[str], log_file: Path | None = None) -> None:
        from distill.shared.cli.supervisor import Supervisor

        self.cache = str(home / "cache")
        self._cache_before: str | None = None
        self.supervisor = Supervisor(host="127.0.0.1", port=_free_port_block(),
                                     data_dir=home / "broker", services=services, device="cpu",
                                     log_file=log_file, announce=False)  # fmt: skip
        self.endpoint = self.supervisor.endpoint

    def __enter__(self) -> DemoCluster:
        # the workers (and this process's downloads) cache in the temporary folder; the
        # variable is put back on the way out (a test process ran on with it pointing there)
        self._cache_before = os.environ.get("DISTILL_CACHE")
        os.environ["DISTILL_CACHE"] = self.cache
        try:
            self.supervisor.start(ready_timeout_s=180.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.supervisor.shutdown()
        finally:
            if self._cache_before is None:
                os.environ.pop("DISTILL_CACHE", None)
            else:
                os.environ["DISTILL_CACHE"] = self._cache_before


def demo_request(sounds: Path, minutes: float, vqvae_opt: list[str], prior_opt: list[str],
                 train_opt: list[str]) -> Any:  # fmt: skip
    """The `distill train DIR --minutes N` request, its settings checked as `distill train`
    checks them (before the cluster starts)."""
    from distill.shared.cli.train import (
        TrainRequest,
        check_settings,
        parse_settings,
        stage_train_settings,
    )

    req = TrainRequest(source=str(sounds), stage="all", vqvae_ref=None, name="demo",
                       vqvae_model=parse_settings(vqvae_opt), prior_model=parse_settings(prior_opt),
                       train=stage_train_settings(train_opt, {}, minutes, ["vqvae", "prior"]))  # fmt: skip
    check_settings(req)
    return req


def train_demo_model(c: Any, req: Any, out: Path) -> tuple[Path, str]:
    """Submit and follow the pipeline of ``req``; the model file and its artifact id."""
    from distill.shared.cli.model import fetch_model, model_artifact
    from distill.shared.cli.train import follow_pipeline, submit_pipeline

    stages = submit_pipeline(c, req)
    _say("training: " + " -> ".join(f"{s.name} {s.job_id}" for s in stages))
    record = follow_pipeline(c, stages)
    return fetch_model(c, record, out), model_artifact(record)


def generate_demo_sounds(
    c: Any, model_sha: str, out: Path, count: int, seconds: float
) -> list[Path]:
    """A generate job on the inference worker; its exported files downloaded into ``out``."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.jobs import JobsClient
    from distill.shared.model.inference import redraw_note

    jobs = JobsClient(c)
    job = jobs.submit("distill.infer", {"op": "generate", "model": model_sha, "count": count,
                                        "seconds": seconds, "seed": DEMO_SEED,
                                        "temperature": DEMO_TEMPERATURE, "quality": "best",
                                        "trim": DEMO_TRIM_DB})  # fmt: skip
    _say(f"generating {count} sounds of up to {seconds:g} s, each ended where it fades "
         f"(job {job['id']})")

    def on_event(event: dict[str, Any]) -> None:
        if event.get("type") == "progress" and event.get("done") is not None:
            _say(f"  decoded {event['done']}/{event['total']}")

    record = jobs.follow(job["id"], on_event)
    if record["status"] != "succeeded":
        raise typer.BadParameter(f"generation {record['status']}: {record.get('error')}")
    note = redraw_note(int(record["result"].get("redrawn", 0)), count)
    if note:
        _say(f"  {note}")
    store = ArtifactClient(c)
    out.mkdir(parents=True, exist_ok=True)
    return [store.download(s["artifact"], out / s["name"]) for s in record["result"]["sounds"]]


def reconstruct(c: Any, model_sha: str, sources: list[Path], out: Path) -> list[Path]:
    """Each training file encoded and decoded by the inference worker, exported into ``out``."""
    from distill.shared.audio.export import ExportMetadata, export_audio
    from distill.shared.audio.io import load_audio
    from distill.shared.model.inference import decode_recipe

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sources:
        rate = 48000
        audio = load_audio(source, rate).numpy()  # prepared as for training
        enc = c.request("distill.infer", {"op": "encode", "model": model_sha, "audio": audio,
                                          "sample_rate": rate})  # fmt: skip
        dec = c.request("distill.infer", {"op": "decode", "model": model_sha,
                                          "codes": enc["codes"], "quality": "best"})  # fmt: skip
        path = out / f"{source.stem}.wav"
        meta = ExportMetadata(kind="decode", model_id=dec["model_id"], title=path.stem,
                              data=decode_recipe(enc["codes"], None, "best", dec["threads"]))  # fmt: skip
        export_audio(path, dec["audio"], dec["sample_rate"], subtype="PCM_24", metadata=meta)
        paths.append(path)
        _say(f"  reconstructed {source.name}")
    return paths


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    minutes: float = typer.Option(4.0, help="Training budget (more: better sounds)."),
    out: Path = typer.Option(Path("distill-demo"), "-o", "--out", help="Where everything goes."),
    count: int = typer.Option(DEMO_COUNT, "-n", "--count", help="Sounds to generate."),
    seconds: float = typer.Option(DEMO_SECONDS, "--seconds",
                                  help="Length of each sound (each ends where it fades 60 dB)."),
    vqvae_opt: list[str] = typer.Option([], "--vqvae-opt", help="RVQ-VAE setting KEY=VALUE."),
    prior_opt: list[str] = typer.Option([], "--prior-opt", help="Prior setting KEY=VALUE."),
    train_opt: list[str] = typer.Option([], "--train-opt", help="Training setting KEY=VALUE."),
) -> None:
    """Train a small model on bundled sounds and generate with it: the first thing to run."""
    sources = bundled_sounds()
    if not sources:
        fail("the bundled demo sounds are missing from this installation")
    started = time.monotonic()
    sounds = out / "sounds"
    try:  # everything that can be refused is refused before the cluster starts
        from distill.shared.model.inference import (
            MAX_COUNT,
            MAX_SECONDS,
            MIN_SECONDS,
            check_int,
            check_number,
        )

        check_int(count, "-n", 1, MAX_COUNT)
        check_number(seconds, "--seconds", MIN_SECONDS, MAX_SECONDS)
        req = demo_request(sounds, minutes, vqvae_opt, prior_opt, train_opt)
        _prepare_folder(out, sounds, sources)
    except (DistillError, OSError) as e:
        fail(str(e))
    _say(f"distill demo: {len(sources)} bundled CC0 sounds -> {sounds}; training for about "
         f"{minutes:g} min on a local cluster")  # fmt: skip
    try:
        with _demo_home() as home:
            log = (out / "cluster.log").resolve()
            _say(f"cluster logs -> {log}")
            with DemoCluster(Path(home), DEMO_SERVICES, log_file=log) as cluster:
                from distill.shared.bus.client import Client

                with Client(cluster.endpoint, timeout_s=120.0) as c:
                    model, sha = train_demo_model(c, req, out / "demo.distill")
                    generated = generate_demo_sounds(c, sha, out / "generated", count, seconds)
                    _say(f"reconstructing the {len(sources)} training sounds")
                    recon = reconstruct(c, sha, [sounds / src.name for src in sources],
                                        out / "reconstructed")
            _say("cluster stopped")
    except (DistillError, OSError, typer.BadParameter) as e:
        fail(str(e))
    _report(out, model, generated, recon, time.monotonic() - started)


def _demo_home() -> tempfile.TemporaryDirectory[str]:
    """The private cluster's folder (its broker's state, uploads, checkpoints: ~40 MB), in the
    system's temporary folder as ``distill-demo.<pid>.<random>.dir``, removed when the block
    ends; the folders of earlier demos whose process was killed before it could remove its own
    go first."""
    from distill.shared.bus.cache import pid_folder, remove_dead_pid_folders

    tmp = Path(tempfile.gettempdir())
    for name in remove_dead_pid_folders(tmp, DEMO_HOME_PREFIX):
        _say(f"removed {tmp / name}: an earlier demo's, stopped before it could")
    return pid_folder(tmp, DEMO_HOME_PREFIX)


def _prepare_folder(out: Path, sounds: Path, sources: list[Path]) -> None:
    """``out/sounds`` holding the bundled sounds and nothing else (the pipeline trains on the
    whole folder): a folder there with other files in it is refused, never emptied. An earlier
    demo's model and sounds in ``out`` are replaced, and said so."""
    if out.exists() and not out.is_dir():
        raise DistillError(f"-o {out}: a file, not a folder")
    bundled = {src.name for src in sources}
    if sounds.is_dir():
        others = sorted(p.name for p in sounds.iterdir() if p.name not in bundled)
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise DistillError(f"{sounds} holds files that are not the demo's ({shown}): the demo "
                               "trains on everything in that folder; give another -o")
    if (out / "demo.distill").exists():
        _say(f"replacing the earlier demo in {out}")
    sounds.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copy(src, sounds / src.name)


def _report(
    out: Path, model: Path, generated: list[Path], recon: list[Path], wall_s: float
) -> None:
    typer.echo(f"\ndone in {wall_s / 60:.1f} min. In {out.resolve()}:")
    typer.echo(f"  model            {model}")
    typer.echo(f"  generated        {len(generated)} sounds in {out / 'generated'}")
    typer.echo(f"  reconstructions  {len(recon)} in {out / 'reconstructed'} (the training "
               f"sounds, through the model)")  # fmt: skip
    typer.echo(f"  training sounds  {out / 'sounds'}")
    typer.echo("next:")
    typer.echo(f"  distill generate {model} -n 8 --seconds 2 --seed 2 --trim 60 -o {out / 'more'}")
    typer.echo(f"  distill regenerate {generated[0]} --model {model}")
    typer.echo("  distill up            # then, in another terminal:")
    typer.echo("  distill tui           # the terminal UI: jobs, training curves, code editor")
