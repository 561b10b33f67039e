"""Per-step training metrics: JSON lines (`eval.records.JsonlWriter`: the record a resumed run trims with
`records.read_rows` and appends to) and the same scalars as TensorBoard events.

TensorBoard event files are written with `tensorboardX` (protobuf only: no TensorFlow, no torch). Scalars go to
`out_dir/tensorboard` under their JSONL names (`loss/edit`, `val/reliability`, ...), step on the x axis; rows
marked `"split": "val"` are logged under the same names, which already carry `_val` or `val/`.
"""

from __future__ import annotations

import math
import os
import struct

from mmedit_jax.eval.records import JsonlWriter


class MetricWriter:
    """Appends rows `{"step": int, name: float, ...}` to `jsonl_path` and, with `tb_dir`, to TensorBoard;
    `flush()` makes the JSONL rows durable."""

    def __init__(self, jsonl_path: str | None, tb_dir: str | None = None):
        self._out = JsonlWriter(jsonl_path) if jsonl_path else None
        self._tb = None
        if tb_dir:
            # Imported here: tensorboardX (protobuf) is only loaded by runs that write events.
            from tensorboardX import SummaryWriter

            # A resumed run appends a new events file; TensorBoard merges files of one directory by step.
            self._tb = SummaryWriter(tb_dir, flush_secs=30)

    def write(self, row: dict) -> None:
        if self._out:
            self._out.write(row)
        if self._tb is not None:
            step = int(row["step"])
            for k, v in row.items():
                if k in ("step", "split") or isinstance(v, str):
                    continue
                v = float(v)
                if math.isfinite(v):  # a skipped, non-finite step is in the JSONL and the `skipped` count
                    self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if self._out:
            self._out.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._out:
            self._out.close()
        if self._tb is not None:
            self._tb.close()


def read_scalars(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
    """`{tag: [(step, value), ...]}` from every events file in `tb_dir` (TFRecord framing, `Event` protos)."""
    from tensorboardX.proto import event_pb2  # as above: only readers of event files load it

    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(tb_dir)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            record = data[pos + 12 : pos + 12 + length]  # skip the length's crc; the data's crc follows
            pos += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
