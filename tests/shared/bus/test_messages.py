from __future__ import annotations

import pytest

from distill.shared.bus.codec import pack
from distill.shared.bus.messages import JobDispatch, JobSubmit, Reply, WorkerMeta
from distill.shared.errors import DecodeError


def test_round_trip_and_defaults() -> None:
    d = JobDispatch(id="j-1", service="s", params={"a": [1, 2]}, attempt=2, deps={"j-0": {"x": 1}})
    assert JobDispatch.decode(d.encode()) == d
    assert JobSubmit.from_map({"service": "x"}) == JobSubmit(service="x")
    assert WorkerMeta.decode(pack({"host": "h", "pid": 3, "extra": "kept elsewhere"})).pid == 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({}, "missing field 'service'"),
        ({"service": 3}, "field 'service'"),
        ({"service": "x", "depends_on": ["a", 2]}, "field 'depends_on'"),
        ({"service": "x", "max_attempts": True}, "field 'max_attempts'"),
        ({"service": "x", "params": []}, "field 'params'"),
    ],
)
def test_schema_errors_name_the_field(data: dict, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        JobSubmit.from_map(data)


def test_reply_shapes() -> None:
    assert Reply.success({"v": 1}).to_map() == {"ok": True, "result": {"v": 1}}
    fail = Reply.failure("JobCancelled", "stop", cancelled=True).to_map()
    assert fail == {"ok": False, "error": {"code": "JobCancelled", "message": "stop"}, "cancelled": True}
    with pytest.raises(DecodeError, match="must be a map"):
        Reply.decode(pack([1]))
