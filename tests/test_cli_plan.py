"""`meshplan plan` end to end: output formats, --out, and one clean line for every bad input."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from meshplan.cli import app
from meshplan.plan import Plan

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["plan", *args])


def assert_one_line_error(result, code, *words):
    assert result.exit_code == code, result.output
    err = [line for line in result.stderr.strip().splitlines() if not line.startswith("assuming ")]
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    for word in words:
        assert word in err[0], err[0]


def test_default_plan_says_what_it_assumed():
    result = run()
    assert result.exit_code == 0, result.output
    assert "assuming --model llama3-8b --cluster dgx-h100:1" in result.stderr
    assert "llama3-8b on dgx-h100:1" in result.stdout and "reproduce plan 1" in result.stdout


def test_json_output_and_plan_file(tmp_path):
    out = tmp_path / "plan.yaml"
    result = run("--model", "llama3-70b", "--cluster", "dgx-h100:32", "--global-batch", "512", "--seq-len", "8192",
                 "--fix", "tp=8", "--top", "2", "--format", "json", "--out", str(out))
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"plans", "search", "rejected"}
    assert len(data["plans"]) == 2 and all(p["tp"] == 8 for p in data["plans"])
    first = data["plans"][0]
    for key in ("num_microbatches", "stages", "predicted"):
        assert key in first
    for key in ("iteration_s", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gib", "time_breakdown_s",
                "memory_breakdown_gib"):
        assert key in first["predicted"]
    assert data["search"]["seconds"] > 0 and data["search"]["evaluated"] > 0
    plan = Plan.load(out)
    assert plan.to_dict(with_inputs=False)["predicted"] == first["predicted"]


@pytest.mark.parametrize("fmt", ["yaml", "markdown", "table"])
def test_other_formats(fmt):
    result = run("--global-batch", "16", "--seq-len", "2048", "--format", fmt)
    assert result.exit_code == 0, result.output
    if fmt == "yaml":
        assert "plans" in yaml.safe_load(result.stdout)
    if fmt == "markdown":
        assert "|   # |" in result.stdout


def test_hf_config_and_model_yaml(tmp_path):
    hf = tmp_path / "mistral" / "config.json"
    hf.parent.mkdir()
    hf.write_text(json.dumps({"model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
                              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                              "vocab_size": 32000, "hidden_act": "silu"}))
    assert run("--model", str(hf), "--global-batch", "16", "--seq-len", "4096").exit_code == 0
    my = tmp_path / "m.yaml"
    my.write_text("name: small\nlayers: 8\nhidden: 1024\nheads: 16\nvocab: 32000\nmlp: gelu\nnorm: layernorm\n")
    assert run("--model", str(my), "--global-batch", "16", "--seq-len", "1024").exit_code == 0


def test_cluster_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "nodes": 2, "gpus_per_node": 4,
                                    "gpu": {"name": "A100-40GB", "memory_gib": 40, "peak_tflops": 312,
                                            "memory_bandwidth_gbps": 1555},
                                    "intra_node": {"bandwidth_gbps": 200, "latency_us": 5},
                                    "inter_node": {"bandwidth_gbps": 20, "latency_us": 10}}))
    result = run("--model", "llama2-7b", "--cluster", str(path), "--global-batch", "32", "--seq-len", "4096")
    assert result.exit_code == 0, result.output
    assert "8 x A100-40GB" in result.stdout


@pytest.mark.parametrize("args,words", [
    (["--model", "llama9-1t"], ["--model", "presets"]),
    (["--model", "/nonexistent/model.yaml"], ["--model"]),
    (["--cluster", "dgx-z100:4"], ["--cluster", "unknown cluster preset"]),
    (["--cluster", "dgx-h100:0"], ["--cluster"]),
    (["--cluster", "dgx-h100"], ["needs a node count"]),
    (["--global-batch", "0"], ["--global-batch", ">= 1"]),
    (["--seq-len", "-5"], ["--seq-len"]),
    (["--precision", "fp4"], ["--precision", "bf16"]),
    (["--fix", "tp"], ["--fix", "KEY=VALUE"]),
    (["--fix", "tp=3"], ["--fix tp", "divide"]),
    (["--fix", "pp=999"], ["--fix pp"]),
    (["--fix", "dp=8", "--fix", "tp=2"], ["--fix", "multiply"]),
    (["--fix", "schedule=zigzag"], ["--fix schedule", "gpipe"]),
    (["--fix", "recompute=half"], ["--fix recompute"]),
    (["--fix", "zero=4"], ["--fix zero"]),
    (["--fix", "wat=1"], ["--fix wat", "unknown key"]),
    (["--top", "0"], ["--top"]),
    (["--global-batch", "1000000000"], ["--global-batch"]),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    assert_one_line_error(run(*args), 2, *words)


def test_malformed_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nlayers: [1, 2\n")
    assert_one_line_error(run("--model", str(bad)), 2, "not valid YAML", "line")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert_one_line_error(run("--model", str(listy)), 2, "mapping")
    unknown = tmp_path / "u.yaml"
    unknown.write_text("name: x\nlayers: 2\nhidden: 64\nheads: 4\nvocab: 10\ncolour: red\n")
    assert_one_line_error(run("--model", str(unknown)), 2, "colour", "unknown key")
    heads = tmp_path / "h.yaml"
    heads.write_text("name: x\nlayers: 2\nhidden: 64\nheads: 5\nvocab: 10\n")
    assert_one_line_error(run("--model", str(heads)), 2, "heads")
    cluster = tmp_path / "c.yaml"
    cluster.write_text("name: c\nnodes: 2\ngpus_per_node: 8\ngpu: {name: g, memory_gib: -1, peak_tflops: 1, "
                       "memory_bandwidth_gbps: 1}\nintra_node: {bandwidth_gbps: 1, latency_us: 1}\n")
    assert_one_line_error(run("--cluster", str(cluster)), 2, "memory_gib")
    hf = tmp_path / "config.json"
    hf.write_text('{"model_type": "llama", "hidden_size": 4096')
    assert_one_line_error(run("--model", str(hf)), 2, "not valid JSON")


def test_model_that_fits_nowhere_exits_3():
    result = run("--model", "llama3-405b", "--cluster", "dgx-h100:1", "--global-batch", "8", "--seq-len", "8192")
    assert_one_line_error(result, 3, "no configuration fits", "at least", "GPUs of 79.6 GiB")
    cpu = run("--model", "llama3-8b", "--cluster", "localhost:2", "--global-batch", "2", "--seq-len", "64",
              "--precision", "fp32", "--no-profile")
    assert_one_line_error(cpu, 3, "no configuration fits", "GiB per process", "processes of")


def test_console_script_runs_without_importing_torch():
    code = ("import sys; from meshplan.cli import main; sys.argv=['meshplan','plan','--global-batch','8',"
            "'--seq-len','1024']\ntry:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_precision_defaults_to_the_devices_own(tmp_path):
    """bf16 on GPUs, fp32 on CPU ranks (the only precision they train in); bf16 asked of CPU ranks is refused."""
    for cluster, extra, expected in (("dgx-h100:1", [], "bf16"), ("localhost:2", ["--no-profile"], "fp32")):
        out = tmp_path / f"{expected}.yaml"
        result = run("--model", "tiny-llama", "--cluster", cluster, "--global-batch", "8", "--seq-len", "64",
                     "--out", str(out), *extra)
        assert result.exit_code == 0, result.output
        assert Plan.load(out).train.precision == expected
    refused = run("--model", "tiny-llama", "--cluster", "localhost:2", "--precision", "bf16", "--no-profile")
    assert_one_line_error(refused, 2, "--precision", "bf16 on CPU ranks", "fp32")


def test_localhost_answers_what_measuring_cannot_change_before_measuring(monkeypatch, tmp_path):
    """A model that fits nowhere, or a --fix the model refuses, fails at once on localhost: the quick profile
    (which times compute and links, not memory) is not started."""
    from meshplan.profiler import cli as profiler_cli

    def no_profile(*args, **kwargs):
        raise AssertionError("the quick profile ran")
    monkeypatch.delenv("MESHPLAN_NO_PROFILE", raising=False)
    monkeypatch.setenv("MESHPLAN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(profiler_cli, "measure", no_profile)
    too_big = run("--model", "llama3-8b", "--cluster", "localhost:2", "--global-batch", "2", "--seq-len", "64")
    assert_one_line_error(too_big, 3, "no configuration fits")
    assert_one_line_error(run("--model", "tiny-llama", "--cluster", "localhost:2", "--fix", "tp=3"), 2, "--fix tp")
    assert not list(tmp_path.iterdir())
