"""distill.infer through a real broker and worker: upload, decode twice, a bad request, recovery,
a generate job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill.shared.audio.export import read_export_metadata
from distill.shared.bus.artifacts import ArtifactClient
from distill.shared.bus.cache import ArtifactCache
from distill.shared.bus.jobs import JobsClient
from distill.shared.errors import BAD_REQUEST, RequestError
from distill.shared.model.modelfile import save_model
from tests.conftest import Cluster
from tests.workers.test_infer import Q, tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_requests_through_the_broker(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    cluster.start_worker("infer")
    path = tmp_path / "tiny.distill"
    model_id = save_model(path, tiny_model())
    with cluster.client(timeout_s=60) as c:
        sha = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache")).put_file(
            path, kind="model", name=path.name
        )
        codes = np.random.default_rng(0).integers(0, 16, (Q, 30))
        first = c.request("distill.infer", {"op": "decode", "model": sha, "codes": codes})
        assert first["model_id"] == model_id and first["audio"].dtype == np.float32
        with pytest.raises(RequestError, match="levels") as info:
            c.request("distill.infer", {"op": "decode", "model": sha, "codes": codes[:2]})
        assert info.value.code == BAD_REQUEST
        again = c.request("distill.infer", {"op": "decode", "model": sha, "codes": codes})
        assert np.array_equal(again["audio"], first["audio"])
        gen = c.request("distill.infer", {"op": "generate", "model": sha, "count": 2,
                                          "seconds": 0.2, "seed": 1})  # fmt: skip
        assert gen["audio"].shape[0] == 2 and np.isfinite(gen["audio"]).all()


def test_a_reply_or_request_too_large_to_travel_is_an_error_that_says_so(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Before: a reply over the 16 MiB a message carries (16 sounds of 6 s) made the broker
    drop the worker, give the request to the next one three times and answer worker_lost; a
    request that large timed out without a word."""
    cluster.start_broker()
    cluster.start_worker("infer")
    path = tmp_path / "tiny.distill"
    save_model(path, tiny_model())
    with cluster.client(timeout_s=120) as c:
        sha = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache")).put_file(
            path, kind="model", name=path.name
        )
        # refused before the work now (it was drawn and decoded first)
        with pytest.raises(RequestError, match=r"16 sounds of 6 s make a reply of 1[789]\.\d MiB, "
                                               r"over the 15\.8 MiB") as info:  # fmt: skip
            c.request("distill.infer", {"op": "generate", "model": sha, "count": 16,
                                        "seconds": 6.0, "quality": "preview"})  # fmt: skip
        assert info.value.code == BAD_REQUEST and "submit a generate job" in str(info.value)
        audio = np.zeros(48000 * 90, dtype=np.float32)  # 90 s: 16.5 MiB
        with pytest.raises(RequestError, match="the request to 'distill.infer' carries 16.5 MiB"):
            c.request("distill.infer", {"op": "encode", "model": sha, "audio": audio,
                                        "sample_rate": 48000})  # fmt: skip
        again = c.request("distill.infer", {"op": "generate", "model": sha, "count": 1,
                                            "seconds": 0.2, "seed": 1})  # fmt: skip
        assert again["audio"].shape[0] == 1  # the same worker, still serving
        assert len(c.workers()["workers"]) == 1


def test_a_generate_job_stores_each_sound_from_its_file_and_leaves_none(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A job writes each sound to a file in the worker's temporary folder as it is decoded and
    stores them from there (put_file) once all are made; the folder goes with the job."""
    cluster.start_broker()
    spool = tmp_path / "worker-tmp"
    spool.mkdir()
    cluster.start_worker("infer", env={"TMPDIR": str(spool)})
    path = tmp_path / "tiny.distill"
    model_id = save_model(path, tiny_model())
    with cluster.client(timeout_s=60) as c:
        store = ArtifactClient(c, cache=ArtifactCache(tmp_path / "cache"))
        sha = store.put_file(path, kind="model", name=path.name)
        jobs = JobsClient(c)
        job = jobs.submit("distill.infer", {"op": "generate", "model": sha, "count": 5,
                                            "seconds": 0.3, "seed": 2, "quality": "preview",
                                            "format": "flac"})  # fmt: skip
        record = jobs.wait(job["id"], timeout_s=120)
        assert record["status"] == "succeeded", record.get("error")
        sounds = record["result"]["sounds"]
        assert [s["name"] for s in sounds] == [f"gen-2-{i:03d}.flac" for i in range(5)]
        stored = {a["sha256"] for a in store.list(kind="audio", job=job["id"])}
        assert stored == {s["artifact"] for s in sounds}
        out = store.download(sounds[4]["artifact"], tmp_path / sounds[4]["name"])
        meta = read_export_metadata(out)
        assert meta.model_id == model_id and meta.data["index"] == 4 and meta.data["count"] == 5
    assert not list(spool.glob("distill-generate-*"))
