"""``distill model show|pull``: look inside a ``.distill`` file; fetch a finished pipeline's model.

A pipeline (``distill train DIR``) is three jobs: preprocess -> train.vqvae -> train.prior. Its
model is the ``model`` artifact of the prior job; ``pull`` takes the prior job's id or the id of
any job before it in the pipeline and finds the prior job that depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from distill.shared.cli.common import BrokerOpt, client, fail, output_file_problem, shown
from distill.shared.errors import DistillError

PRIOR_SERVICE = "distill.train.prior"
VQVAE_SERVICE = "distill.train.vqvae"
PREPROCESS_SERVICE = "distill.preprocess"


MAX_LABEL_CHARS = 40  # the summary table's first column, at most


def _label(key: str) -> str:
    return key if len(key) <= MAX_LABEL_CHARS else key[: MAX_LABEL_CHARS - 1] + "…"


def print_model_summary(path: Path) -> None:
    """The summary of a ``.distill`` file as a two-column table (``describe_model``'s rows);
    a file whose configs are invalid or do not fit its weights is refused as loading it would
    be (what `distill generate` would say), before its tensors are read. The file may come from
    anyone: every string it holds (summary keys and values, kind, versions) is shown with its
    control and format characters escaped, never sent to the terminal as they are."""
    from distill.shared.model.modelfile import build_model, describe_model, read_model_file

    raw = read_model_file(path, check_configs=True)
    build_model(raw, path)
    rows = [("file", str(path)), *describe_model(raw)]
    # a key is a label: a file's 150-character key pushed every row 140 columns right
    rows = [(_label(shown(key)), shown(value)) for key, value in rows]
    seen: set[str] = set()
    for i, (key, value) in enumerate(rows):  # the summary may repeat a key: "prior" (training)
        if key in seen:
            rows[i] = (f"{key} (training)", value)
        seen.add(key)
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        typer.echo(f"{key:>{width}}  {value}")


def _dependents(jobs: Any, job_id: str, service: str,
                weights: str | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Jobs of ``service`` that depend on ``job_id``, newest first; with ``weights`` (an
    RVQ-VAE job's finished weights), also the prior jobs submitted after it finished, which
    name those weights in their params instead of depending on the job
    (``distill train --stage prior --vqvae JOB``)."""
    # Every job of the service, page by page: the broker sends at most 500 per reply.
    return [r for r in jobs.iter_jobs(service=service)
            if job_id in (r.get("depends_on") or [])
            or (weights and (r.get("params") or {}).get("vqvae") == weights)]


def find_model_job(jobs: Any, job_id: str) -> dict[str, Any]:
    """The prior job of the pipeline ``job_id`` belongs to (``job_id`` itself if it is one)."""
    record: dict[str, Any] = jobs.get(job_id, metrics=False)
    if record["service"] == PREPROCESS_SERVICE:
        after = _dependents(jobs, job_id, VQVAE_SERVICE)
        if not after:
            raise DistillError(f"job {job_id} is a preprocess job with no RVQ-VAE job after it, "
                               "so no model")  # fmt: skip
        record = after[0]
    if record["service"] == VQVAE_SERVICE:
        weights = (record.get("result") or {}).get("model")
        after = _dependents(jobs, record["id"], PRIOR_SERVICE, weights=weights or None)
        if not after:
            raise DistillError(f"job {record['id']} trained an RVQ-VAE and no prior job depends on "
                               "it, so there is no .distill model yet: train one with `distill "
                               f"train DATASET --stage prior --vqvae {record['id']}`")  # fmt: skip
        record = after[0]
    if record["service"] != PRIOR_SERVICE:
        raise DistillError(f"job {job_id} is a {record['service']} job, which makes no model")
    return record


def model_artifact(record: dict[str, Any]) -> str:
    """The model artifact id of a finished prior job; a clear error when it has none."""
    job_id, status = record["id"], record["status"]
    if status in ("queued", "running"):
        raise DistillError(f"job {job_id} is {status}: the model is not made yet (follow it with "
                           f"`distill jobs watch {job_id}`)")  # fmt: skip
    if status != "succeeded":
        raise DistillError(f"job {job_id} {status}, so it has no model: {record.get('error')}")
    sha = (record.get("result") or {}).get("model")
    if not isinstance(sha, str) or not sha:
        raise DistillError(f"job {job_id} succeeded but its result names no model artifact")
    return sha


def default_model_path(record: dict[str, Any]) -> Path:
    name = (record.get("result") or {}).get("name") or (record.get("params") or {}).get("name")
    return Path(f"{name or record['id']}.distill")


def check_model_output(path: Path, force: bool) -> None:
    """DistillError unless a model file can be written at ``path`` (``output_file_problem``): a
    model is minutes to hours of training, never replaced by surprise nor lost at the end to a
    missing folder. Checked before the work starts."""
    problem = output_file_problem(path, force)
    if problem:
        raise DistillError(problem)


def fetch_model(c: Any, record: dict[str, Any], out: Path | None) -> Path:
    """Downloads a finished prior job's model to ``out`` (default NAME.distill here) and checks
    that it reads as a model file; returns the path. A write that fails says how to fetch the
    model again (it stays in the broker's store)."""
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.model.modelfile import read_model_file

    sha = model_artifact(record)
    path = out if out is not None else default_model_path(record)
    try:
        ArtifactClient(c).download(sha, path)
    except OSError as e:
        raise DistillError(f"could not write {path}: {e.strerror or e}; the model is kept in "
                           f"the broker: `distill model pull {record['id']} -o FILE` fetches "
                           "it") from None
    read_model_file(path)  # a broken store or a mix-up shows here, not at the user's next step
    return path


def register(app: typer.Typer) -> None:
    model = typer.Typer(
        help="Inspect a .distill model file; fetch a trained one.", no_args_is_help=True
    )
    app.add_typer(model, name="model")

    @model.command("show")
    def model_show(
        path: Path = typer.Argument(..., metavar="FILE", help="A .distill file."),
    ) -> None:
        """Print a model file's summary: sizes, codebooks, metrics, baselines, training files."""
        try:
            print_model_summary(path)
        except (DistillError, OSError) as e:
            fail(shown(e))  # a model file's error may quote the file

    @model.command("pull")
    def model_pull(
        job_id: str = typer.Argument(
            ..., metavar="JOB", help="The prior job, or any job of its pipeline."
        ),
        out: Path = typer.Option(
            None, "-o", "--output", help="Where to write (default: NAME.distill here)."
        ),
        broker: str = BrokerOpt,
        force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    ) -> None:
        """Fetch the .distill model of a finished pipeline (or prior job)."""
        from distill.shared.bus.jobs import JobsClient

        try:
            with client(broker, timeout_s=60.0) as c:
                record = find_model_job(JobsClient(c), job_id)
                path = out if out is not None else default_model_path(record)
                check_model_output(path, force)
                path = fetch_model(c, record, path)
            print_model_summary(path)
        except (DistillError, OSError) as e:
            fail(shown(e))
        typer.echo(f"wrote {path}")
