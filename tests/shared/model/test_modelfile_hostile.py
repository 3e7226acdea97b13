""".distill files made by someone else: every malformed or hostile file is refused as one
ModelFileError naming the file (never a traceback), before it costs memory, and nothing it holds
reaches the terminal unescaped. One test per class of finding of the hostile-file audit
(s23/files FINDINGS.md 6, 10-13, 18-21); each crafts its files here. A checksum proves nothing
about such a file (anyone can recompute one), so most files here are forged with consistent
checksums."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from typer.testing import CliRunner

from distill.shared.audio.mel import MelConfig
from distill.shared.cli.main import app
from distill.shared.errors import ModelFormatError
from distill.shared.model.formats import weights_from_bytes, weights_to_bytes
from distill.shared.model.modelfile import (
    METADATA_KEY,
    DistillModel,
    ModelFileCorrupt,
    ModelFileError,
    ModelFileIncomplete,
    ModelFileTooNew,
    NotADistillModel,
    describe_model,
    header_sha256,
    load_model,
    read_model_file,
    save_model,
    tensor_sha256,
    write_model_file,
)
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.vqvae import VQVAE, VQVAEConfig
from tests.shared.model.test_modelfile import _header, _tensors, _tiny_model

torch.set_num_threads(1)

ESC = "\x1b[2J\x1b[31mRED\x1b]8;;http://evil.example/\x07link\x1b]8;;\x07\x1b]0;TITLE\x07\u202e"


def _expect(path: Path, cls: type[ModelFileError], match: str,
            read: Callable[[Path], Any] = load_model) -> ModelFileError:  # fmt: skip
    """``read(path)`` raises exactly ``cls``, one line naming the file and matching ``match``."""
    with pytest.raises(ModelFileError) as e:
        read(path)
    assert type(e.value) is cls, f"{type(e.value).__name__}: {e.value}"
    message = str(e.value)
    assert message.startswith(f"{path.name}: ") and "\n" not in message, message
    assert re.search(match, message), message
    return e.value


def _model_header(model: DistillModel) -> dict[str, Any]:
    prior = model.prior.config.to_dict() if model.prior is not None else None
    return {"kind": model.kind, "summary": {"epochs": 3},
            "configs": {"mel": model.mel_config.to_dict(), "vqvae": model.vqvae.config.to_dict(),
                        "prior": prior}}  # fmt: skip


def _model_tensors(model: DistillModel) -> dict[str, torch.Tensor]:
    tensors = {f"vqvae.{k}": v for k, v in model.vqvae.state_dict().items()}
    if model.prior is not None:
        tensors |= {f"prior.{k}": v for k, v in model.prior.state_dict().items()}
    return tensors


def _write(path: Path, model: DistillModel, configs: Callable[[dict[str, Any]], None] | None = None,
           tensors: dict[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """``model`` written with its configs passed through ``configs`` and its tensors replaced by
    ``tensors``: a forged file whose checksums all match."""
    header = _model_header(model)
    if configs is not None:
        configs(header["configs"])
    write_model_file(path, header, _model_tensors(model) if tensors is None else tensors)
    return path


def _forge(path: Path, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> Path:
    """``path`` re-written with its Distill header passed through ``change`` (after the tensor
    list), the header's checksum recomputed (``rehash``) as anyone can."""
    raw = read_model_file(path)
    header = json.loads(json.dumps(raw.header))
    header["tensors"] = {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                             "sha256": tensor_sha256(t)} for n, t in raw.tensors.items()}  # fmt: skip
    change(header)
    if rehash:
        header["header_sha256"] = header_sha256(header)
    text = json.dumps(header, allow_nan=True)
    safetensors.torch.save_file(dict(raw.tensors), path, metadata={METADATA_KEY: text})
    return path


@contextlib.contextmanager
def _address_space(extra_bytes: int) -> Iterator[None]:
    """This process may map at most ``extra_bytes`` more while inside (Linux): a refusal that
    came only after building what a file asks for fails here instead of taking the machine."""
    resource = pytest.importorskip("resource")
    statm = Path("/proc/self/statm")
    if not statm.exists():
        pytest.skip("needs /proc/self/statm")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(statm.read_text().split()[0]) * resource.getpagesize() + extra_bytes
    if hard != resource.RLIM_INFINITY and limit > hard:
        pytest.skip("the address-space limit is already lower")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- 6: configs whose modules would take GB, refused before anything is built ---------------------


def _deep_model() -> DistillModel:
    """Tiny, with the keys of a big model: 16 residual blocks a side, an 8-layer LSTM."""
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=4, latent_dim=4, blocks=16, codebook_size=16, levels=2))
    prior = Prior(PriorConfig(levels=2, codebook_size=16, embed_dim=4, hidden=4, layers=8))
    return DistillModel(MelConfig(), vqvae.eval(), prior.eval(), {})


def _huge(configs: dict[str, Any]) -> None:
    """Every value within its bound: ~4.3 GB of RVQ-VAE and ~4.3 GB of prior once built."""
    configs["vqvae"].update(channels=1024, latent_dim=1024, kernel_size=31)
    configs["prior"].update(embed_dim=4096, hidden=4096)


def test_a_config_asking_for_gigabytes_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """Before: the modules were built (allocated and initialised: 4.8 GB for one RVQ-VAE
    config, ~25 GB for a prior config) and only then compared with the stored weights."""
    model = _deep_model()
    path = _write(tmp_path / "huge.distill", model, _huge)
    weights = weights_to_bytes(model.vqvae, MelConfig())
    payload = torch.load(io.BytesIO(weights), weights_only=True)
    payload["model_config"].update(channels=1024, latent_dim=1024, kernel_size=31)
    buf = io.BytesIO()
    torch.save(payload, buf)
    load_model(_write(tmp_path / "warm.distill", model))  # lazy imports and caches, not timed
    fit = r"weights do not fit the configs: tensor 'vqvae\.encoder\.net\.0\.weight' is \[4, 128, 7\] in the file, the configs make it \[1024, 128, 7\] \(and \d+ more\)"  # fmt: skip
    with _address_space(1 << 30):  # a real build fails here at once
        _expect(path, ModelFileCorrupt, fit)
        _expect(path, ModelFileCorrupt, fit, lambda p: read_model_file(p, check_configs=True))
        out = CliRunner().invoke(app, ["model", "show", str(path)])
        with pytest.raises(ModelFormatError, match="do not match their config: tensor 'encoder"):
            weights_from_bytes(buf.getvalue())  # the RVQ-VAE artifact a prior job reads
    assert out.exit_code == 1 and "weights do not fit the configs" in out.stderr, out.stderr
    # the prior alone, and a layer count that adds weights the file lacks
    path = _write(tmp_path / "prior.distill", model, lambda c: c["prior"].update(hidden=4096))
    with _address_space(1 << 30):
        _expect(path, ModelFileCorrupt, r"tensor 'prior\.lstm\.weight_ih_l0' is \[16, 4\] in "
                                        r"the file, the configs make it \[16384, 4\]")  # fmt: skip
    path = _write(tmp_path / "layers.distill", _tiny_model(), lambda c: c["prior"].update(
        layers=8, hidden=4096, embed_dim=4096))  # fmt: skip
    with _address_space(1 << 30):
        _expect(path, ModelFileIncomplete, r"prior weights missing: \['lstm\.weight_ih_l1'")


# --- 10: the header and the file's size are checked before the tensors are read -----------------


def test_the_header_and_size_are_checked_before_the_tensors_are_read(tmp_path: Path) -> None:
    """Before: the whole file was read first: a sparse 3-GB file that is not a Distill model
    took 3.5 GB to be refused."""
    table = {"__metadata__": {METADATA_KEY: "{}"},
             "w": {"dtype": "F32", "shape": [500_000_000], "data_offsets": [0, 2_000_000_000]}}  # fmt: skip
    head = json.dumps(table).encode()
    path = tmp_path / "sparse.distill"
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + 2_000_000_000)  # sparse: no disk, 2 GB if read
    with _address_space(1 << 30):  # reading the 2 GB would fail under the limit
        _expect(path, NotADistillModel, "format is not 'distill-model'", read_model_file)
    # a Distill file one byte longer than its tensors: the size must be what the offsets say
    path = tmp_path / "longer.distill"
    write_model_file(path, _header(), _tensors())
    path.write_bytes(path.read_bytes() + b"\0")
    _expect(path, ModelFileCorrupt, "1 bytes after the tensors", read_model_file)


# --- 11: malformed containers and headers: one line, not a traceback -----------------------------


def _container(path: Path) -> tuple[dict[str, Any], bytes]:
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _with_container(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    container, body = _container(path)
    text = change(container)
    head = (text if isinstance(text, str) else json.dumps(container)).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + body)


def _offsets(value: Any) -> Callable[[dict[str, Any]], Any]:
    def change(c: dict[str, Any]) -> Any:
        c["vqvae.codes"]["data_offsets"][1] = value
        return json.dumps(c).replace('"INF"', "1e400")

    return change


def _meta(text: str) -> Callable[[dict[str, Any]], None]:
    return lambda c: c["__metadata__"].update({METADATA_KEY: text})


def _overlap(c: dict[str, Any]) -> None:
    entries = sorted((e for n, e in c.items() if n != "__metadata__"),
                     key=lambda e: e["data_offsets"])  # fmt: skip
    entries[1]["data_offsets"][0] -= 4  # into the first tensor's bytes


def _gap(c: dict[str, Any]) -> None:
    first = min((e for n, e in c.items() if n != "__metadata__"), key=lambda e: e["data_offsets"])
    first["data_offsets"][0] += 1


NESTED = "[" * 100_000 + "]" * 100_000  # deeper than json.loads can read


def _setting(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.update({key: value})


def _newer(versions: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header.update(format_version=2, versions=versions)


def _distill(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(c: dict[str, Any]) -> None:
        header = json.loads(c["__metadata__"][METADATA_KEY])
        change(header)
        c["__metadata__"][METADATA_KEY] = json.dumps(header, allow_nan=True)

    return edit


MALFORMED: dict[str, tuple[Callable[[dict[str, Any]], Any], type[ModelFileError], str]] = {
    "offset a string": (_offsets("abc"), ModelFileCorrupt, "data_offsets \\[\\d+, 'abc'\\]"),
    "offset null": (_offsets(None), ModelFileCorrupt, "data_offsets \\[\\d+, None\\]"),
    "offset a list": (_offsets([1]), ModelFileCorrupt, "data_offsets \\[\\d+, \\[1\\]\\]"),
    "offset infinite": (_offsets("INF"), ModelFileCorrupt, "safetensors header is not JSON"),
    "offset negative": (_offsets(-5), ModelFileCorrupt, "data_offsets \\[\\d+, -5\\]"),
    "offsets overlap": (_overlap, ModelFileCorrupt, "tensors '.*' and '.*' overlap"),
    "a gap": (_gap, ModelFileCorrupt, "1 bytes before tensor '.*' belong to no tensor"),
    "nested container": (lambda c: '{"a":' + NESTED + "}", ModelFileCorrupt, "nested too deeply"),
    "nested header": (_meta('{"format":"distill-model","x":' + NESTED + "}"), ModelFileCorrupt,
                      "Distill header is nested too deeply"),
    "NaN in the header": (_distill(_setting("loss", float("nan"))), ModelFileCorrupt,
                          "Distill header is not JSON \\(NaN"),
    "1e400 in the header": (_meta('{"format": "distill-model", "x": 1e400}'), ModelFileCorrupt,
                            "Distill header is not JSON \\(1e400 is out of range"),
    "newer, versions a string": (_distill(_newer("x")), ModelFileTooNew, "by Distill a newer version"),
    "newer, versions a list": (_distill(_newer([1])), ModelFileTooNew, "by Distill a newer version"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_container_or_header_is_one_line(tmp_path: Path, case: str) -> None:
    """Before: ValueError, TypeError, OverflowError, RecursionError and AttributeError
    tracebacks (int() of the offsets, json.loads' recursion, NaN in the checksum's JSON, a
    ``versions`` that is not a map)."""
    change, cls, match = MALFORMED[case]
    path = tmp_path / "m.distill"
    write_model_file(path, _header(), _tensors())
    _with_container(path, change)
    _expect(path, cls, match, read_model_file)
    out = CliRunner().invoke(app, ["model", "show", str(path)])
    assert out.exit_code == 1 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error: m.distill: "), out.stderr


# --- 12: forged (checksum-consistent) headers ---------------------------------------------------


def save_model_path(tmp_path: Path) -> Path:
    path = tmp_path / "m.distill"
    save_model(path, _tiny_model())
    return path


def test_a_forged_header_is_one_line(tmp_path: Path) -> None:
    """Before: an AttributeError for a tensor entry that is a string, a RecursionError in
    ``describe_model`` for a summary nested 500 deep."""
    path = save_model_path(tmp_path)
    _forge(path, lambda h: h["tensors"].update({"vqvae.mel_mean": "oops"}))
    _expect(path, ModelFileCorrupt, "entry for tensor 'vqvae.mel_mean' has no checksum")
    path = save_model_path(tmp_path)
    _forge(path, lambda h: h["summary"].update(deep=json.loads("[" * 500 + "]" * 500)))
    _expect(path, ModelFileCorrupt, "Distill header nests deeper than 64 levels")
    for summary in ([1, 2], "text"):  # not a map: describe_model read its items
        path = save_model_path(tmp_path)
        _forge(path, _setting("summary", summary))
        _expect(path, ModelFileCorrupt, "the header's 'summary' is not an object")
    # nesting within the bound still shows, cut short; in memory too, at any depth
    path = save_model_path(tmp_path)
    _forge(path, lambda h: h["summary"].update(deep=json.loads("[" * 60 + "]" * 60)))
    assert dict(describe_model(read_model_file(path)))["deep"] == "1: 1: 1: 1: ..."
    deep: list[Any] = []
    for _ in range(2000):  # deeper than json.loads reads
        deep = [deep]
    model = dataclasses.replace(_tiny_model(), summary={"deep": deep})
    assert dict(describe_model(model))["deep"] == "1: 1: 1: 1: ..."


# --- 13: strings from the file never reach the terminal as they are ---------------------------------


def test_show_escapes_every_string_from_the_file(tmp_path: Path) -> None:
    """Before: summary keys and values, files, sampling, versions went to the terminal raw (clear
    the screen, retitle the window, plant an OSC 8 link), and so did the writer's version in a
    newer file's error line."""
    path = save_model_path(tmp_path)

    def spoil(h: dict[str, Any]) -> None:
        h["summary"].update({"name": ESC, ESC: "key", "files": [ESC, "b.wav"],
                             "sampling": {"change_temperature": ESC}})  # fmt: skip
        h["versions"]["distill"] = ESC

    _forge(path, spoil)
    out = CliRunner().invoke(app, ["model", "show", str(path)], color=True)
    assert out.exit_code == 0, out.stderr
    for raw in ("\x1b", "\x07", "\u202e"):
        assert raw not in out.stdout
    escaped = "\\x1b[2J\\x1b[31mRED\\x1b]8;;http://evil.example/\\x07link"
    rows = {line.strip().split("  ", 1)[0]: line for line in out.stdout.splitlines()}
    assert escaped in rows["name"] and escaped in rows["files"] and escaped in rows["sampling"]
    assert escaped in rows["written with"] and "\\u202e" in rows["name"]
    # a key from the file, escaped and cut to the label column (it pushed every row right)
    assert any(key.startswith(escaped[:39]) and key.endswith("…") and len(key) == 40
               for key in rows)
    # a newer format's error line quotes versions.distill; a kind is quoted when refused
    for change, match in (
        (lambda h: h.update(format_version=2, versions={"distill": ESC}), "written by Distill"),
        (lambda h: h.update(kind=ESC), "kind"),
    ):  # fmt: skip
        path = save_model_path(tmp_path)
        _forge(path, change)
        out = CliRunner().invoke(app, ["model", "show", str(path)], color=True)
        assert out.exit_code == 1 and match in out.stderr, out.stderr
        assert "\\x1b[2J" in out.stderr
        for raw in ("\x1b]", "\x07", "\u202e", "\x1b[2J"):
            assert raw not in out.stderr


# --- 18: weights and a mel front end that load but cannot make sound -----------------------------


def test_non_finite_weights_and_a_mel_that_cannot_be_inverted_are_refused(tmp_path: Path) -> None:
    """Before: all three loaded (and `model show` showed them); generate then failed in
    torch.linalg.lstsq ("Argument 7 has illegal value", "does not have full rank")."""
    model = _tiny_model()
    tensors = _model_tensors(model)
    weight = tensors["vqvae.decoder.net.0.weight"]
    nan = {**tensors, "vqvae.decoder.net.0.weight": torch.full_like(weight, float("nan"))}
    n = weight.numel()
    _expect(_write(tmp_path / "nan.distill", model, tensors=nan), ModelFileCorrupt,
            rf"tensor 'vqvae\.decoder\.net\.0\.weight' holds {n} NaN values \(of {n}\)")  # fmt: skip
    inf = {n: t.clone().fill_(float("inf")) if n == "prior.head_bias" else t
           for n, t in tensors.items()}  # fmt: skip
    _expect(_write(tmp_path / "inf.distill", model, tensors=inf), ModelFileCorrupt,
            r"tensor 'prior\.head_bias' holds 32 infinite values")  # fmt: skip
    mel_std = tensors["vqvae.mel_std"].clone()
    mel_std[3], mel_std[5] = float("nan"), float("-inf")
    _expect(_write(tmp_path / "std.distill", model, tensors={**tensors, "vqvae.mel_std": mel_std}),
            ModelFileCorrupt, r"'vqvae\.mel_std' holds 1 NaN and 1 infinite values \(of 128\)")  # fmt: skip
    # 512-point frames at 48 kHz: 257 bins of 94 Hz for 128 bands, 13 of the low ones empty
    path = _write(tmp_path / "fft.distill", model,
                  lambda c: c["mel"].update(n_fft=512, hop_length=128))  # fmt: skip
    _expect(path, ModelFileCorrupt, "the 'mel' config cannot turn mel back into sound: at 48000 "
                                    "Hz, n_fft 512 gives 257 frequency bins")  # fmt: skip


# --- 19: configs that disagree with each other ----------------------------------------------------


def test_configs_that_disagree_with_each_other_are_refused(tmp_path: Path) -> None:
    """Before: each file's tensors fit its own configs, so all loaded; generate then failed
    ("negative dimension", "expected (..., 64, frames)") or drew codes 16..31 from 16-code
    codebooks."""
    model = _tiny_model()
    assert model.prior is not None
    for change, match in (
        ({"levels": 3}, "the 'prior' config draws 3 levels, the 'vqvae' config has 2"),
        ({"codebook_size": 32},
         "the 'prior' config draws from 32 codes \\(codebook_size\\), the 'vqvae' codebooks hold 16"),
    ):  # fmt: skip
        prior = Prior(dataclasses.replace(model.prior.config, **change)).eval()
        path = tmp_path / "prior.distill"
        save_model(path, dataclasses.replace(model, prior=prior))
        _expect(path, ModelFileCorrupt, "the configs disagree: " + match)
    path = _write(tmp_path / "mel.distill", model, lambda c: c["mel"].update(n_mels=64))
    _expect(path, ModelFileCorrupt, "the 'mel' config makes 64 mel bands \\(n_mels\\), the 'vqvae' "
                                    "config reads 128")  # fmt: skip
    path = _write(tmp_path / "kind.distill", model, lambda c: c.update(prior=None))
    _expect(path, ModelFileCorrupt, "kind 'vqvae\\+prior' does not match its configs")


# --- 20: an RVQ-VAE config that leaves its sizes unset ------------------------------------------


@pytest.mark.parametrize("setting", ["levels", "codebook_size"])
def test_an_unresolved_rvq_config_is_a_malformed_file(tmp_path: Path, setting: str) -> None:
    """Before: "VQVAE needs codebook_size and levels: call resolve_config first", a ConfigError
    without the file's name, in a developer's words."""
    path = _write(tmp_path / "m.distill", _tiny_model(),
                  lambda c: c["vqvae"].update({setting: None}))  # fmt: skip
    _expect(path, ModelFileCorrupt, f"malformed: the 'vqvae' config leaves {setting} unset")


# --- 21: stored dtypes are the model's -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.bool])
def test_a_tensor_of_another_dtype_is_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    """Before: int8, bool and float64 LSTM weights loaded, cast to float32 by load_state_dict."""
    model = _tiny_model()
    tensors = _model_tensors(model)
    tensors["prior.lstm.weight_ih_l0"] = tensors["prior.lstm.weight_ih_l0"].to(dtype)
    path = _write(tmp_path / "m.distill", model, tensors=tensors)
    name = str(dtype).removeprefix("torch.")
    _expect(path, ModelFileCorrupt, f"tensor 'prior\\.lstm\\.weight_ih_l0' holds {name} values, "
                                    "the model float32")  # fmt: skip
