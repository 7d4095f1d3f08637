"""The measured profile: what ``meshplan profile`` measured, typed and versioned (``ClusterSpec.measured``).

A cluster file's ``measured`` mapping, read once by :meth:`MeasuredProfile.from_dict` (the one loader: it
migrates older files and rejects a malformed field in one line that names it) into frozen sections:

* ``compute`` (:class:`Compute`): the precision it was measured in; achieved rates (``matmul_tflops``,
  ``attention_tflops``, ``memory_gbps``); ``matmul_table`` ([forward FLOPs of one GEMM, TFLOP/s]);
  ``block_check`` (the runtime's block timed whole next to the fitted model), ``block_lines`` (per tp, block time
  against micro-batch), ``vocab`` (LM head and loss timed per shape), ``optimizer`` (AdamW step per parameter),
  ``kernels`` (each fused op's implementations timed on a GPU, planner/kernels.py);
* ``links`` (:class:`Links`): per level (``intra_node``, ``inter_node``) the joint alpha-beta fit and one fit per
  collective, ``pair_bandwidth_gbps`` (world x world, GB/s; 0 where a pair was not measured), ``reduction``
  (data-parallel collectives timed per group shape and size) and ``overlap`` (``exposed_fraction``);
* ``host`` (:class:`Host`, CPU ranks sharing cores): ``busy_speedup`` ([busy ranks, speed]), ``meeting`` (a
  collective's cost beyond its lined-up time: a ``curve`` when timed as drift, else a line ``base_s +
  per_segment * segment``) and ``pipeline`` (``op_overhead_s``).

Every other key (raw samples, the topology graph, per-layer memory, calibration records, the tool and date) is
kept verbatim in each section's ``other`` mapping, so :meth:`MeasuredProfile.to_dict` gives back what the file
holds (in the current schema). Values are checked for type only; what a figure means (a rate of 0, a
non-finite time) is the planner's to judge.

Schema versions: 2 writes ``schema_version: 2`` and names the meeting's ``timing``. Version 1 (files without a
``schema_version``) is read as 2: a meeting without ``timing`` was timed as ``drift`` when it holds a ``curve``,
else as ``arrivals``. Missing sections are ``None``; missing tables are empty.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from meshplan.errors import InputError

MEASURED_SCHEMA_VERSION = 2
MEETING_TIMINGS = ("drift", "arrivals")

# ------------------------------------------------------------------------------------------------
# typed reading of one value, with the field's name in the error
# ------------------------------------------------------------------------------------------------


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(where, f"expected a number, got {value!r}", "re-run `meshplan profile` or fix the value")
    return float(value)


def _whole(value: Any, where: str) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(where, f"expected a whole number, got {value!r}", "re-run `meshplan profile` or fix the value")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InputError(where, f"expected text, got {value!r}", "re-run `meshplan profile` or fix the value")
    return value


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(where, f"expected true or false, got {value!r}", "re-run `meshplan profile` or fix the value")
    return value


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InputError(where, f"expected a mapping, got {type(value).__name__}", "write it as 'key: value' lines")
    return value


def _rows(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InputError(where, f"expected a list, got {type(value).__name__}", "write it as a list")
    return list(value)


_KINDS = {"number": _number, "whole": _whole, "text": _text, "flag": _flag}


def _typed(kind: str, required: bool = False):
    """A typed field read from the file's key of the same name (``None``: not in the file)."""
    return field(default=None, metadata={"kind": kind, "required": required})


def _other():
    return field(default_factory=dict, compare=True, metadata={"kind": "other"})


def _read_fields(cls, data: Mapping[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The typed fields of ``cls`` (those made by :func:`_typed`) from ``data``, and ``other``: every key that is
    not one of ``cls``'s fields (an explicit null of a typed field is kept there, so the file round-trips)."""
    data = _mapping(data, where)
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)} - {"other"}
    other = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
    for f in dataclasses.fields(cls):
        kind = f.metadata.get("kind")
        if kind not in _KINDS or f.name in skip:
            continue
        if data.get(f.name) is None:
            if f.metadata.get("required"):
                raise InputError(f"{where}.{f.name}", "missing", "re-run `meshplan profile` or add it")
            if f.name in data:
                other[f.name] = None
            continue
        values[f.name] = _KINDS[kind](data[f.name], f"{where}.{f.name}")
    values["other"] = other
    return values


def _write_fields(obj) -> dict[str, Any]:
    """The typed fields that are set, then ``other``, as plain values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("kind") in _KINDS and getattr(obj, f.name) is not None:
            out[f.name] = getattr(obj, f.name)
    out.update(copy.deepcopy(dict(obj.other)))
    return out


class _Row:
    """A row of a table: typed fields plus ``other``; read with :meth:`read`, written with :meth:`to_dict`."""

    @classmethod
    def read(cls, data: Any, where: str):
        return cls(**_read_fields(cls, data, where))

    def to_dict(self) -> dict[str, Any]:
        return _write_fields(self)


def _table(cls, value: Any, where: str) -> tuple:
    return tuple(cls.read(row, f"{where}[{i}]") for i, row in enumerate(_rows(value, where)))


def _pairs(value: Any, where: str, first=_number) -> tuple[tuple[Any, float], ...]:
    """``[[x, y], ...]`` as ``((x, y), ...)`` in file order."""
    out = []
    for i, row in enumerate(_rows(value, where)):
        if not isinstance(row, (list, tuple)) or len(row) != 2:
            raise InputError(f"{where}[{i}]", f"expected a pair [x, y], got {row!r}", "re-run `meshplan profile`")
        out.append((first(row[0], f"{where}[{i}][0]"), _number(row[1], f"{where}[{i}][1]")))
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# compute
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockCheck(_Row):
    """The runtime's block timed whole at one shape (``measured_s``) next to the fitted model (``model_s``)."""

    tp: int = _typed("whole", True)
    micro_batch: int = _typed("whole", True)
    seq: int = _typed("whole", True)
    measured_s: float = _typed("number", True)
    model_s: float = _typed("number", True)
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class BlockLine(_Row):
    """Per tensor-parallel degree, the block's time ``fixed_s + per_sequence_s * micro_batch``; ``used`` where
    every shape lies on it."""

    tp: int = _typed("whole", True)
    fixed_s: float = _typed("number", True)
    per_sequence_s: float = _typed("number", True)
    used: bool = _typed("flag", True)
    worst_offset_se: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class VocabRow(_Row):
    """The LM head and loss timed at one shape: the head GEMM (``head_s``) and reference loss (``loss_s``), and
    (files since the chunked loss) the shape (``tokens``, ``hidden``, ``vocab_local``) and the chunked head + loss
    (``chunked_head_loss_s``); the embedding's forward + backward (``embedding_s``) on ``embedding_rows`` rows
    (files since the vocabulary-sharded embedding was timed; older files timed all rows and leave it out)."""

    tp: int = _typed("whole", True)
    micro_batch: int = _typed("whole", True)
    head_s: float = _typed("number", True)
    loss_s: float = _typed("number", True)
    embedding_s: float | None = _typed("number")
    embedding_rows: int | None = _typed("whole")
    seq: int | None = _typed("whole")
    tokens: int | None = _typed("whole")
    hidden: int | None = _typed("whole")
    vocab_local: int | None = _typed("whole")
    chunked_head_loss_s: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class KernelRow(_Row):
    """One implementation of one fused op (``op``: norm, swiglu, rope, loss; ``impl``: fused, liger) timed
    forward + backward on ``tokens`` tokens (``seconds``); ``max_error``: its largest difference from eager
    over the outputs and input gradients, relative to eager's largest magnitude; ``gbps``: the planner's
    forward + backward bytes of the op at that shape over ``seconds`` (planner/kernels.py), absent for the
    loss, which the planner prices as its GEMMs. ``error``: why it did not run, where it did not (then no
    ``seconds``)."""

    op: str = _typed("text", True)
    impl: str = _typed("text", True)
    tokens: int = _typed("whole", True)
    seconds: float | None = _typed("number")
    max_error: float | None = _typed("number")
    gbps: float | None = _typed("number")
    error: str | None = _typed("text")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class OptimizerRow(_Row):
    """The runtime's optimizer step on one rank's block at tensor-parallel degree ``tp``."""

    tp: int = _typed("whole", True)
    seconds_per_param: float = _typed("number", True)
    params: int | None = _typed("whole")
    tensors: int | None = _typed("whole")
    step_s: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class Compute:
    """Achieved compute, measured in ``precision`` (``None``: any). ``matmul_table``: ``((forward FLOPs of one
    GEMM, TFLOP/s over its forward + backward), ...)`` in file order."""

    precision: str | None = _typed("text")
    matmul_tflops: float | None = _typed("number")
    attention_tflops: float | None = _typed("number")
    memory_gbps: float | None = _typed("number")
    matmul_table: tuple[tuple[float, float], ...] = ()
    block_check: tuple[BlockCheck, ...] = ()
    block_lines: tuple[BlockLine, ...] = ()
    vocab: tuple[VocabRow, ...] = ()
    optimizer: tuple[OptimizerRow, ...] = ()
    kernels: tuple[KernelRow, ...] = ()
    other: Mapping[str, Any] = _other()

    TABLES = {"block_check": BlockCheck, "block_lines": BlockLine, "vocab": VocabRow, "optimizer": OptimizerRow,
              "kernels": KernelRow}

    @classmethod
    def read(cls, data: Any, where: str) -> "Compute":
        data = _mapping(data, where)
        values = _read_fields(cls, data, where)
        values["other"].pop("matmul_table", None)
        if "matmul_table" in data:
            values["matmul_table"] = _pairs(data["matmul_table"], f"{where}.matmul_table")
        for name, row in cls.TABLES.items():
            values["other"].pop(name, None)
            if name in data:
                values[name] = _table(row, data[name], f"{where}.{name}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = _write_fields(self)
        if self.matmul_table:
            out["matmul_table"] = [list(row) for row in self.matmul_table]
        for name in self.TABLES:
            if getattr(self, name):
                out[name] = [row.to_dict() for row in getattr(self, name)]
        return out


# ------------------------------------------------------------------------------------------------
# links
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LinkFit(_Row):
    """An alpha-beta fit: bus bandwidth per rank (GB/s, nccl-tests' convention) and latency per step (us)."""

    bandwidth_gbps: float | None = _typed("number")
    latency_us: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class LevelFit:
    """One level's joint fit over every collective, and ``collectives``: ``((name, fit), ...)`` in file order."""

    bandwidth_gbps: float | None = _typed("number")
    latency_us: float | None = _typed("number")
    collectives: tuple[tuple[str, LinkFit], ...] = ()
    other: Mapping[str, Any] = _other()

    @classmethod
    def read(cls, data: Any, where: str) -> "LevelFit":
        data = _mapping(data, where)
        values = _read_fields(cls, data, where)
        values["other"].pop("collectives", None)
        fits = _mapping(data.get("collectives"), f"{where}.collectives")
        values["collectives"] = tuple((str(name), LinkFit.read(one, f"{where}.collectives.{name}"))
                                      for name, one in fits.items())
        if "collectives" in data and data["collectives"] is None:
            values["other"]["collectives"] = None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = _write_fields(self)
        if self.collectives:
            out["collectives"] = {name: fit.to_dict() for name, fit in self.collectives}
        return out


@dataclass(frozen=True)
class ReductionSample(_Row):
    """One data-parallel collective over every group of ``ranks`` ranks ``stride`` apart, ``bytes`` each."""

    collective: str = _typed("text", True)
    ranks: int = _typed("whole", True)
    stride: int = _typed("whole", True)
    bytes: float = _typed("number", True)
    seconds: float = _typed("number", True)
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class Reduction:
    """The data-parallel collectives timed at the runtime's gradient-unit sizes."""

    samples: tuple[ReductionSample, ...] = ()
    other: Mapping[str, Any] = _other()

    @classmethod
    def read(cls, data: Any, where: str) -> "Reduction":
        data = _mapping(data, where)
        other = {k: copy.deepcopy(v) for k, v in data.items() if k != "samples"}
        return cls(_table(ReductionSample, data.get("samples"), f"{where}.samples"), other)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": [s.to_dict() for s in self.samples], **copy.deepcopy(dict(self.other))}


@dataclass(frozen=True)
class Overlap(_Row):
    """How much of a collective's own time shows beside compute (0 hidden, 1 no overlap)."""

    exposed_fraction: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class Links:
    """What the profile measured of the links (see the module's docstring)."""

    intra_node: LevelFit | None = None
    inter_node: LevelFit | None = None
    pair_bandwidth_gbps: tuple[tuple[float, ...], ...] = ()
    reduction: Reduction | None = None
    overlap: Overlap | None = None
    other: Mapping[str, Any] = _other()

    SECTIONS = {"intra_node": LevelFit, "inter_node": LevelFit, "reduction": Reduction, "overlap": Overlap}

    def level(self, name: str) -> LevelFit | None:
        """``intra_node`` or ``inter_node``'s fit."""
        return self.intra_node if name == "intra_node" else self.inter_node if name == "inter_node" else None

    @classmethod
    def read(cls, data: Any, where: str) -> "Links":
        data = _mapping(data, where)
        values: dict[str, Any] = {}
        other = {}
        for key, value in data.items():
            if key in cls.SECTIONS and value is not None:
                values[key] = cls.SECTIONS[key].read(value, f"{where}.{key}")
            elif key == "pair_bandwidth_gbps" and value is not None:
                rows = []
                for i, row in enumerate(_rows(value, f"{where}.{key}")):
                    rows.append(tuple(0.0 if x is None else _number(x, f"{where}.{key}[{i}][{j}]")
                                      for j, x in enumerate(_rows(row, f"{where}.{key}[{i}]"))))
                values[key] = tuple(rows)
            else:
                other[key] = copy.deepcopy(value)
        return cls(**values, other=other)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.SECTIONS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_dict()
        if self.pair_bandwidth_gbps:
            out["pair_bandwidth_gbps"] = [list(row) for row in self.pair_bandwidth_gbps]
        out.update(copy.deepcopy(dict(self.other)))
        return out


# ------------------------------------------------------------------------------------------------
# host
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Meeting:
    """What a collective costs beyond its lined-up time when ranks come to it from ``segment`` seconds of
    computing, over ``ranks`` ranks of one host. Timed as ``drift``: ``curve`` ``((segment_s, penalty_s), ...)``
    in file order; as ``arrivals``: the line ``base_s + per_segment * segment`` within ``segments_s`` (low,
    high)."""

    timing: str = _typed("text", True)
    ranks: int | None = _typed("whole")
    curve: tuple[tuple[float, float], ...] = ()
    base_s: float | None = _typed("number")
    per_segment: float | None = _typed("number")
    segments_s: tuple[float, float] | None = None
    other: Mapping[str, Any] = _other()

    @classmethod
    def read(cls, data: Any, where: str) -> "Meeting":
        data = dict(_mapping(data, where))
        if data.get("timing") is None:                        # schema 1: timing implied by the fit's form
            data["timing"] = "drift" if data.get("curve") else "arrivals"
        values = _read_fields(cls, data, where)
        if values["timing"] not in MEETING_TIMINGS:
            raise InputError(f"{where}.timing", f"unknown timing {values['timing']!r}",
                             f"one of: {', '.join(MEETING_TIMINGS)}")
        for key in ("curve", "segments_s"):
            values["other"].pop(key, None)
        points = []
        for i, point in enumerate(_rows(data.get("curve"), f"{where}.curve")):
            point = _mapping(point, f"{where}.curve[{i}]")
            for key in ("segment_s", "penalty_s"):
                if point.get(key) is None:
                    raise InputError(f"{where}.curve[{i}].{key}", "missing", "re-run `meshplan profile`")
            points.append((_number(point["segment_s"], f"{where}.curve[{i}].segment_s"),
                           _number(point["penalty_s"], f"{where}.curve[{i}].penalty_s")))
        values["curve"] = tuple(points)
        if data.get("segments_s") is not None:
            segments = _rows(data["segments_s"], f"{where}.segments_s")
            if len(segments) != 2:
                raise InputError(f"{where}.segments_s", f"expected [shortest, longest], got {segments!r}",
                                 "re-run `meshplan profile`")
            values["segments_s"] = tuple(_number(x, f"{where}.segments_s[{i}]") for i, x in enumerate(segments))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = _write_fields(self)
        if self.curve:
            out["curve"] = [{"segment_s": s, "penalty_s": p} for s, p in self.curve]
        if self.segments_s is not None:
            out["segments_s"] = list(self.segments_s)
        return out


@dataclass(frozen=True)
class PipelineOverhead(_Row):
    """One pipeline-schedule op's cost beyond its compute."""

    op_overhead_s: float | None = _typed("number")
    other: Mapping[str, Any] = _other()


@dataclass(frozen=True)
class Host:
    """CPU ranks sharing a host's cores. ``busy_speedup``: ``((busy ranks, speed / speed with all busy), ...)``
    in file order."""

    busy_speedup: tuple[tuple[int, float], ...] = ()
    meeting: Meeting | None = None
    pipeline: PipelineOverhead | None = None
    other: Mapping[str, Any] = _other()

    @classmethod
    def read(cls, data: Any, where: str) -> "Host":
        data = _mapping(data, where)
        values: dict[str, Any] = {}
        other = {}
        for key, value in data.items():
            if key == "busy_speedup" and value is not None:
                values[key] = _pairs(value, f"{where}.{key}", first=_whole)
            elif key == "meeting" and value is not None:
                values[key] = Meeting.read(value, f"{where}.{key}")
            elif key == "pipeline" and value is not None:
                values[key] = PipelineOverhead.read(value, f"{where}.{key}")
            else:
                other[key] = copy.deepcopy(value)
        return cls(**values, other=other)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.busy_speedup:
            out["busy_speedup"] = [list(row) for row in self.busy_speedup]
        if self.meeting is not None:
            out["meeting"] = self.meeting.to_dict()
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline.to_dict()
        out.update(copy.deepcopy(dict(self.other)))
        return out


# ------------------------------------------------------------------------------------------------
# the profile
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MeasuredProfile:
    """What ``meshplan profile`` measured (see the module's docstring). ``None`` sections were not measured;
    ``other`` holds the rest of the file verbatim (``tool``, ``date``, ``memory``, ``raw``, ``calibration``...)."""

    schema_version: int = MEASURED_SCHEMA_VERSION
    compute: Compute | None = None
    links: Links | None = None
    host: Host | None = None
    other: Mapping[str, Any] = _other()

    SECTIONS = {"compute": Compute, "links": Links, "host": Host}

    @property
    def empty(self) -> bool:
        """Nothing measured: the planner uses the documented defaults."""
        return self.compute is None and self.links is None and self.host is None and not self.other

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "measured") -> "MeasuredProfile":
        """The one loader: ``data`` as a cluster file holds it (any schema version up to the current one,
        migrated), checked field by field; a malformed field raises one :class:`InputError` naming it."""
        if isinstance(data, MeasuredProfile):
            return data
        data = _mapping(data, where)
        version = data.get("schema_version", 1)
        version = _whole(version, f"{where}.schema_version")
        if not 1 <= version <= MEASURED_SCHEMA_VERSION:
            raise InputError(f"{where}.schema_version", f"version {version} is not one this meshplan reads "
                             f"(1..{MEASURED_SCHEMA_VERSION})", "upgrade meshplan or re-run `meshplan profile`")
        values: dict[str, Any] = {}
        other = {}
        for key, value in data.items():
            if key == "schema_version":
                continue
            if key in cls.SECTIONS and value is not None:
                values[key] = cls.SECTIONS[key].read(value, f"{where}.{key}")
            else:
                other[key] = copy.deepcopy(value)
        return cls(**values, other=other)

    def to_dict(self) -> dict[str, Any]:
        """The profile as a cluster file's ``measured`` mapping, in the current schema (``from_dict`` of it gives
        an equal profile)."""
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for key in self.SECTIONS:
            if getattr(self, key) is not None:
                out[key] = getattr(self, key).to_dict()
        out.update(copy.deepcopy(dict(self.other)))
        return out

    def measured_in(self, precision: str) -> Compute | None:
        """The compute section if it was measured in ``precision`` (or in no named precision), else ``None``:
        rates profiled in another precision are not these rates."""
        compute = self.compute
        if compute is None or (compute.precision is not None and compute.precision != precision):
            return None
        return compute


EMPTY_PROFILE = MeasuredProfile()
