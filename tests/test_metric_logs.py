"""A run's growing logs on a real (local) GCS server: metrics records and TensorBoard events are written in
rolling pieces uploaded once each from a background thread, so the bytes sent to the store grow linearly
with the steps; the reader returns every record in order; a failed upload is raised at flush / close.

The bytes sent are measured by a TCP relay between gcsfs and the emulator that counts what clients send
(request lines, headers and bodies), independently of the code under test."""

import json
import os
import shutil
import socket
import threading
import uuid

import numpy as np
import pytest

from spectron_jax import filesystem as fs
from spectron_jax import metric_logs, metrics

_FORBIDDEN = json.dumps({"error": {"code": 403, "message": "no write permission (test relay)"}}).encode()


class CountingRelay:
    """Listens on a loopback port and relays every connection to `target`, counting the bytes clients
    send. With `forbid` set, every request is answered 403 (a store that refuses the writer)."""

    def __init__(self, target: tuple[str, int]):
        self.target, self.sent, self.forbid = target, 0, False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            if self.forbid:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, sink, count):
        try:
            while data := source.recv(1 << 16):
                if count:
                    with self._lock:
                        self.sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _refuse(self, client):
        """Reads one request (headers, then a Content-Length body) and answers 403."""
        try:
            data = b""
            while b"\r\n\r\n" not in data and (chunk := client.recv(1 << 16)):
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(body) < length and (chunk := client.recv(1 << 16)):
                body += chunk
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_FORBIDDEN), _FORBIDDEN))
        except OSError:
            pass
        finally:
            client.close()

    def drop_connections(self):
        """Closes every relayed connection (a client then reconnects, seeing the current `forbid`)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self._server.close()
        self.drop_connections()


@pytest.fixture()
def relay(gcs_emulator, monkeypatch):
    """gcsfs pointed at a CountingRelay in front of the emulator (gcsfs reads the endpoint per request)."""
    for key, value in gcs_emulator.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    host, port = gcs_emulator["STORAGE_EMULATOR_HOST"].removeprefix("http://").split(":")
    counting = CountingRelay((host, int(port)))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", counting.url)
    counting.root = f"gs://{gcs_emulator['bucket']}/metric-logs-{uuid.uuid4().hex[:8]}"
    yield counting
    counting.close()


def _record(step: int) -> dict:
    """A train record the size of a real one (about 40 numbers)."""
    rng = np.random.default_rng(step)
    return {"step": step, "split": "train", **{f"term_{i:02d}": float(v) for i, v in enumerate(rng.normal(size=40))}}


def _log_steps(model_dir: str, steps: int, **roll) -> int:
    """What the training loop does at `steps` logging steps: a record, TensorBoard scalars, both flushed.
    Returns the number of uploads."""
    jsonl = metric_logs.JsonlLog(model_dir, **roll)
    writer = metrics.MetricsWriter(model_dir, **roll)
    for step in range(1, steps + 1):
        record = _record(step)
        jsonl.write(record)
        writer.scalars(step, {f"train/{k}": v for k, v in record.items() if k not in ("step", "split")})
        jsonl.flush()
        writer.flush()
    writer.close()
    jsonl.close()
    return writer.uploader.uploaded + jsonl.uploader.uploaded


def _stored_bytes(folder: str) -> int:
    return sum(fs.size(fs.join(folder, name)) for name in fs.listdir(folder))


def _event_steps(folder: str, scratch) -> list[int]:
    """Steps of the 'train/term_00' scalars in every event file of `folder`, files in name order
    (each downloaded whole into the local folder `scratch`)."""
    import tensorflow as tf

    steps = []
    for name in sorted(n for n in fs.listdir(folder) if ".tfevents." in n):
        local = scratch / name
        local.write_bytes(fs.read_bytes(fs.join(folder, name)))
        for raw in fs.iterate_tfrecords(local):  # an event file is TFRecord-framed
            event = tf.compat.v1.Event.FromString(raw)
            steps += [event.step for v in event.summary.value if v.tag == "train/term_00"]
    return steps


def test_bytes_sent_grow_linearly_with_logging_steps(relay, tmp_path, steps=200):
    sent, stored = {}, {}
    for n in (steps // 2, steps):
        folder = f"{relay.root}/run{n}"
        before = relay.sent
        uploads = _log_steps(folder, n, roll_bytes=64 << 10, roll_seconds=None)
        sent[n], stored[n] = relay.sent - before, _stored_bytes(folder)
        assert uploads == len(fs.listdir(folder)) >= 6  # several pieces, each object written once
    print(f"bytes sent: {sent}, stored: {stored}")
    ratio = sent[steps] / sent[steps // 2]
    assert 1.8 < ratio < 2.2, (sent, stored)
    # Each byte is uploaded once: what is sent is the content plus the requests' own overhead.
    assert stored[steps] <= sent[steps] < 1.3 * stored[steps], (sent, stored)
    # Nothing lost: every record and every scalar event is there, in order.
    records = metric_logs.read_records(f"{relay.root}/run{steps}")
    assert records == [json.loads(json.dumps(_record(s), sort_keys=True)) for s in range(1, steps + 1)]
    assert _event_steps(f"{relay.root}/run{steps}", tmp_path) == list(range(1, steps + 1))


def test_the_relay_sees_a_rewritten_log_grow_quadratically(relay):
    """The meter's own check: rewriting the whole log at every step (`filesystem.append_lines` on an
    object store) sends about 4x the bytes for 2x the steps."""
    sent = {}
    for n in (30, 60):
        path = f"{relay.root}/rewritten{n}/metrics.jsonl"
        before = relay.sent
        for step in range(1, n + 1):
            fs.append_lines(path, [json.dumps(_record(step))])
        sent[n] = relay.sent - before
    assert sent[60] / sent[30] > 3.0, sent


def test_records_come_back_in_order_across_pieces_rolls_and_resumes(relay):
    folder = f"{relay.root}/resumed"
    # A log written before pieces existed comes first.
    fs.write_text(fs.join(folder, "metrics.jsonl"), json.dumps({"step": 0, "split": "validation"}) + "\n")
    now = [0.0]
    first = metric_logs.JsonlLog(folder, roll_bytes=1 << 20, roll_seconds=60.0, clock=lambda: now[0])
    for step in range(1, 8):
        first.write({"step": step, "split": "train"})
        now[0] += 25.0  # a flush after 60 s closes the piece: steps 1-3, then 4-6
        first.flush()
    first.uploader.drain()
    assert [n for n in fs.listdir(folder) if n.startswith("metrics-")] == ["metrics-00000.jsonl", "metrics-00001.jsonl"]
    assert [r["step"] for r in metric_logs.parse_records(fs.read_text(fs.join(folder, "metrics-00000.jsonl")))] == [1, 2, 3]
    first.close()  # step 7
    # A resumed run (it redoes steps 6 and 7) continues the numbering; size rolls make many pieces.
    second = metric_logs.JsonlLog(folder, roll_bytes=100, roll_seconds=None)
    for step in range(6, 31):
        second.write({"step": step, "split": "train", "pad": "x" * 40})
    second.close()
    names = metric_logs.log_files(folder)
    assert os.path.basename(names[0]) == "metrics.jsonl" and len(names) > 12
    assert [os.path.basename(n) for n in names[1:]] == [metric_logs.piece_name(i) for i in range(len(names) - 1)]
    records = metric_logs.read_records(folder)
    assert [r["step"] for r in records] == [0, *range(1, 8), *range(6, 31)]
    assert [r["step"] for r in metric_logs.read_records(folder, split="validation")] == [0]


def test_local_log_is_one_appended_file(tmp_path):
    with metric_logs.JsonlLog(tmp_path) as log:
        log.write({"step": 1, "split": "train"})
        assert (tmp_path / "metrics.jsonl").read_text() == '{"split": "train", "step": 1}\n'  # before any flush
        with open(tmp_path / "metrics.jsonl", "a") as f:
            f.write('{"step": 2, "spl')  # cut short by a killed writer
        log.write({"step": 3, "split": "train"})
    assert os.listdir(tmp_path) == ["metrics.jsonl"]
    assert [r["step"] for r in metric_logs.read_records(tmp_path)] == [1, 3]
    assert metric_logs.read_records(tmp_path / "missing") == []
    disabled = metric_logs.JsonlLog(tmp_path / "other", enabled=False)
    disabled.write({"step": 1})
    disabled.close()
    assert not (tmp_path / "other").exists()


def test_a_failed_background_upload_is_raised_at_flush_and_close(relay, capsys):
    jsonl = metric_logs.JsonlLog(f"{relay.root}/refused", roll_bytes=1, roll_seconds=None)
    writer = metrics.MetricsWriter(f"{relay.root}/refused", roll_bytes=1, roll_seconds=None)
    relay.forbid = True
    relay.drop_connections()
    jsonl.write({"step": 1, "split": "train"})  # rolls: its upload fails in the background
    jsonl.uploader.drain()
    with pytest.raises(metric_logs.UploadError, match=r"records under .*refused: writing a records piece .*Forbidden"):
        jsonl.flush()
    jsonl.write({"step": 2, "split": "train"})
    with pytest.raises(metric_logs.UploadError, match="Forbidden"):
        jsonl.close()
    assert "ERROR records under" in capsys.readouterr().err  # said when it happened, too

    writer.scalars(1, {"loss": 1.0})
    writer.flush()  # closes the event file and queues its upload, which fails
    writer.scalars(2, {"loss": 0.5})
    with pytest.raises(metric_logs.UploadError, match=r"TensorBoard events under .*tfevents.*Forbidden"):
        writer.close()
    assert "not uploaded" in capsys.readouterr().err
    kept = [name for _, _, names in os.walk(writer._staging) for name in names]  # the events are not lost
    assert len(kept) == 2 and all(".tfevents." in name for name in kept)
    shutil.rmtree(writer._staging)
    relay.forbid = False
    assert not fs.exists(f"{relay.root}/refused") or not fs.listdir(f"{relay.root}/refused")
