"""The measured profile (meshplan/measured.py): one loader that migrates older files and names a bad field, and
a ``to_dict`` that gives back what the file holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from meshplan.errors import InputError
from meshplan.measured import MEASURED_SCHEMA_VERSION, MeasuredProfile
from meshplan.spec import ClusterSpec, load_cluster

GOLDEN = Path(__file__).parent / "golden"

CURRENT = {
    "schema_version": MEASURED_SCHEMA_VERSION,
    "tool": "meshplan profile", "date": "2026-12-05T08:00:00+00:00",
    "compute": {
        "precision": "fp32", "matmul_table": [[1.0e6, 0.02], [1.0e8, 0.05]], "attention_tflops": 0.03,
        "memory_gbps": 9.5,
        "block_check": [{"tp": 1, "micro_batch": 2, "seq": 256, "measured_s": 0.1, "model_s": 0.09,
                         "shape_s": 0.11, "model_over_measured": 0.9}],
        "block_lines": [{"tp": 1, "fixed_s": 0.01, "per_sequence_s": 0.04, "used": True, "worst_offset_se": None}],
        "vocab": [{"tp": 1, "micro_batch": 2, "head_s": 0.01, "loss_s": 0.004, "embedding_s": 0.001}],
        "optimizer": [{"tp": 1, "params": 1000, "tensors": 9, "step_s": 0.002, "seconds_per_param": 2e-6}],
        "skipped_shapes": [{"tp": 4, "why": "does not divide"}],
    },
    "memory": {"per_layer": [{"mode": "none", "planner_bytes": None}]},
    "links": {
        "intra_node": {"bandwidth_gbps": 0.8, "latency_us": 1000.0, "samples": 40, "median_rel_error": 0.1,
                       "collectives": {"all_reduce": {"bandwidth_gbps": 0.9, "latency_us": 900.0, "samples": 8}},
                       "groups": [[0, 1]]},
        "pair_bandwidth_gbps": [[0.0, 1.0], [1.1, 0.0]],
        "reduction": {"world": 2, "rounds": 3, "samples": [
            {"collective": "all_reduce", "ranks": 2, "stride": 1, "bytes": 1024, "seconds": 0.001,
             "rounds_s": [0.001, 0.0011, 0.0009]}]},
        "overlap": {"exposed_fraction": 1.2, "level": "intra_node", "samples": [{"bytes": 1 << 20}]},
        "topology": {"nodes": [], "edges": []},
    },
    "host": {
        "busy_speedup": [[1, 2.0], [2, 1.0]], "samples": [{"busy": 1}],
        "meeting": {"timing": "drift", "ranks": 2, "curve": [{"segment_s": 0.01, "penalty_s": 0.002}],
                    "segments_s": [0.01, 2.0], "samples": [{"segment_s": 0.01, "penalty_s": 0.002}]},
        "pipeline": {"op_overhead_s": 0.002, "pairs": 1},
    },
    "raw": {"compute": {"blocks": []}},
}


def test_a_current_profile_round_trips_through_the_typed_form():
    profile = MeasuredProfile.from_dict(CURRENT)
    assert profile.to_dict() == CURRENT
    assert MeasuredProfile.from_dict(profile.to_dict()) == profile
    # the typed sections the planner reads
    assert profile.compute.matmul_table == ((1.0e6, 0.02), (1.0e8, 0.05))
    assert profile.compute.block_check[0].tp == 1 and profile.compute.block_check[0].model_s == 0.09
    assert profile.compute.vocab[0].chunked_head_loss_s is None
    assert profile.links.level("intra_node").collectives[0][0] == "all_reduce"
    assert profile.links.pair_bandwidth_gbps == ((0.0, 1.0), (1.1, 0.0))
    assert profile.links.reduction.samples[0].bytes == 1024
    assert profile.host.busy_speedup == ((1, 2.0), (2, 1.0))
    assert profile.host.meeting.curve == ((0.01, 0.002),) and profile.host.meeting.segments_s == (0.01, 2.0)
    assert profile.host.pipeline.op_overhead_s == 0.002
    assert profile.measured_in("fp32") is profile.compute and profile.measured_in("bf16") is None


def test_an_empty_profile_is_the_defaults():
    profile = MeasuredProfile.from_dict({})
    assert profile.empty and profile.compute is None and profile.links is None and profile.host is None
    assert MeasuredProfile.from_dict(None) == profile
    assert load_cluster("localhost:4").profile.empty


@pytest.mark.parametrize("name", ["cpu-measured.yaml", "h100-measured.yaml"])
def test_the_golden_cluster_files_read_and_round_trip(name):
    """Both fixtures are schema 1 (no ``schema_version``): read as the current schema, every key kept."""
    data = yaml.safe_load((GOLDEN / name).read_text())
    cluster = load_cluster(str(GOLDEN / name))
    out = cluster.profile.to_dict()
    assert out.pop("schema_version") == MEASURED_SCHEMA_VERSION
    if "meeting" in out.get("host", {}):
        assert out["host"]["meeting"].pop("timing") == "drift"         # a curve: timed as drift
    assert out == data["measured"]
    # the cluster keeps the file's mapping verbatim: its round trip and hash do not change
    again = ClusterSpec.from_dict(cluster.to_dict())
    assert again == cluster and hash(again) == hash(cluster) and again.measured == data["measured"]


def test_a_schema_1_meeting_line_is_migrated_to_timing_arrivals():
    """Files written before the meeting named its timing: a line (``base_s``, ``per_segment``) was timed by
    arrivals, a ``curve`` as drift."""
    older = {"host": {"meeting": {"base_s": 0.001, "per_segment": 0.05, "segments_s": [0.01, 0.16],
                                  "samples": [{"segment_s": 0.01, "penalty_s": 0.002}]}}}
    profile = MeasuredProfile.from_dict(older)
    meeting = profile.host.meeting
    assert meeting.timing == "arrivals" and meeting.curve == ()
    assert (meeting.base_s, meeting.per_segment, meeting.segments_s) == (0.001, 0.05, (0.01, 0.16))
    assert meeting.ranks is None
    out = profile.to_dict()
    assert out["schema_version"] == MEASURED_SCHEMA_VERSION
    assert out["host"]["meeting"] == {**older["host"]["meeting"], "timing": "arrivals"}
    assert MeasuredProfile.from_dict(out) == profile
    # older vocabulary rows without the shape: read, the shape unknown
    vocab = MeasuredProfile.from_dict({"compute": {"vocab": [{"tp": 1, "micro_batch": 1, "head_s": 0.1,
                                                              "loss_s": 0.1, "embedding_s": 0.01}]}})
    assert vocab.compute.vocab[0].tokens is None and vocab.compute.precision is None


@pytest.mark.parametrize("bad, field", [
    ({"host": {"pipeline": {"op_overhead_s": "x"}}}, "measured.host.pipeline.op_overhead_s"),
    ({"compute": {"block_check": [{"tp": 1, "micro_batch": 2, "seq": 8, "measured_s": 0.1}]}},
     "measured.compute.block_check[0].model_s"),
    ({"compute": {"matmul_table": [[1.0e6]]}}, "measured.compute.matmul_table[0]"),
    ({"links": {"pair_bandwidth_gbps": [[0.0, "fast"], [1.0, 0.0]]}}, "measured.links.pair_bandwidth_gbps[0][1]"),
    ({"links": {"reduction": {"samples": [{"collective": "all_reduce", "ranks": 2.5, "stride": 1, "bytes": 8,
                                           "seconds": 0.1}]}}}, "measured.links.reduction.samples[0].ranks"),
    ({"host": {"meeting": {"timing": "guess"}}}, "measured.host.meeting.timing"),
    ({"host": {"busy_speedup": [[1, 2.0], [2]]}}, "measured.host.busy_speedup[1]"),
    ({"links": "fast"}, "measured.links"),
    ({"schema_version": MEASURED_SCHEMA_VERSION + 1}, "measured.schema_version"),
])
def test_a_bad_field_is_one_error_naming_it(bad, field):
    with pytest.raises(InputError) as error:
        MeasuredProfile.from_dict(bad)
    assert error.value.field == field
    assert "\n" not in str(error.value)


def test_a_cluster_file_with_a_bad_field_fails_at_load(tmp_path):
    data = yaml.safe_load((GOLDEN / "cpu-measured.yaml").read_text())
    data["measured"]["host"]["pipeline"]["op_overhead_s"] = "slow"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match=r"measured\.host\.pipeline\.op_overhead_s: expected a number"):
        load_cluster(str(path))
    # a spec built in code is checked where its profile is first read
    built = dataclasses.replace(load_cluster("localhost:4"), measured={"host": {"pipeline": {"op_overhead_s": []}}})
    with pytest.raises(InputError, match="op_overhead_s"):
        built.profile
