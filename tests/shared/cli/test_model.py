"""`distill model show` on good and bad files, `distill model pull`'s job lookup, and the parts of
`distill train` that need no cluster: settings per stage, the live line, the detach message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import soundfile as sf
import torch
from typer.testing import CliRunner

from distill.shared.bus.jobs import JobsClient
from distill.shared.cli.main import app
from distill.shared.cli.model import find_model_job, model_artifact
from distill.shared.cli.train import (
    Stage,
    TrainRequest,
    check_settings,
    detach_message,
    model_name,
    preview_line,
    stage_outcome,
    stage_train_settings,
    train_line,
)
from distill.shared.errors import DistillError
from distill.shared.model.modelfile import (
    FORMAT_VERSION,
    METADATA_KEY,
    read_model_file,
    save_model,
    write_model_file,
)
from tests.shared.model.test_modelfile import _rewrite_header, _tensor_span, _tiny_model

torch.set_num_threads(1)


def show(path: Path) -> Any:
    return CliRunner().invoke(app, ["model", "show", str(path)])


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "drums.distill"
    save_model(path, _tiny_model())
    return path


def test_show_prints_the_summary_table(model_path: Path) -> None:
    out = show(model_path)
    assert out.exit_code == 0, out.stderr
    rows = dict(line.strip().split("  ", 1) for line in out.stdout.splitlines())
    assert rows["file"].strip() == str(model_path)
    assert rows["kind"].strip() == "vqvae+prior"
    assert rows["rvq-vae"].strip().startswith("2 levels x 16 codes")
    assert rows["prior"].strip().startswith("LSTM 1 x 16")
    assert rows["files"].strip() == "2: a.wav, b.wav"
    assert "unigram_bits 7.9" in rows["baselines"]


def _flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start, _ = _tensor_span(bytes(data), "vqvae.rvq.layers.0._codebook.embed")
    data[start + 3] ^= 0x10
    path.write_bytes(bytes(data))


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated"),
    "tampered tensor": (_flip_tensor_byte, "does not match its checksum"),
    "tampered header": (
        lambda p: _rewrite_header(p, lambda h: h["summary"].update(epochs=9)),
        "header's checksum",
    ),  # fmt: skip
    "newer version": (
        lambda p: _rewrite_header(p, lambda h: h.update(format_version=FORMAT_VERSION + 1)),
        "upgrade Distill",
    ),  # fmt: skip
    "wav renamed": (
        lambda p: sf.write(p, np.zeros(4800), 48000, format="WAV"),
        "not a safetensors file",
    ),  # fmt: skip
    "other safetensors": (
        lambda p: safetensors.torch.save_file({"w": torch.zeros(3)}, p),
        "without a Distill header",
    ),  # fmt: skip
    "other format": (
        lambda p: safetensors.torch.save_file(
            {"w": torch.zeros(3)}, p, metadata={METADATA_KEY: json.dumps({"format": "x"})}
        ),
        "format is not",
    ),  # fmt: skip
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "missing": (lambda p: p.unlink(), "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_show_on_a_bad_file_prints_one_line(model_path: Path, case: str) -> None:
    spoil, expected = BAD_FILES[case]
    spoil(model_path)
    out = show(model_path)
    assert out.exit_code == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: drums.distill: "), out.stderr
    assert expected in lines[0] and "Traceback" not in out.stderr


def _with_configs(path: Path, change: Any) -> None:
    """Re-writes the model file with its configs passed through ``change``, checksums made
    anew: a file whose own checks pass but whose configs are wrong."""
    model = read_model_file(path)
    header = {k: model.header[k] for k in ("kind", "configs", "summary")}
    change(header["configs"])
    write_model_file(path, header, model.tensors)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c["prior"].update(levels=99), "the 'prior' config is invalid"),
    (lambda c: c["mel"].update(sample_rate=500), "the 'mel' config is invalid"),
    (lambda c: c["prior"].update(hidden=c["prior"]["hidden"] * 2), "weights do not fit the configs"),
])  # fmt: skip
def test_show_refuses_configs_that_are_invalid_or_do_not_fit_the_weights(
    model_path: Path, change: Any, expected: str
) -> None:
    """Before: `model show` printed such a file and exited 0; `generate` refused it."""
    _with_configs(model_path, change)
    out = show(model_path)
    assert out.exit_code == 1 and out.stdout == "" and expected in out.stderr, out.stderr
    assert len(out.stderr.splitlines()) == 1


def test_show_on_a_directory(tmp_path: Path) -> None:
    out = show(tmp_path)
    assert out.exit_code == 1 and out.stderr.startswith("error: ") and "a folder, not a model file" in out.stderr


# --- model pull: which job holds the model --------------------------------------------------------


class FakeBroker:
    """The ``distill.jobs`` ops find_model_job uses, over a fixed job table, paged as the broker
    pages them (at most 500 jobs per ``list`` reply, newest first)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = {r["id"]: r for r in records}

    def request(self, service: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["op"] == "get":
            if body["id"] not in self.records:
                raise DistillError(f"no job {body['id']}")
            return self.records[body["id"]]
        assert body["op"] == "list", body
        newest = [r for r in reversed(self.records.values()) if r["service"] == body["service"]]
        start, limit = body.get("start", 0), min(body["limit"], 500)
        return {
            "jobs": newest[start : start + limit],
            "start": start,
            "more": start + limit < len(newest),
        }


def fake_jobs(records: list[dict[str, Any]]) -> JobsClient:
    return JobsClient(FakeBroker(records))  # type: ignore[arg-type]


def _job(job_id: str, service: str, deps: list[str], status: str = "succeeded",
         result: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"id": job_id, "service": f"distill.{service}", "depends_on": deps, "status": status,
            "result": result, "error": None, "params": {}}  # fmt: skip


PIPELINE = [_job("j-prep", "preprocess", []), _job("j-vq", "train.vqvae", ["j-prep"]),
            _job("j-prior", "train.prior", ["j-vq"], result={"model": "ab" * 32, "name": "drums"})]  # fmt: skip


@pytest.mark.parametrize("given", ["j-prep", "j-vq", "j-prior"])
def test_pull_finds_the_prior_job_from_any_stage(given: str) -> None:
    record = find_model_job(fake_jobs(PIPELINE), given)
    assert record["id"] == "j-prior" and model_artifact(record) == "ab" * 32


def test_pull_finds_the_prior_job_behind_more_than_a_page_of_newer_jobs() -> None:
    """Before: one ``list(limit=1000)`` call, which the broker caps at 500 jobs: a prior job
    with 600 newer prior jobs after it was not found."""
    newer = [_job(f"j-other{i}", "train.prior", [f"j-vq{i}"]) for i in range(600)]
    record = find_model_job(fake_jobs(PIPELINE + newer), "j-vq")
    assert record["id"] == "j-prior"


def test_pull_finds_a_prior_trained_on_a_finished_rvq_vaes_weights() -> None:
    """`distill train --stage prior --vqvae JOB` on a finished RVQ-VAE job submits a prior job
    that names its weights instead of depending on it; pulling the RVQ-VAE job finds it."""
    weights = "cd" * 32
    records = [_job("j-vq", "train.vqvae", [], result={"model": weights}),
               {**_job("j-p", "train.prior", [], result={"model": "ef" * 32}),
                "params": {"vqvae": weights}},
               {**_job("j-other", "train.prior", [], result={"model": "01" * 32}),
                "params": {"vqvae": "99" * 32}}]  # fmt: skip
    assert find_model_job(fake_jobs(records), "j-vq")["id"] == "j-p"


def test_pull_refuses_jobs_without_a_model() -> None:
    lone = fake_jobs([_job("j-vq", "train.vqvae", []), _job("j-s", "sleep", [])])
    with pytest.raises(DistillError, match="no prior job depends on it"):
        find_model_job(lone, "j-vq")
    with pytest.raises(DistillError, match="distill.sleep job, which makes no model"):
        find_model_job(lone, "j-s")
    for status, match in (("running", "is running: the model is not made yet"),
                          ("failed", "failed, so it has no model"),
                          ("succeeded", "names no model artifact")):  # fmt: skip
        with pytest.raises(DistillError, match=match):
            model_artifact(_job("j-p", "train.prior", [], status=status, result={}))


# --- distill train without a cluster --------------------------------------------------------------


def test_train_settings_per_stage_and_budget_split() -> None:
    items = ["patience=5", "prior.epochs=7", "vqvae.lr=0.01"]
    got = stage_train_settings(items, {"seed": 3, "batch_size": None}, 10.0, ["vqvae", "prior"])
    assert got == {"vqvae": {"patience": 5, "lr": 0.01, "minutes": 7.0, "seed": 3},
                   "prior": {"patience": 5, "epochs": 7, "minutes": 3.0, "seed": 3}}  # fmt: skip
    assert stage_train_settings([], {}, 4.0, ["prior"]) == {"prior": {"minutes": 4.0}}
    own = stage_train_settings(["prior.minutes=1"], {}, 10.0, ["vqvae", "prior"])
    assert own["prior"]["minutes"] == 1 and own["vqvae"]["minutes"] == 7.0
    with pytest.raises(DistillError, match="prefix must be vqvae. or prior."):
        stage_train_settings(["decoder.lr=1"], {}, None, ["vqvae"])
    with pytest.raises(DistillError, match="not KEY=VALUE"):
        stage_train_settings(["lr"], {}, None, ["vqvae"])
    with pytest.raises(DistillError, match="--minutes must be > 0"):
        stage_train_settings([], {}, 0.0, ["vqvae"])


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--train-opt", "vqvae.codebook_size=128"],
      "--train-opt: codebook_size is a model setting of the vqvae stage, "
      "not a training one: give it as --vqvae-opt codebook_size=VALUE"),
     (["--train-opt", "prior.hidden=64"], "give it as --prior-opt hidden=VALUE"),
     (["--train-opt", "lr=fast"], "lr must be a number, got 'fast'"),
     (["--vqvae-opt", "chanels=64"], "--vqvae-opt: unknown keys ['chanels']"),
     (["--vqvae-opt", "n_mels=64"], "takes its mel bands from the dataset"),
     (["--prior-opt", "hiden=64"], "--prior-opt: unknown keys ['hiden']"),
     # types and bounds too, not only the keys (these failed after the RVQ-VAE's whole budget)
     (["--prior-opt", "hidden=abc"], "--prior-opt: PriorConfig: hidden must be an int"),
     (["--prior-opt", "dropout=5"], "--prior-opt: PriorConfig: dropout must be in 0..0.9")],
)  # fmt: skip
def test_train_refuses_bad_settings_before_uploading(tmp_path: Path, args: list[str],
                                                      message: str) -> None:  # fmt: skip
    """Checked before anything is sent: no broker is listening, and none is needed to fail."""
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    sf.write(sounds / "tone.wav", np.zeros(4800, dtype=np.float32), 48000)
    out = CliRunner().invoke(app, ["train", str(sounds), *args, "--broker", "tcp://127.0.0.1:9",
                                   "-o", str(tmp_path / "m.distill")])  # fmt: skip
    assert out.exit_code == 1 and message in out.output
    assert "uploading" not in out.output and "no broker" not in out.output


def test_prior_settings_checked_over_the_sizes_the_stage_would_choose() -> None:
    """A setting valid only with the stage's chosen sizes (earlier_codes needs prev_codes, which
    the stage turns on) passes; levels and codebook_size are the RVQ-VAE's to judge."""
    for prior in ({"earlier_codes": 2}, {"hidden": 64, "dropout": 0.3}, {"codebook_size": 512}):
        check_settings(TrainRequest(source="x", stage="all", vqvae_ref=None, name="x",
                                    vqvae_model={}, prior_model=prior, train={}))  # fmt: skip


def test_train_refuses_an_output_it_cannot_write_or_would_replace(tmp_path: Path) -> None:
    """Checked before anything is sent (minutes to hours of training are not lost at the end
    to a missing folder, nor an earlier model replaced unasked)."""
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    earlier = tmp_path / "earlier.distill"
    earlier.write_bytes(b"an earlier model")
    for out, message in ((earlier, "earlier.distill exists: give another -o, or --force"),
                         (tmp_path / "nodir" / "m.distill", f"no folder {tmp_path / 'nodir'}"),
                         (sounds, "that is a folder; give a file's name")):  # fmt: skip
        got = CliRunner().invoke(app, ["train", str(sounds), "-o", str(out), "--broker",
                                       "tcp://127.0.0.1:9"])  # fmt: skip
        assert got.exit_code == 1 and message in got.output, got.output
        assert "no broker" not in got.output
    assert earlier.read_bytes() == b"an earlier model"
    # the RVQ-VAE stage alone writes no model file: -o is refused as meaningless there (it
    # was ignored without a word)
    got = CliRunner().invoke(app, ["train", str(sounds), "--stage", "vqvae", "-o", str(earlier),
                                   "--broker", "tcp://127.0.0.1:9"])  # fmt: skip
    assert "exists" not in got.output and "which --stage vqvae does not write" in got.output
    assert earlier.read_bytes() == b"an earlier model"


def test_model_name_from_the_folder(tmp_path: Path) -> None:
    (tmp_path / "my drums").mkdir()
    assert model_name(str(tmp_path / "my drums"), None) == "my drums"
    assert model_name(str(tmp_path / "my drums") + "/", None) == "my drums"
    assert model_name("3f2a" * 16, None) == "model-3f2a3f2a3f2a"
    assert model_name(None, "j-0123456789abcdef") == "model-0123456789ab"


def test_prior_live_line() -> None:
    row = {"epoch": 4, "epochs": 50, "train_bits": 5.1234, "val_bits": 5.5, "unigram_bits": 7.25,
           "bigram_bits": 6.5, "eta_s": 75.0}  # fmt: skip
    line = train_line({"type": "metrics", "row": row})
    assert line == ("epoch 4/50  train 5.123  val 5.500  unigram 7.250  bigram 6.500 bits/code  "
                    "eta 1m15s")  # fmt: skip
    line = train_line({"type": "metrics", "row": {**row, "validated_on": "train"}})
    assert line is not None and "  val on training files 5.500  " in line


def test_preview_line_names_the_file_and_how_to_fetch_it() -> None:
    sha = "4c823d32bca6f113" + "0" * 48
    event = {"type": "preview", "artifact": sha, "epoch": 12, "chunk": 0, "file": "bd_808.flac",
             "which": "reconstruction"}
    assert preview_line(event) == ("preview at epoch 12: bd_808.flac through the model: distill "
                                   "artifacts get 4c823d32bca6f113 bd_808-epoch12.wav")
    assert preview_line({**event, "which": "original"}) is None
    second = {**event, "file": "loop.flac", "file_chunk": 2, "file_chunks": 9}
    assert preview_line(second) == ("preview at epoch 12: loop.flac (chunk 2 of 9) through the "
                                    "model: distill artifacts get 4c823d32bca6f113 "
                                    "loop-2-epoch12.wav")  # fmt: skip
    assert preview_line({"type": "preview"}) is None


def test_prior_outcome_gives_the_size_first_and_the_stop_last() -> None:
    result = {"best_val_bits": 0.132, "best_epoch": 137, "stopped": "early_stopping",
              "chosen": {"why": "423 training code steps x 2 levels: LSTM 1 x 128."},
              "metrics": {"train_bits": 0.192, "val_bits": 0.134},
              "baselines": {"unigram_bits": 2.75, "bigram_bits": 1.031, "validated_on": "train"}}
    assert stage_outcome(Stage("prior", "j-c"), result) == (
        "423 training code steps x 2 levels: LSTM 1 x 128; best val on training files 0.132 "
        "bits/code (epoch 137); last epoch train 0.192  val on training files 0.134  unigram "
        "2.750  bigram 1.031 bits/code; stopped: early stopping")
    held_out = {**result, "baselines": {**result["baselines"], "validated_on": "val"}}
    line = stage_outcome(Stage("prior", "j-c"), held_out)
    assert "best val 0.132 bits/code" in line and "training files" not in line
    assert "note:" not in line
    # a prior no better than the bigram of the codes is said (it was saved without a word)
    weak = {**result, "best_val_bits": 3.9, "baselines": {**result["baselines"], "bigram_bits": 3.357}}
    assert ("note: the prior predicts the codes no better than a bigram of them (3.900 against "
            "3.357 bits/code)") in stage_outcome(Stage("prior", "j-c"), weak)


def test_preprocess_outcome_names_the_files_it_skipped_and_why() -> None:
    ok = {"name": "bd.flac", "status": "ok", "reason": None}
    result = {"dataset": "4fb1ed28d9053323e0db", "chunks": 6, "train_files": 5, "val_files": 1,
              "manifest": [ok, {"name": "notes.txt", "status": "skipped",
                                "reason": "not audio: it is a text file"},
                           {"name": "empty.wav", "status": "skipped",
                            "reason": "empty file (0 bytes)"}]}
    assert stage_outcome(Stage("preprocess", "j-a"), result) == (
        "dataset 4fb1ed28d9053323: 6 chunks, 5 train / 1 validation files; skipped 2: notes.txt "
        "(not audio: it is a text file), empty.wav (empty file (0 bytes))")
    clean = {**result, "manifest": [ok]}
    assert stage_outcome(Stage("preprocess", "j-a"), clean) == (
        "dataset 4fb1ed28d9053323: 6 chunks, 5 train / 1 validation files")
    many = {**result, "manifest": [ok] + [{"name": f"x{i}.txt", "status": "skipped",
                                           "reason": "not audio"} for i in range(8)]}
    line = stage_outcome(Stage("preprocess", "j-a"), many)
    assert "skipped 8: x0.txt (not audio)" in line and "x5.txt" not in line
    assert line.endswith("and 3 more (`distill dataset show 4fb1ed28d9053323` lists them)")


def test_vqvae_outcome_gives_the_decoded_audio_against_its_floor() -> None:
    result = {"best_val_loss": 0.0836, "best_epoch": 3,
              "chosen": {"codebook_size": 64, "levels": 2, "why": "9 training chunks: 64 x 2."},
              "audio": {"sc": 0.364, "floor": 0.182, "chunks": 1, "on": "audio"}}
    assert stage_outcome(Stage("vqvae", "j-b"), result) == (
        "RVQ-VAE 64 codes x 2 levels (9 training chunks: 64 x 2); best validation loss 0.0836 "
        "(epoch 3); decoded audio 2.00x the Griffin-Lim floor: 0.364 vs 0.182 (1 validation "
        "chunk, spectral convergence)")
    four = {**result, "audio": {**result["audio"], "chunks": 4}}
    assert "(4 validation chunks," in stage_outcome(Stage("vqvae", "j-b"), four)
    # no files held out (under five): the figures are on training chunks, and say so
    unheld = {**four, "metrics": {"validated_on": "train"}}
    line = stage_outcome(Stage("vqvae", "j-b"), unheld)
    assert "best training loss 0.0836 (epoch 3) (no files held out)" in line
    assert "(4 training chunks," in line and "validation" not in line
    # a dataset prepared before datasets kept the audio: the figure is on mel bins, and says so
    older = {**result, "audio": {"sc": 0.364, "floor": 0.074, "chunks": 4}}
    assert stage_outcome(Stage("vqvae", "j-b"), older).endswith(
        "(4 validation chunks, spectral convergence on mel bins: prepare the dataset again for "
        "the figure on audio)")


def test_detach_message_names_follow_cancel_and_pull() -> None:
    stages = [Stage("preprocess", "j-a"), Stage("vqvae", "j-b"), Stage("prior", "j-c")]
    text = detach_message(stages, Path("drums.distill"))
    assert "distill jobs watch j-a" in text and "distill jobs watch j-c" in text
    assert "distill jobs cancel j-a" in text
    assert "distill model pull j-c -o drums.distill" in text
    # once the preprocess job has succeeded, the cancel names the RVQ-VAE job, which stops both
    text = detach_message(stages, Path("drums.distill"), finished=1)
    assert "distill jobs cancel j-b" in text and "j-a" not in text
    assert "cancelled with it" in text
    text = detach_message(stages, Path("drums.distill"), finished=2)
    assert "distill jobs cancel j-c  (prior)" in text and "cancelled with it" not in text


@pytest.mark.parametrize(("args", "expected"), [
    (["train", "x", "--stage", "decoder"], "unknown stage 'decoder'"),
    (["train", "--stage", "vqvae"], "give SOURCE"),
    (["train", "x", "--vqvae", "j-1"], "--vqvae goes with --stage prior"),
    # before the folder is uploaded (it was, and a preprocess job nothing used was submitted)
    (["train", "x", "--stage", "prior"], "--stage prior needs --vqvae"),
])  # fmt: skip
def test_train_argument_errors(args: list[str], expected: str) -> None:
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 1 and expected in out.stderr and "Traceback" not in out.stderr


def test_progress_line_drops_the_brokers_run_stamp() -> None:
    event = {"type": "progress", "fraction": 0.5, "file": "a.wav", "epoch": 3, "reason": None,
             "broker_epoch": "b7f20ad9166c75aa"}
    line = train_line(event)
    assert line is not None and "file=a.wav" in line and "epoch=3" in line
    assert "b7f20ad9" not in line and "None" not in line


def test_jobs_watch_off_a_terminal_ends_on_the_bar_whatever_order_the_last_events_come_in(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """The worker's last progress event and its last metrics row reach the broker by two
    sockets, in either order. Off a terminal only the last line of a burst is written, and a
    row that came after the 100% event wrote no bar at all (a flaky CLI test saw it)."""
    import contextlib

    from distill.shared.bus.jobs import JobsClient
    from distill.shared.cli import jobs as cli_jobs

    progress = [{"type": "progress", "fraction": f, "step": s} for f, s in ((0.33, 1), (1.0, 3))]
    row = {"type": "metrics", "step": 3, "value": 2}
    for events in (progress + [row], [progress[0], row, progress[1]]):
        def follow(self: Any, job_id: str, on_event: Any, _events: Any = events) -> dict[str, Any]:
            for event in _events:
                on_event(event)
            return {"status": "succeeded"}

        monkeypatch.setattr(JobsClient, "follow", follow)
        monkeypatch.setattr(cli_jobs, "client", lambda broker: contextlib.nullcontext(None))
        cli_jobs.watch_job(None, "j-1")
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].count("100.0%") == 1, err


@pytest.mark.slow  # waits out the client's grace (seconds)
def test_train_without_a_broker_says_so_before_uploading(tmp_path: Path) -> None:
    """Before: the first upload request waited out the client's 60-s timeout (65 s in all)."""
    from tests.conftest import free_port_block

    sounds = tmp_path / "sounds"
    sounds.mkdir()
    sf.write(sounds / "tone.wav", np.zeros(4800, dtype=np.float32), 48000)
    out = CliRunner().invoke(app, ["train", str(sounds), "-o", str(tmp_path / "m.distill"),
                                   "--broker", f"tcp://127.0.0.1:{free_port_block()}"])  # fmt: skip
    assert out.exit_code == 1 and "nothing accepts connections there" in out.output, out.output
    assert "uploading" not in out.output  # the probe, not an upload, found it missing
