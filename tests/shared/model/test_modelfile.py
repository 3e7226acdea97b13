"""The .distill file: round trips, and one clear error for each way a file can be wrong."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import soundfile as sf
import torch
from safetensors.torch import load as tensors_from_bytes

from distill.shared.audio.mel import MelConfig
from distill.shared.model.modelfile import (
    FORMAT_VERSION,
    METADATA_KEY,
    DistillModel,
    ModelFileCorrupt,
    ModelFileEmpty,
    ModelFileError,
    ModelFileIncomplete,
    ModelFileMissing,
    ModelFileTampered,
    ModelFileTooNew,
    ModelFileTruncated,
    NotADistillModel,
    NotSafetensors,
    describe_model,
    header_sha256,
    load_model,
    read_model_file,
    save_model,
    write_model_file,
)
from distill.shared.model.prior import Prior, PriorConfig
from distill.shared.model.sampling import SamplingParams, sample
from distill.shared.model.vqvae import VQVAE, VQVAEConfig

torch.set_num_threads(1)

SUMMARY = {"dataset_id": "ds-1", "manifest_sha256": "00" * 32, "files": ["a.wav", "b.wav"],
           "epochs": 3, "metrics": {"val_l1": 0.5}, "baselines": {"unigram_bits": 7.9}}  # fmt: skip


def _header() -> dict[str, Any]:
    return {"kind": "test", "configs": {"mel": {"n_mels": 8}}, "summary": SUMMARY}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {"vqvae.w": base, "vqvae.view": base[:, :3],  # a non-contiguous view sharing memory
            "vqvae.codes": torch.arange(5), "prior.flag": torch.tensor(True),
            "prior.half": torch.randn(3, generator=g).to(torch.bfloat16)}  # fmt: skip


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.distill"
    write_model_file(path, _header(), _tensors())
    return path


def test_raw_round_trip(model_file: Path) -> None:
    raw = read_model_file(model_file)
    for name, t in _tensors().items():
        assert raw.tensors[name].dtype == t.dtype and torch.equal(raw.tensors[name], t)
    assert raw.header["kind"] == "test" and raw.header["summary"] == SUMMARY
    assert raw.header["format_version"] == FORMAT_VERSION
    assert set(raw.header["versions"]) == {"distill", "torch", "vector-quantize-pytorch",
                                           "safetensors"}  # fmt: skip
    assert raw.model_id == raw.header["header_sha256"] == header_sha256(raw.header)
    assert set(raw.tensors_with_prefix("prior")) == {"flag", "half"}


def test_same_model_same_bytes_and_id(tmp_path: Path, model_file: Path) -> None:
    again = tmp_path / "again.distill"
    model_id = write_model_file(again, _header(), _tensors())
    assert again.read_bytes() == model_file.read_bytes()
    assert model_id == read_model_file(model_file).model_id
    other = write_model_file(tmp_path / "other.distill", _header(),
                             {**_tensors(), "vqvae.codes": torch.arange(1, 6)})  # fmt: skip
    assert other != model_id
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_writer_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="prefix"):
        write_model_file(tmp_path / "m.distill", _header(), {"w": torch.zeros(1)})
    with pytest.raises(Exception, match="'summary'"):
        write_model_file(tmp_path / "m.distill", {"kind": "x", "configs": {}}, _tensors())
    with pytest.raises(Exception, match="written by write_model_file"):
        write_model_file(tmp_path / "m.distill", {**_header(), "format_version": 9}, _tensors())
    assert not (tmp_path / "m.distill").exists()


def _expect(path: Path, cls: type[ModelFileError], match: str) -> None:
    with pytest.raises(cls, match=match) as e:
        read_model_file(path)
    assert path.name in str(e.value) and e.value.reason == cls.reason


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.distill", ModelFileMissing, "no such file")
    (tmp_path / "dir.distill").mkdir()
    _expect(tmp_path / "dir.distill", ModelFileMissing, "a folder, not a model file")
    (tmp_path / "empty.distill").write_bytes(b"")
    _expect(tmp_path / "empty.distill", ModelFileEmpty, "empty")


def test_wav_renamed_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "song.distill"
    sf.write(path, np.zeros(4800), 48000, format="WAV")
    _expect(path, NotSafetensors, "not a safetensors file")
    path.write_bytes(b"\x01")
    _expect(path, NotSafetensors, "not a safetensors file")


def test_foreign_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "other.distill"
    safetensors.torch.save_file({"weight": torch.zeros(3)}, path)
    _expect(path, NotADistillModel, "without a Distill header")
    safetensors.torch.save_file({"weight": torch.zeros(3)}, path,
                                metadata={METADATA_KEY: json.dumps({"format": "other"})})  # fmt: skip
    _expect(path, NotADistillModel, "format is not")


def test_truncated_at_several_points(tmp_path: Path, model_file: Path) -> None:
    data = model_file.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    cut_path = tmp_path / "cut.distill"
    for cut in (4, 9, 8 + size // 2, 8 + size, 8 + size + 3, len(data) - 1):
        cut_path.write_bytes(data[:cut])
        error = NotSafetensors if cut < 9 else ModelFileTruncated
        _expect(cut_path, error, "truncated" if cut >= 9 else "not a safetensors")


def _tensor_span(data: bytes, name: str) -> tuple[int, int]:
    (size,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_flipped_byte_in_a_tensor_names_it(tmp_path: Path, model_file: Path) -> None:
    data = bytearray(model_file.read_bytes())
    start, _ = _tensor_span(bytes(data), "vqvae.codes")
    data[start] ^= 0x01
    model_file.write_bytes(bytes(data))
    _expect(model_file, ModelFileTampered, "tensor 'vqvae.codes' does not match its checksum")


def _rewrite_header(path: Path, change: Any) -> None:
    """Re-saves the file with the Distill header passed through ``change`` (no new checksum)."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY])
    change(header)
    safetensors.torch.save_file(tensors_from_bytes(data), path,
                                metadata={METADATA_KEY: json.dumps(header)})  # fmt: skip


def test_edited_header_is_tampering(model_file: Path) -> None:
    _rewrite_header(model_file, lambda h: h["summary"].update(epochs=300))
    _expect(model_file, ModelFileTampered, "header's checksum")


def test_edited_header_bytes_are_corrupt(model_file: Path) -> None:
    data = model_file.read_bytes()
    assert data.count(b'\\"epochs\\":3') == 1
    model_file.write_bytes(data.replace(b'\\"epochs\\":3', b'\\"epochs\\":4'))  # in place
    _expect(model_file, ModelFileTampered, "header's checksum")
    model_file.write_bytes(data.replace(b'{"__metadata__"', b'["__metadata__"', 1))
    _expect(model_file, NotSafetensors, "not a safetensors")
    model_file.write_bytes(data.replace(b'"__metadata__":{', b'"__metadata__"{{', 1))
    _expect(model_file, ModelFileCorrupt, "header is not JSON")


def test_newer_version_says_upgrade(model_file: Path) -> None:
    _rewrite_header(model_file, lambda h: h.update(format_version=FORMAT_VERSION + 1))
    _expect(model_file, ModelFileTooNew, "upgrade Distill")


def test_missing_key_and_missing_tensor(tmp_path: Path, model_file: Path) -> None:
    def drop_key(h: dict[str, Any]) -> None:
        del h["summary"]
        h["header_sha256"] = header_sha256(h)

    _rewrite_header(model_file, drop_key)
    _expect(model_file, ModelFileIncomplete, "lacks \\['summary'\\]")

    path = tmp_path / "fewer.distill"
    write_model_file(path, _header(), _tensors())
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + size])["__metadata__"]
    tensors = tensors_from_bytes(data)
    del tensors["prior.flag"]
    safetensors.torch.save_file(tensors, path, metadata=meta)
    _expect(path, ModelFileIncomplete, "tensors missing: \\['prior.flag'\\]")


# --- the typed layer ------------------------------------------------------------------------------


def _tiny_model() -> DistillModel:
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=16, latent_dim=8, blocks=1, codebook_size=16, levels=2))
    prior = Prior(PriorConfig(levels=2, codebook_size=16, embed_dim=8, hidden=16, layers=1,
                              prev_codes=True, earlier_codes=1, cache_decay=0.7))  # as sized  # fmt: skip
    return DistillModel(mel_config=MelConfig(), vqvae=vqvae.eval(), prior=prior.eval(),
                        summary=SUMMARY)  # fmt: skip


def test_typed_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "tiny.distill"
    model_id = save_model(path, model)
    loaded = load_model(path)
    assert loaded.model_id == model_id and loaded.summary == SUMMARY
    assert loaded.mel_config == model.mel_config
    assert loaded.vqvae.config == model.vqvae.config and loaded.prior is not None
    assert not loaded.vqvae.training and not loaded.prior.training
    codes = torch.randint(0, 16, (2, 2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.vqvae.decode_codes(codes), model.vqvae.decode_codes(codes))
        mel = torch.randn(1, 128, 24, generator=torch.Generator().manual_seed(2))
        assert torch.equal(loaded.vqvae.encode(mel), model.vqvae.encode(mel))
        assert torch.equal(loaded.prior(codes).logits, model.prior(codes).logits)
    for name, t in model.vqvae.state_dict().items():
        assert torch.equal(loaded.vqvae.state_dict()[name], t), name
    params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95, seed=3)
    drawn = [sample(m, batch=2, steps=20, params=params) for m in (model.prior, loaded.prior)]
    assert torch.equal(drawn[0], drawn[1])


def test_typed_without_prior(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "vq.distill"
    save_model(path, DistillModel(model.mel_config, model.vqvae, None, {}))
    loaded = load_model(path)
    assert loaded.prior is None and loaded.kind == "vqvae"


def test_typed_missing_weights(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "m.distill"
    header = {"kind": "vqvae+prior", "summary": {},
              "configs": {"mel": model.mel_config.to_dict(), "vqvae": model.vqvae.config.to_dict(),
                          "prior": model.prior.config.to_dict() if model.prior else None}}  # fmt: skip
    tensors = {f"vqvae.{k}": v for k, v in model.vqvae.state_dict().items()}
    write_model_file(path, header, tensors)  # consistent checksums, but no prior weights
    with pytest.raises(ModelFileIncomplete, match="prior weights missing"):
        load_model(path)
    write_model_file(path, {**header, "configs": {"mel": header["configs"]["mel"]}}, tensors)
    with pytest.raises(ModelFileIncomplete, match="no 'vqvae' config"):
        load_model(path)


def test_a_setting_of_a_newer_distill_says_upgrade(tmp_path: Path) -> None:
    """Before: "the 'vqvae' config is invalid: VQVAEConfig: unknown keys [...]" (an older
    Distill reading a model whose RVQ-VAE config had gained settings said no more)."""
    model = _tiny_model()
    path = tmp_path / "newer.distill"
    header = {"kind": "vqvae+prior", "summary": {},
              "configs": {"mel": model.mel_config.to_dict(),
                          "vqvae": {**model.vqvae.config.to_dict(), "warp": 2},
                          "prior": model.prior.config.to_dict() if model.prior else None}}  # fmt: skip
    write_model_file(path, header, {f"vqvae.{k}": v for k, v in model.vqvae.state_dict().items()})
    with pytest.raises(ModelFileTooNew, match="its 'vqvae' config holds settings this Distill "
                                              "does not know \\(warp\\): it was written by a "
                                              "newer Distill; upgrade Distill to read it"):  # fmt: skip
        load_model(path)


def test_describe_model(tmp_path: Path) -> None:
    model = _tiny_model()
    path = tmp_path / "tiny.distill"
    save_model(path, model)
    rows = dict(describe_model(read_model_file(path)))
    assert rows["model id"] == read_model_file(path).model_id
    assert rows["rvq-vae"].startswith("2 levels x 16 codes, 16 channels")
    assert rows["prior"].startswith("LSTM 1 x 16")
    assert rows["files"] == "2: a.wav, b.wav" and rows["epochs"] == "3"
    assert "torch" in rows["written with"]
    in_memory = dict(describe_model(model))
    assert in_memory["model id"] == "(not saved)" and in_memory["rvq-vae"] == rows["rvq-vae"]
    # a model whose files all trained holds no validation files: said, not "0: "
    trained_on_all = dataclasses.replace(model, summary={"val_files": [], "sampling": {}})
    rows = dict(describe_model(trained_on_all))
    assert rows["val_files"] == "none" and rows["sampling"] == "none"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in describe_model(model))
