"""A slow link, seen and avoided: two "nodes" as Linux network namespaces joined by a veth pair throttled with
``tc``, profiled with ``meshplan profile`` (2 CPU ranks per node, gloo), then planned.

    sudo python benchmarks/slow_link_netns.py [--rate 200mbit] [--budget 90s] [--baseline]

Each namespace runs the same ``meshplan profile --nnodes 2 --node-rank i --master-addr 10.77.0.1`` command
(gloo pinned to the veth with GLOO_SOCKET_IFNAME; ranks on one node talk over that node's own address, i.e.
loopback). Printed: the fitted intra- and inter-node links, the per-pair bandwidth matrix, the plan for the
small model (8 layers, hidden 256, seq 256) and what tensor parallel across the slow link would cost.
``--baseline`` first profiles the same two namespaces without the throttle. Needs root, ``ip`` and ``tc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NS = ("mpnode0", "mpnode1")
VETH = ("mpveth0", "mpveth1")
ADDR = ("10.77.0.1", "10.77.0.2")
SMALL_MODEL = {"name": "small", "layers": 8, "hidden": 256, "heads": 8, "kv_heads": 4, "vocab": 2048,
               "mlp": "swiglu", "norm": "rmsnorm", "position": "rope"}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def netns_available() -> str:
    """'' when namespaces can be made here, else why not (one line)."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = "mpprobe"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return ""


def teardown() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)   # deleting a namespace deletes its end of the veth pair


# Token bucket of the throttle: 64 KiB burst (a few MTU-sized packets over the rate's tick), 100 ms queue.
# tbf rather than netem: this kernel has no sch_netem (`tc qdisc add ... netem` answers "qdisc kind is unknown").
TBF_BURST, TBF_LATENCY = "64kb", "100ms"


def setup(rate: str | None) -> None:
    """Two namespaces, a veth pair between them, loopback up, and (``rate``) a tc token-bucket throttle on
    both ends."""
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    for ns, dev, addr in zip(NS, VETH, ADDR):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        if rate:
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", TBF_BURST, "latency", TBF_LATENCY)


def profile_two_nodes(out: Path, budget: str, model_path: Path, ranks_per_node: int = 2, port: int = 29533,
                      max_message: str = "4M", reps: int = 3, timeout: float = 600) -> tuple[float, str]:
    """Run the profile on both namespaces at once; returns (seconds, node 0's stderr tail)."""
    procs = []
    begin = time.time()
    for i, (ns, dev) in enumerate(zip(NS, VETH)):
        env = {**os.environ, "GLOO_SOCKET_IFNAME": dev}
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "meshplan.cli", "profile",
                "--cluster", f"localhost:{ranks_per_node}", "--nnodes", "2", "--node-rank", str(i),
                "--master-addr", ADDR[0], "--master-port", str(port), "--local-addr", ADDR[i], "--budget", budget,
                "--model", str(model_path), "--seq-len", "256", "--max-message", max_message, "--reps", str(reps),
                "--out", str(out)]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [p.communicate(timeout=max(1.0, timeout - (time.time() - begin))) for p in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"the two-node profile did not finish in {timeout:.0f}s") from None
    codes = [p.returncode for p in procs]
    if any(codes):
        raise RuntimeError(f"profile failed {codes}: " + " || ".join(e[-1500:] for _, e in outputs))
    return time.time() - begin, outputs[0][1][-600:] + outputs[1][1][-600:]


def plan_json(cluster: Path, model_path: Path, fixes: list[str] = ()) -> dict:
    argv = [sys.executable, "-m", "meshplan.cli", "plan", "--model", str(model_path), "--cluster", str(cluster),
            "--global-batch", "16", "--seq-len", "256", "--precision", "fp32", "--format", "json", "--top", "3"]
    for f in fixes:
        argv += ["--fix", f]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip())
    return json.loads(proc.stdout)


def summarize(cluster: Path, model_path: Path) -> dict:
    """Links, pair matrix, the plan and the cost of tensor parallel across the slow link."""
    import yaml

    data = yaml.safe_load(cluster.read_text())
    best = plan_json(cluster, model_path)["plans"][0]
    try:   # every rank's gradient all-reduce over the inter-node link
        crossing = plan_json(cluster, model_path, ["dp=4"])["plans"][0]
    except RuntimeError as error:
        crossing = {"error": str(error)}
    return {"intra_node": {k: data["intra_node"][k] for k in ("bandwidth_gbps", "latency_us")},
            "inter_node": {k: data["inter_node"][k] for k in ("bandwidth_gbps", "latency_us")},
            "pair_bandwidth_gbps": data["measured"]["links"]["pair_bandwidth_gbps"],
            "gpus_per_node": data["gpus_per_node"], "best": best, "dp4": crossing}


def report(name: str, s: dict) -> str:
    def deg(p):
        return f"dp={p['dp']} tp={p['tp']} pp={p['pp']} cp={p['cp']}"

    lines = [f"## {name}",
             f"intra-node: busbw {s['intra_node']['bandwidth_gbps']:.3g} GB/s, latency {s['intra_node']['latency_us']:.0f} us",
             f"inter-node: busbw {s['inter_node']['bandwidth_gbps']:.3g} GB/s, latency {s['inter_node']['latency_us']:.0f} us",
             "pair bandwidth (GB/s, one direction while both run):"]
    for row in s["pair_bandwidth_gbps"]:
        lines.append("  " + " ".join(f"{x:7.3f}" for x in row))
    b = s["best"]
    bd = b["predicted"]["time_breakdown_s"]
    lines.append(f"plan: {deg(b)} mb={b['micro_batch']}, predicted {b['predicted']['iteration_s']:.3f} s/step "
                 f"(dp_comm {bd.get('dp_comm', 0):.3f} s, pp_comm {bd.get('pp_comm', 0):.3f} s); tp inside a node: "
                 f"{'yes' if b['tp'] <= s['gpus_per_node'] else 'NO'}")
    t = s["dp4"]
    if "error" in t:
        lines.append(f"dp=4 (gradients all-reduced across the link): {t['error']}")
    else:
        lines.append(f"dp=4 (gradients all-reduced across the link): {t['predicted']['iteration_s']:.3f} s/step "
                     f"({t['predicted']['iteration_s'] / b['predicted']['iteration_s']:.2f}x the plan), dp_comm "
                     f"{t['predicted']['time_breakdown_s'].get('dp_comm', 0):.3f} s")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", default="200mbit", help="tc tbf rate on each veth end")
    p.add_argument("--budget", default="90s")
    p.add_argument("--baseline", action="store_true", help="profile without the throttle first")
    p.add_argument("--out-dir", default=None)
    a = p.parse_args()
    why = netns_available()
    if why:
        print(f"cannot make network namespaces here: {why}", file=sys.stderr)
        return 2
    work = Path(a.out_dir or tempfile.mkdtemp(prefix="meshplan-netns-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml
    model_path = work / "small.yaml"
    model_path.write_text(yaml.safe_dump(SMALL_MODEL))
    print(f"load average {os.getloadavg()[0]:.2f} at start; work dir {work}")
    try:
        runs = ([("baseline (no throttle)", None)] if a.baseline else []) + [(f"throttled veth ({a.rate})", a.rate)]
        for name, rate in runs:
            setup(rate)
            out = work / f"cluster-{'base' if rate is None else 'slow'}.yaml"
            seconds, _ = profile_two_nodes(out, a.budget, model_path)
            print(report(name, summarize(out, model_path)))
            print(f"(profile took {seconds:.0f}s with --budget {a.budget}; load {os.getloadavg()[0]:.2f}; file {out})\n")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
