"""The benchmark runs end to end and reports its figures (no timing is asserted)."""

from __future__ import annotations

from harness.bench import bench_llm


def test_bench_reports_every_condition_and_the_ideal_speedup():
    out = bench_llm("random:tiny", drop="random:k=2,ratio=0.75", repeats=1, warmup=0)
    for needle in ("stock LlamaModel.forward", "segprune loop, no method", "random:k=2,ratio=0.75",
                   "loop / stock:", "FLOPs-ideal", "peak memory", "stock layers, the pruned token counts",
                   "stock layers at the same token counts"):
        assert needle in out
    ideal = float(out.split("FLOPs-ideal ")[1].split("x")[0])
    assert 1.5 < ideal < 4  # 75% of 256 image tokens dropped from layer 2 of 8: far from 1, below 4


def test_bench_takes_budget_specs_and_pre_llm_methods():
    out = bench_llm("random:tiny", drop="visionzip@75%", repeats=1, warmup=0)
    assert "(64 entering the LLM with visionzip)" in out and "visionzip:dominant=54,contextual=10" in out
