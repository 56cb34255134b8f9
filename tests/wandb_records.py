"""Read the records of an offline W&B run file (``run-<id>.wandb``) back with wandb's own protobuf
messages: the file is a 7-byte header (":W&B", magic 0xBEE1, version 0) followed by a LevelDB log
(32 KiB blocks of chunks: crc32c u32, length u16, type u8 -- full 1, first 2, middle 3, last 4)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def finished_run_file(folder) -> Path:
    """The one offline run file under ``folder``/wandb, once wandb-core has written all of it: its
    service writes the file after ``run.finish()`` returns, so the service is shut down first."""
    import wandb

    wandb.teardown()
    (path,) = Path(folder).glob("wandb/offline-run-*/run-*.wandb")
    assert records(path)[-1].WhichOneof("record_type") == "exit", f"{path}: the run's exit record is missing"
    return path


def records(path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero fill at the end of the file
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def history(path) -> list[dict]:
    """Each history row (one ``run.log``) as {key: value}."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def config(path) -> dict:
    out = {}
    for rec in records(path):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
