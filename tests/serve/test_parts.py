"""The server's parts on their own: the batching policy, the pixel function, the options."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from transfer.errors import ConfigError, ImageDecodeError
from transfer.serve.batcher import Batcher, Overloaded
from transfer.options import make
from transfer.serve.serve_config import ServeConfig, key_matches


class Recorder:
    """predict(x): each image's mean pixel as its 'probability'; records the batch sizes."""

    def __init__(self, seconds=0.0):
        self.sizes = []
        self.seconds = seconds

    def __call__(self, x):
        self.sizes.append(len(x))
        time.sleep(self.seconds)
        return x.reshape(len(x), -1).mean(1, keepdims=True).astype(np.float32), self.seconds


def _img(v):
    return np.full((2, 2, 3), v, np.uint8)


def test_a_lone_request_does_not_wait_for_company():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=32, max_wait_s=0.5, capacity=8)
        b.start()
        t = time.perf_counter()
        with b.admit() as ticket:
            (r,) = await asyncio.gather(*ticket.submit([_img(7)]))
        dt = time.perf_counter() - t
        await b.stop()
        return r, dt, rec.sizes

    r, dt, sizes = asyncio.run(main())
    assert dt < 0.25 and sizes == [1] and float(r.probs[0]) == 7.0  # not held for max_wait_s = 0.5


def test_images_of_requests_being_prepared_join_the_batch():
    async def main():
        rec = Recorder()
        b = Batcher(rec, max_batch=4, max_wait_s=0.5, capacity=8)
        b.start()
        t1, t2, t3 = b.admit(), b.admit(), b.admit()  # three requests arrive; one decodes faster
        f1 = t1.submit([_img(1)])
        await asyncio.sleep(0.05)
        f2 = t2.submit([_img(2), _img(3)])
        await asyncio.sleep(0.05)
        f3 = t3.submit([_img(4), _img(5)])  # one more than fits
        res = await asyncio.gather(*f1, *f2, *f3)
        for t in (t1, t2, t3):
            t.close()
        await b.stop()
        return res, rec.sizes, b.in_flight

    res, sizes, in_flight = asyncio.run(main())
    assert sizes == [4, 1] and in_flight == 0
    assert [float(r.probs[0]) for r in res] == [1, 2, 3, 4, 5]  # each answer to its own image
    assert [r.batch_size for r in res] == [4, 4, 4, 4, 1]


def test_capacity_and_shutdown_refuse_at_once():
    async def main():
        b = Batcher(Recorder(), max_batch=2, max_wait_s=0.0, capacity=2)
        b.start()
        a, c = b.admit(), b.admit()
        with pytest.raises(Overloaded, match="full"):
            b.admit()
        a.close()
        d = b.admit()  # a place freed
        await b.stop()
        with pytest.raises(Overloaded, match="shutting down"):
            b.admit()
        with pytest.raises(Overloaded, match="shutting down"):
            d.submit([_img(1)])
        c.close(), d.close()

    asyncio.run(main())


def test_stop_finishes_queued_images_first():
    async def main():
        rec = Recorder(seconds=0.05)
        b = Batcher(rec, max_batch=1, max_wait_s=0.0, capacity=8)
        b.start()
        with b.admit() as t:
            futs = t.submit([_img(i) for i in range(3)])
            await asyncio.sleep(0)
            await b.stop()
            return [float(f.result().probs[0]) for f in futs]

    assert asyncio.run(main()) == [0, 1, 2]


def _run_two(b: "Batcher"):
    """Two requests one after the other: (the first's results or exceptions, the second's)."""
    async def main():
        b.start()
        with b.admit() as t:
            first = await asyncio.gather(*t.submit([_img(1), _img(2)]), return_exceptions=True)
        with b.admit() as t:
            second = await asyncio.gather(*t.submit([_img(3)]), return_exceptions=True)
        await b.stop()
        return first, second

    return asyncio.run(main())


class FailOnce:
    """Raises ``exc`` on its first call, then does what ``then`` does."""

    def __init__(self, then, exc=RuntimeError("boom")):
        self.then, self.exc, self.calls = then, exc, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return self.then(*args)


@pytest.mark.parametrize("stage", ["model", "stack", "answers", "on_batch"])
def test_a_batch_that_fails_anywhere_fails_only_itself(stage, caplog):
    """An exception while stacking, in the model, splitting its answers or in the on_batch callback
    answers every image of that batch with BatchFailed (naming the stage), and the next batch runs."""
    from transfer.serve.batcher import BatchFailed

    rec = Recorder()
    kw = {"stack": np.stack, "on_batch": None}
    predict = rec
    if stage == "model":
        predict = FailOnce(rec)
    elif stage == "stack":
        kw["stack"] = FailOnce(np.stack, ValueError("all input arrays must have the same shape"))
    elif stage == "answers":
        calls = []

        def predict(x):  # the first batch gets one row too few
            calls.append(len(x))
            out, s = rec(x)
            return (out[:-1] if len(calls) == 1 else out), s
    else:
        kw["on_batch"] = FailOnce(lambda stats: None, KeyError("metrics"))
    b = Batcher(predict, max_batch=8, max_wait_s=0.0, capacity=8, **kw)
    first, second = _run_two(b)
    assert all(isinstance(r, BatchFailed) and r.stage == stage and r.size == 2 for r in first), first
    assert "failed" in first[0].message and "batch of 2" in first[0].message
    assert float(second[0].probs[0]) == 3.0 and b.stopped_by is None
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_abandoned_images_leave_the_queue_and_cost_no_model_call():
    """A request whose client left: its queued images are dropped at once (ClientGone), the
    batch that is running finishes, nothing more is queued for it, and its place is freed."""
    from transfer.serve.batcher import ClientGone

    async def main():
        rec = Recorder(seconds=0.2)
        b = Batcher(rec, max_batch=1, max_wait_s=0.0, capacity=8)
        b.start()
        t1, t2 = b.admit(), b.admit()
        running = t1.submit([_img(1)])
        await asyncio.sleep(0.05)  # the first image is in the model
        queued = t2.submit([_img(2), _img(3)])
        assert b.depth == 2
        t1.abandon()               # too late for its image: it is running
        dropped = t2.abandon()
        depth_after = b.depth
        later = t2.submit([_img(4)])
        res = await asyncio.gather(*running, *queued, *later, return_exceptions=True)
        t1.close(), t2.close()
        await b.stop()
        return dropped, depth_after, res, rec.sizes, b.in_flight

    dropped, depth, res, sizes, in_flight = asyncio.run(main())
    assert dropped == 2 and depth == 0 and in_flight == 0
    assert float(res[0].probs[0]) == 1.0
    assert all(isinstance(r, ClientGone) for r in res[1:])
    assert sizes == [1]  # only the image that was already running reached the model


def test_a_batching_task_that_dies_refuses_instead_of_hanging():
    """Should the batching task itself end (a bug), waiting images fail and new requests get 503."""
    from transfer.serve.batcher import BatchFailed

    async def main():
        b = Batcher(Recorder(seconds=0.2), max_batch=1, max_wait_s=0.0, capacity=8)
        b.start()
        with b.admit() as t:
            futs = t.submit([_img(1), _img(2)])
            await asyncio.sleep(0.05)
            b._task.cancel()  # the task ends while an image waits
            res = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
        with pytest.raises(Overloaded, match="stopped batching"):
            b.admit()
        await b.stop()
        return res, b.stopped_by

    res, why = asyncio.run(main())
    assert isinstance(res[1], BatchFailed) and why == "cancelled"


def test_uploaded_bytes_get_the_pixels_transfer_infer_gets(serve_data, tmp_path):
    from PIL import Image

    from transfer.data.image import load_image
    from transfer.serve.pixels import decode_upload, status_of

    rgba = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 23, 4), dtype=np.uint8), "RGBA").save(rgba)
    for p in [*sorted(serve_data.rglob("*.png"))[:3], rgba]:
        assert np.array_equal(decode_upload(p.read_bytes(), p.name, (16, 16), max_pixels=10**6),
                              load_image(p, (16, 16)))
    with pytest.raises(ImageDecodeError) as e:
        decode_upload(rgba.read_bytes(), "a.png", (16, 16), max_pixels=100)
    assert status_of(e.value)[0] == 413
    with pytest.raises(ImageDecodeError) as e:
        decode_upload(b"GIF89a nonsense", "x", (16, 16), max_pixels=100)
    assert status_of(e.value)[0] in (400, 415)
    with pytest.raises(ImageDecodeError) as e:
        decode_upload(b"text", "x", (16, 16), max_pixels=100)
    assert status_of(e.value)[0] == 415


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("queue", 0), ("workers", -1), ("port", 65536),
                                          ("max_wait_ms", -1.0), ("max_body_mb", 0.0), ("head_format", "zip"),
                                          ("topk", True), ("threads", 0)])
def test_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError) as e:
        make(ServeConfig, {field: value})
    assert e.value.option == field


def test_key_comparison():
    assert key_matches(None, None) and key_matches("x", None)
    assert key_matches("s3cret-key-1234567", b"s3cret-key-1234567")
    assert not key_matches("s3cret-key-1234568", b"s3cret-key-1234567")
    assert not key_matches(None, b"s3cret-key-1234567") and not key_matches("", b"s3cret-key-1234567")
    assert not key_matches("s3cret-key-1234567\udcff", b"s3cret-key-1234567")


def test_admission_refuses_what_would_wait_too_long():
    """Requests in the server over the recent service rate (Little's law) beyond the queue-time limit: 503 at once."""
    async def main():
        b = Batcher(Recorder(), max_batch=2, max_wait_s=0.0, capacity=100_000, max_queue_s=0.05)
        b.start()
        for _ in range(40):  # a service rate to go by
            with b.admit() as t:
                await asyncio.gather(*t.submit([_img(1)]))
        held = []
        with pytest.raises(Overloaded, match="would wait about") as e:
            while True:
                held.append(b.admit())
        wait_then = b.expected_wait()
        for t in held:
            t.close()
        await b.stop()
        return len(held), wait_then, e.value.retry_after

    n, wait, retry = asyncio.run(main())
    assert 2 <= n < 100_000 and wait > 0.05 and retry >= 1


def test_a_missing_serve_extra_names_the_install_command(monkeypatch, serve_data):
    import sys

    from click.testing import CliRunner

    from transfer.cli import cli
    from transfer.errors import DependencyMissingError
    from transfer.serve._deps import check_installed

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(DependencyMissingError) as e:
        check_installed()
    assert "fastapi" in e.value.message and e.value.hint == 'pip install "transfer[serve]"'
    r = CliRunner().invoke(cli, ["serve", str(serve_data), "--port", "0"])
    assert r.exit_code == 1 and 'pip install "transfer[serve]"' in r.output
