"""Done-when 2 in CI: two "nodes" as network namespaces joined by a tc-throttled veth pair; the profile sees the
slow inter-node level and the plan keeps tensor parallel inside a node. Needs root, `ip` and `tc`; skipped
elsewhere. About half a minute (two 2-rank profiles with a 15 s budget), hence ``slow``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("slow_link_netns", ROOT / "benchmarks" / "slow_link_netns.py")
netns = importlib.util.module_from_spec(spec)
spec.loader.exec_module(netns)


@pytest.mark.slow
@pytest.mark.alone
def test_slow_link_is_seen_and_avoided(tmp_path):
    why = netns.netns_available()
    if why:
        pytest.skip(f"network namespaces unavailable: {why}")
    model = tmp_path / "small.yaml"
    model.write_text(yaml.safe_dump(netns.SMALL_MODEL))
    out = tmp_path / "cluster.yaml"
    try:
        netns.setup("100mbit")
        netns.profile_two_nodes(out, "15s", model, max_message="1M", reps=3, port=29547, timeout=240)
    finally:
        netns.teardown()
    s = netns.summarize(out, model)
    assert s["inter_node"]["bandwidth_gbps"] < 0.5 * s["intra_node"]["bandwidth_gbps"], s
    matrix = s["pair_bandwidth_gbps"]
    cross = [matrix[i][j] for i in range(4) for j in range(4) if i // 2 != j // 2 and matrix[i][j]]
    inside = [matrix[i][j] for i in range(4) for j in range(4) if i != j and i // 2 == j // 2 and matrix[i][j]]
    assert max(cross) < min(inside), matrix
    assert s["best"]["tp"] <= s["gpus_per_node"]
