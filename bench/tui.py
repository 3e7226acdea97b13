"""The UI under a flood of events: a real broker, a publisher sending training events at a
fixed rate (1000/s by default) through it, and the app (headless, ``run_test``) following that
job on the training screen. Printed beside the same app with no event load, in the same run:

- events taken in: the share of published events the app's subscription received, and the
  share it handed to its screens (the rest were coalesced away: at most 500 per 50 ms tick);
- redraws per second: frames the app painted while a 60 Hz probe asked for one each tick
  (the event loop's room left for the screen; Textual paints at most 60 frames per second);
- metric rows: every row the job record holds is on the training screen's curves.

    python bench/tui.py [--rate 1000] [--seconds 5]
    python bench/tui.py --edit      # the code editor's coarse preview: edit -> sound, round trip

The ``--edit`` figure uses a default-sized RVQ-VAE (256 codes × 4 levels) with random weights
(the cost of a decode does not depend on training) behind a real broker and infer worker.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port_block, spawn, stop, wait_for  # noqa: E402

from distill.shared.bus import protocol as P  # noqa: E402
from distill.shared.bus.client import Client  # noqa: E402
from distill.shared.bus.codec import pack  # noqa: E402
from distill.shared.bus.core import events_endpoint  # noqa: E402
from distill.shared.errors import RequestTimeout  # noqa: E402

PROBE_HZ = 60.0
LEVELS, CODES = 4, 256  # a usage heatmap of a mid-sized model rides on each metrics row
METRICS_EVERY = 50  # one metrics row per 50 events (20 rows/s at 1000 events/s)


def publish(endpoint: str, rate: float, seconds: float, job: str) -> int:
    """Send progress events (and a metrics row every METRICS_EVERY) at ``rate`` per second,
    as a worker does: PUB into the broker's events-in port."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)
    pub.connect(events_endpoint(endpoint, "in"))
    time.sleep(0.5)  # PUB/SUB join: let the connection settle before counting
    usage = [[float((c * 7 + q) % 13) for c in range(CODES)] for q in range(LEVELS)]
    start, sent = time.monotonic(), 0
    topic = f"job.{job}".encode()
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * rate)
        while sent < due:
            sent += 1
            if sent % METRICS_EVERY == 0:
                row = {"epoch": sent // METRICS_EVERY, "epochs": 10**6, "train_recon": 1.0 / sent,
                       "val_recon": 1.2 / sent, "utilisation": [0.5] * LEVELS,
                       "perplexity": [30.0] * LEVELS, "usage": usage, "eta_s": 10.0}
                event: dict[str, Any] = {"type": "metrics", "job": job, "row": row}
            else:
                event = {"type": "progress", "job": job, "fraction": 0.5, "epoch": 1, "eta_s": 10.0}
            pub.send_multipart([topic, pack(event)])
        time.sleep(0.002)
    pub.close(linger=2000)
    ctx.term()
    return sent


async def measure(endpoint: str, seconds: float, rate: float, job: str) -> dict[str, float]:
    """Run the app on the training screen for ``seconds``; publish at ``rate`` (0: no load)."""
    from textual.widgets import Static

    from distill.tui.app import DistillApp

    app = DistillApp(endpoint)
    frames = 0
    async with app.run_test(size=(160, 48)) as pilot:
        await app.open_training(job)
        probe = Static("probe", id="bench-probe")
        await app.screen.mount(probe)
        original = app._display

        def counting_display(screen: Any, renderable: Any) -> None:
            nonlocal frames
            frames += 1
            original(screen, renderable)

        app._display = counting_display  # type: ignore[method-assign]
        ticks = 0

        def tick() -> None:
            nonlocal ticks
            ticks += 1
            probe.update(f"probe {ticks}")

        await pilot.pause(1.5)  # subscription up, history loaded
        received0, delivered0 = app.link.events.received, app.events_delivered
        app.set_interval(1.0 / PROBE_HZ, tick)
        frames = 0
        publisher = None
        if rate > 0:
            publisher = asyncio.get_running_loop().run_in_executor(None, publish, endpoint, rate,
                                                                   seconds, job)
            await asyncio.sleep(0.5)  # the publisher's join delay
        start = time.monotonic()
        frames = 0
        await asyncio.sleep(seconds)
        elapsed = time.monotonic() - start
        drawn = frames
        sent = 0
        if publisher is not None:
            sent = await publisher
            await pilot.pause(1.0)  # the last events drain
        screen = app.screen
        rows = len(getattr(screen, "rows", []))
        return {"redraws_per_s": drawn / elapsed, "sent": sent,
                "received": app.link.events.received - received0,
                "delivered": app.events_delivered - delivered0,
                "rows_on_screen": rows}


def edit_latency(endpoint: str, tmp: Path, sound_s: float = 2.0, edits: int = 20) -> list[float]:
    """Seconds per ``edit`` request (set one cell, get the coarse preview), as the editor sends it."""
    import numpy as np
    import torch

    from distill.shared.audio.mel import MelConfig
    from distill.shared.bus.artifacts import ArtifactClient
    from distill.shared.bus.cache import ArtifactCache
    from distill.shared.model.codes import CodeGrid, EditSession
    from distill.shared.model.modelfile import DistillModel, save_model
    from distill.shared.model.prior import Prior, PriorConfig
    from distill.shared.model.vqvae import VQVAE, VQVAEConfig

    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(codebook_size=256, levels=4)).eval()
    prior = Prior(PriorConfig(levels=4, codebook_size=256)).eval()
    path = tmp / "bench.distill"
    save_model(path, DistillModel(mel_config=MelConfig(), vqvae=vqvae, prior=prior, summary={}))
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(int(48000 * sound_s)) * 0.1).astype(np.float32)
    times = []
    with Client(endpoint, timeout_s=120) as c:
        model = ArtifactClient(c, cache=ArtifactCache(tmp / "cache")).put_file(path, kind="model", name="b")
        codes = c.request("distill.infer", {"op": "encode", "model": model, "audio": audio,
                                            "sample_rate": 48000})["codes"]
        session = EditSession(CodeGrid(codes, 256)).to_dict()
        c.request("distill.infer", {"op": "edit", "model": model, "session": session,
                                    "action": "none"})  # the model loaded once
        for i in range(edits):
            edit = {"op": "set_cell", "level": i % 4, "t": i % codes.shape[1], "code": i % 256}
            start = time.perf_counter()
            reply = c.request("distill.infer", {"op": "edit", "model": model, "session": session,
                                                "action": "apply", "edit": edit, "quality": "preview"})
            times.append(time.perf_counter() - start)
            session = reply["session"]
    return times


def main_edit(tmp: Path) -> None:
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")], tmp / "broker.log")
    # one thread, as `distill up` gives each of its workers here: on all cores a loaded machine
    # made an edit take 0.6-0.8 s instead of 30 ms
    worker = spawn(["worker", "infer", "--broker", endpoint, "--device", "cpu", "--threads", "1"],
                   tmp / "worker.log")  # fmt: skip
    try:
        with Client(endpoint, timeout_s=0.5) as c:
            wait_for(lambda: _answers(c), 30)
            wait_for(lambda: bool(c.mmi_service("distill.infer")), 60)
        times = sorted(edit_latency(endpoint, tmp))
    finally:
        stop(worker)
        stop(broker)
    print("code editor: one edit -> coarse preview (2 s sound, 256 codes × 4 levels, CPU worker)")
    print(f"  median {1000 * times[len(times) // 2]:.0f} ms   best {1000 * times[0]:.0f} ms   "
          f"worst {1000 * times[-1]:.0f} ms over {len(times)} edits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--edit", action="store_true", help="measure the editor's preview round trip")
    args = parser.parse_args()
    if args.edit:
        with tempfile.TemporaryDirectory(prefix="bench-tui-edit-") as folder:
            main_edit(Path(folder))
        return
    with tempfile.TemporaryDirectory(prefix="bench-tui-") as folder:
        main_load(args, Path(folder))


def main_load(args: argparse.Namespace, tmp: Path) -> None:
    port = free_port_block()
    endpoint = f"tcp://127.0.0.1:{port}"
    broker = spawn(["broker", "--port", str(port), "--data-dir", str(tmp / "broker")], tmp / "broker.log")
    try:
        with Client(endpoint, timeout_s=0.5) as c:
            wait_for(lambda: _answers(c), 30)
            job = c.request(P.SERVICE_JOBS, {"op": "submit", "service": "distill.bench.none",
                                             "params": {}})["id"]
        idle = asyncio.run(measure(endpoint, args.seconds, 0.0, job))
        loaded = asyncio.run(measure(endpoint, args.seconds, args.rate, job))
    finally:
        stop(broker)
    sent = int(loaded["sent"])
    rows_sent = sent // METRICS_EVERY
    print(f"UI under {args.rate:g} events/s for {args.seconds:g} s (training screen following one job)")
    print(f"  redraws/s   no load {idle['redraws_per_s']:6.1f}   loaded {loaded['redraws_per_s']:6.1f}"
          f"   ratio {loaded['redraws_per_s'] / max(idle['redraws_per_s'], 1e-9):.2f}   (goal >= 20/s)")
    print(f"  events      sent {sent}   received {loaded['received']:.0f} "
          f"({100 * loaded['received'] / sent:.1f}%)   handed to screens {loaded['delivered']:.0f} "
          f"({100 * loaded['delivered'] / sent:.1f}%)")
    print(f"  metric rows sent {rows_sent}   on the training screen {loaded['rows_on_screen']:.0f}")


def _answers(c: Client) -> bool:
    try:
        c.mmi_service("echo")
        return True
    except RequestTimeout:
        c.close()
        return False


if __name__ == "__main__":
    main()
