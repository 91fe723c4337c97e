"""Every benchmark script runs in --smoke mode (tiny shapes, seconds) and writes a JSON whose numbers are right.

Each script runs as a subprocess, exactly as a user runs it, with one torch thread (the box is shared: two
threads fighting other processes make tiny steps 50x slower). Timings are noise at these shapes, so only
their sign and finiteness are checked; the exact numbers are the ones a bug would break: ours vs the HF twin
agree to 1e-4 in fp32, the analytic FLOP model matches torch's flop counter, the dense twin has exactly the
MoE's active parameters minus the routers, and a grown checkpoint holds exactly the target's parameters.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--threads", "1",
                        "--out", str(out), *extra], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == name and doc["smoke"] is True and doc["machine"]["torch_threads"] == 1
    return doc


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_throughput(tmp_path):
    doc = run_bench("bench_throughput", tmp_path)
    rows = doc["results"]
    assert {(r["model"], r["dtype"]) for r in rows} == {(m, d) for m in ("dense", "moe") for d in ("fp32", "bf16")}
    assert isinstance(doc["machine"]["bf16_isa"], list) and positive(doc["baseline_rss_gib"])
    assert positive(doc["bf16_probe"]["fp32_gflops"]) and positive(doc["bf16_probe"]["bf16_gflops"])
    for r in rows:
        assert r["max_logit_diff"] < 1e-4, r  # same weights, same function (checked in fp32)
        assert r["tokens_per_step"] == 2 * 32 and not r["failed"] and r["graphs_compiled_while_timing"] == 0
        names = {"ours.eager", "hf.eager"} | ({"hf_loop.eager"} if r["model"] == "moe" else set())
        assert set(r["variants"]) == names, r["variants"].keys()
        v = r["variants"]
        assert r["best"]["ours"] == "ours.eager"  # each framework's best = its fastest variant
        assert r["best"]["hf"] == min((n for n in v if v[n]["framework"] == "hf"), key=lambda n: v[n]["step_ms"])
        speedup = r["speedup_best_vs_best"]
        assert positive(speedup) and r["target_met"] == (speedup >= r["target_speedup"])
        for name, var in v.items():
            assert var["framework"] == name.split(".")[0].split("_")[0] and var["mode"] == "eager"
            assert positive(var["tokens_per_s"]) and positive(var["mfu_pct"]) and len(var["warmup_s"]) == 1
            # the step holds fp32 parameters, gradients and AdamW's two moments at once (bf16 is autocast)
            assert var["memory"]["delta_gib"] * 2**30 >= 16 * r["params"], (name, var["memory"])
        if r["model"] == "moe":
            assert r["active_params"] < r["params"] and positive(r["speedup_vs_hf_loop"])


def test_throughput_presets(monkeypatch):
    """The presets are the real shapes (SmolLM2-135M: 134,515,008 parameters) and explicit flags override them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_throughput as bt

    a = bt.parse(["--preset", "smollm2"])
    assert (a.models, a.seq, a.batch, a.modes, a.tie) == ("dense", 1024, 1, "eager,compiled", True)
    assert bt.model_args("dense", a).num_params() == 134_515_008
    b = bt.parse(["--preset", "smollm2_moe", "--layers", "2", "--seq", "128", "--no-tie"])
    m = bt.model_args("moe", b)
    assert (b.models, b.seq, b.tie, b.hf_loop, m.n_layers, m.n_experts, m.top_k, m.moe_ffn_dim) == \
        ("moe", 128, False, False, 2, 8, 2, 1536)


def test_fused_loss(tmp_path):
    doc = run_bench("bench_fused_loss", tmp_path)
    D, C = doc["dim"], doc["chunk"]
    for r in doc["memory"]:
        N, V, gib = r["seq"], r["vocab"], 2 ** 30
        # plain: fp32 logits, their log-softmax and a gradient of the same size are alive together
        assert r["plain_gib"] >= 3 * N * V * 4 / gib, r
        # fused: one chunk of fp32 logits (+ its bf16 copy), the fp32 dW and dh, a few per-token vectors
        assert r["fused_gib"] <= (1.5 * C * V * 4 + V * D * 4 + 3 * N * D * 4 + 64 * N) / gib, r
    check = doc["real_check"]
    assert all(positive(check[k]) for k in ("plain_rss_gib", "fused_rss_gib", "plain_meta_gib", "fused_meta_gib"))
    assert all(positive(t["plain_over_fused"]) for t in doc["time"].values())


def test_mfu(tmp_path):
    doc = run_bench("bench_mfu", tmp_path)
    rows = doc["results"]
    assert [(r["dim"], r["dtype"]) for r in rows] == [(32, "fp32"), (64, "fp32"), (32, "bf16"), (64, "bf16")]
    for r in rows:
        # torch's flop counter sees every matmul of a real step; ModelArgs also counts the norm weights (<1%).
        assert 0.98 < r["flop_counter_ratio"] <= 1.0, r
        assert positive(r["peak_gflops"]) and positive(r["achieved_gflops"]) and positive(r["mfu_pct"])
        if r["dtype"] == "fp32":  # the fp32 GEMM peak is a ceiling; bf16's may not be (see bench_mfu docstring)
            assert r["mfu_pct"] < 100, r
        assert r["achieved_gflops"] == pytest.approx(r["flops_per_token"] * r["tokens_per_step"] / r["step_ms"] / 1e6)


def test_moe_cost(tmp_path):
    doc = run_bench("bench_moe_cost", tmp_path)
    s = doc["shapes"]
    (row,) = doc["results"]
    assert row["moe_active_params"] - row["dense_params"] == s["layers"] * s["experts"] * s["dim"]
    assert row["moe_params"] > row["moe_active_params"]
    assert positive(row["step_ratio"]) and positive(row["fwd_bwd_ratio"])
    (layer,) = doc["layer_breakdown"]
    assert sum(layer["counts"]) == s["batch"] * s["seq"] * s["top_k"] and len(layer["counts"]) == s["experts"]
    for key in ("layer_ms", "experts_ms", "router_ms", "experts_loop_ms", "layer_fwd_ms"):
        assert positive(layer[key]), key
    assert sum(layer["share"].values()) == pytest.approx(1.0)
    ops = {o["op"] for o in layer["profile"]["top_ops"]}
    assert ops & {"aten::_grouped_mm", "aten::mm", "aten::index_add_"}, ops



def test_moe_capacity(tmp_path):
    doc = run_bench("bench_moe_capacity", tmp_path)
    s = doc["shapes"]
    T, k, E = s["batch"] * s["seq"], s["top_k"], s["experts"]
    rows = {r["variant"]: r for r in doc["results"]}
    assert sorted(rows) == ["c=1", "c=1 padded", "dropless"]
    assert rows["dropless"]["dropped_fraction"] == 0 and rows["dropless"]["expert_rows_per_layer_step"] == T * k
    assert rows["dropless"]["vs_dropless"] == 1.0
    for name in ("c=1", "c=1 padded"):
        r = rows[name]
        assert r["capacity"] == -(-T * k // E) and 0 < r["dropped_fraction"] < 0.5 and positive(r["vs_dropless"])
    assert rows["c=1 padded"]["expert_rows_per_layer_step"] == E * rows["c=1"]["capacity"]
    assert rows["c=1"]["expert_rows_per_layer_step"] == pytest.approx(T * k * (1 - rows["c=1"]["dropped_fraction"]))
    layer = {r["variant"]: r for r in doc["moe_layer_eager"]}
    assert sorted(layer) == sorted(rows) and all(positive(r["layer_ms"]) for r in layer.values())

def test_growth(tmp_path):
    doc = run_bench("bench_growth", tmp_path, "--workdir", str(tmp_path / "work"))
    (row,) = doc["results"]
    assert row["case"] == "tiny_fpi_upcycle" and row["methods"] == ["fpi", "upcycle"]
    # tiny: dim 128, 2 layers, 4 heads / 1 KV head of 32, E4 experts of 256, vocab 256, untied
    D, L, V, E, Fe, hd = 128, 2, 256, 4, 256, 32
    hand = 2 * V * D + D + L * (2 * D + D * 4 * hd * 2 + 2 * D * hd + E * D + E * 3 * D * Fe)
    assert row["target_params"] == hand == row["written_params"] == row["saved_args_params"] and row["params_match"]
    for key in ("grow_s", "load_save_s", "time_ratio", "memory_ratio", "grow_peak_rss_mib", "load_save_peak_rss_mib"):
        assert positive(row[key]), key
    assert row["grow_peak_rss_mib"] >= row["base_rss_mib"] > 0
    assert not (tmp_path / "work" / "tiny_fpi_upcycle_grown").exists()  # grown checkpoints are cleaned up


def test_data(tmp_path):
    doc = run_bench("bench_data", tmp_path, "--workdir", str(tmp_path / "work"))
    rows = doc["rows"]
    assert [r["size_gb"] for r in rows] == [0.3, 1.0] and "raw" in rows[0] and "raw" not in rows[1]
    assert rows[1]["corpus_mb"] >= 1.0 and 0.3 <= rows[0]["corpus_mb"] < 0.4
    for r in rows:
        p = r["prepare"]
        assert p["input_mb"] == pytest.approx(r["corpus_mb"]) and p["workers"] == 2 and p["progress_lines"] >= 1
        assert positive(p["mb_per_cpu_s"]) and positive(p["mb_per_s_per_process"]) and p["tokens"] > 0
        assert positive(r["prepared"]["seconds_to_first_step"]) and r["prepared"]["peak_rss_mib"] > 100
    assert doc["summary"]["corpus_ratio"] == pytest.approx(rows[1]["corpus_mb"] / rows[0]["corpus_mb"])


def test_memory(tmp_path):
    doc = run_bench("bench_memory", tmp_path, "--worlds", "1", "--workdir", str(tmp_path))
    (row,) = doc["train"]
    # smoke: dim 64 -> 128, 2 layers, 8 -> 16 heads of 8 (4 KV), FFN 128 -> 256 as 4 experts, vocab 49152, untied
    D, L, V, E, F = 128, 2, 49152, 4, 256
    hand = 2 * V * D + D + L * (2 * D + 2 * D * D + 2 * D * 4 * 8 + E * D + E * 3 * D * F)
    assert doc["grown_params"] == hand
    assert row["world"] == 1 and row["met"] and row["peak_gib"][0] > row["overhead_gib"] > 0
    conv = doc["convert"]
    assert conv["checkpoint_gib"] * 2**30 >= 4 * hand  # fp32 weights (+ the expert_bias buffers)
    assert conv["largest_shard_gib"] * 2**30 >= 4 * hand  # one safetensors file holds the whole export
    assert conv["export_peak_gib"] > conv["overhead_gib"] and conv["import_peak_gib"] > conv["overhead_gib"]
