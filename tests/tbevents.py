"""A small reader for TensorBoard event files as tensorboardX writes them, for tests.

An event file is a sequence of TFRecords: uint64 length, uint32 masked CRC-32C of the length bytes, the
data (one serialized `Event` protobuf), uint32 masked CRC-32C of the data; all little-endian. The CRCs
are checked, so a truncated or garbled file fails loudly instead of reading as fewer events.

Purges follow TensorBoard: an event carrying `SessionLog.START` at step s (tensorboardX writes one when
`SummaryWriter(purge_step=s)` opens its file) hides every event read before it whose step is >= s.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c

EVENT_GLOB = "events.out.tfevents.*"


class CorruptEventFile(ValueError):
    pass


def read_events(file: str | Path) -> list[Event]:
    """Every Event in one file, in order; raises CorruptEventFile on a bad CRC or a truncated record."""
    data = Path(file).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        if pos + 12 > len(data):
            raise CorruptEventFile(f"{file}: truncated record header at byte {pos}")
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        if header_crc != masked_crc32c(header):
            raise CorruptEventFile(f"{file}: bad length CRC at byte {pos}")
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            raise CorruptEventFile(f"{file}: truncated record at byte {pos}")
        body = data[start:end]
        (body_crc,) = struct.unpack("<I", data[end : end + 4])
        if body_crc != masked_crc32c(body):
            raise CorruptEventFile(f"{file}: bad data CRC at byte {pos}")
        event = Event()
        event.ParseFromString(body)
        events.append(event)
        pos = end + 4
    return events


def event_files(logdir: str | Path) -> list[Path]:
    """The event files directly in `logdir` (not sub-runs such as hparams/), oldest first.

    Ordered by the wall time of each file's first event (the file-version header), then by name.
    """

    def first_wall_time(f: Path) -> float:
        events = read_events(f)
        return events[0].wall_time if events else float("inf")

    return sorted(Path(logdir).glob(EVENT_GLOB), key=lambda f: (first_wall_time(f), f.name))


def purge_steps(file: str | Path) -> list[int]:
    """Steps of the SessionLog.START events in a file: where TensorBoard purges older events."""
    return [e.step for e in read_events(file) if e.HasField("session_log") and e.session_log.status == SessionLog.START]


@dataclass
class Summaries:
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)], in order
    images: dict[str, list[int]] = field(default_factory=dict)  # tag -> [step]

    @property
    def image_tags(self) -> set[str]:
        return set(self.images)

    def steps(self, tag: str) -> list[int]:
        return [s for s, _ in self.scalars.get(tag, [])]

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.scalars.get(tag, [])]

    def _purge(self, step: int) -> None:
        self.scalars = {t: [(s, v) for s, v in sv if s < step] for t, sv in self.scalars.items()}
        self.images = {t: [s for s in ss if s < step] for t, ss in self.images.items()}


def summaries(files: list[Path], *, apply_purge: bool = True) -> Summaries:
    """Scalars and image tags from `files` read in the given order; purges applied unless told otherwise."""
    out = Summaries()
    for f in files:
        for e in read_events(f):
            if apply_purge and e.HasField("session_log") and e.session_log.status == SessionLog.START:
                out._purge(e.step)
            if not e.HasField("summary"):
                continue
            for v in e.summary.value:
                if v.HasField("simple_value"):
                    out.scalars.setdefault(v.tag, []).append((e.step, v.simple_value))
                elif v.HasField("image"):
                    out.images.setdefault(v.tag, []).append(e.step)
    return out


def load(logdir: str | Path, *, apply_purge: bool = True) -> Summaries:
    """All event files directly in `logdir`, oldest first, as one Summaries."""
    return summaries(event_files(logdir), apply_purge=apply_purge)


def scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} for the scalars of `logdir`, purges applied."""
    return load(logdir).scalars


def image_tags(logdir: str | Path) -> set[str]:
    return load(logdir).image_tags


def hparam_order(logdir: str | Path) -> list[str]:
    """The hparams of a run's HPARAMS summary in the order it declares them (TensorBoard shows the first few)."""
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    for file in Path(logdir).rglob(EVENT_GLOB):
        for event in read_events(file):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData()
                    data.ParseFromString(value.metadata.plugin_data.content)
                    if data.HasField("experiment"):
                        return [h.name for h in data.experiment.hparam_infos]
    return []


def hparams_shown_first(logdir: str | Path, n: int) -> list[str]:
    """The first `n` hparams of the HPARAMS view, ordered as TensorBoard orders them (its hparams plugin,
    backend_context._sort_and_reduce_to_hparams_limit): those marked `differs` first, then by name. `differs` is
    field 7 of TensorBoard's HParamInfo, which tensorboardX's copy of the proto lacks: read as an unknown field."""
    from google.protobuf.unknown_fields import UnknownFieldSet
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    for file in event_files(logdir):
        for event in read_events(file):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = HParamsPluginData()
                data.ParseFromString(value.metadata.plugin_data.content)
                if data.HasField("experiment"):
                    infos = data.experiment.hparam_infos
                    differs = {i.name for i in infos if any(f.field_number == 7 and f.data for f in UnknownFieldSet(i))}
                    return sorted((i.name for i in infos), key=lambda name: (name not in differs, name))[:n]
    return []
