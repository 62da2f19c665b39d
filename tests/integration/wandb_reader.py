"""Read an offline W&B run file (``run-<id>.wandb``) back, for the tracking tests.

wandb >= 0.2x no longer ships a Python reader; the file is a LevelDB-style log (7-byte header, 32 KiB blocks,
records split into FULL/FIRST/MIDDLE/LAST chunks) of protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes):
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos:pos + length], pos + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk


def read_run(path: Path) -> dict:
    """``{"run_id", "config": {...}, "history_keys": set, "summary_keys": set, "train_steps": [step, ...]}``
    (``train_steps``: the steps of the history rows holding ``train/loss``, in the order logged)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out = {"run_id": None, "config": {}, "history_keys": set(), "summary_keys": set(), "train_steps": []}
    for raw in _chunks(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update if i.key})
        elif kind == "history":
            keys = {i.key or "/".join(i.nested_key) for i in record.history.item}
            out["history_keys"] |= keys
            if "train/loss" in keys:
                out["train_steps"].append(record.history.step.num)
        elif kind == "summary":
            out["summary_keys"] |= {i.key or "/".join(i.nested_key) for i in record.summary.update}
    return out
