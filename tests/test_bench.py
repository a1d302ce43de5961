"""`molf-ds bench` machinery on the smallest bundled config, 2 gloo ranks, 2 measured steps: the files it
writes, the ratios, and the collectives it counts. Never asserts on wall time."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import lab as bench
from benchmarks.lab import report
from molf_ds.commands import cli
from molf_ds.commands.methods import BENCH_METHODS as METHODS

ROW_KEYS = {
    "cell", "stage", "offload", "method", "optimizer", "trainable_params", "step_ms", "tokens_per_s",
    "forward_backward_ms", "engine_step_ms", "optimizer_ms", "peak_rss_mib", "collectives_per_step",
    "collective_mib_per_step", "engine_step_collectives", "optimizer_gb_per_s", "isolated_ms", "isolated_gb_per_s",
    "optimizer_vs_best_adamw", "ratios",
}


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = cli.parser().parse_args([  # as `molf-ds bench ...` parses it
        "bench", "--model", "qwen2-h256", "--stages", "2", "--offload", "none", "--methods", ",".join(METHODS),
        "--warmup", "1", "--steps", "2", "--seq", "16", "--reference-repeats", "1", "--shared-process",
        "--no-progress", "--out", str(out), "--plot",
    ])
    assert args.func(args) == 0
    return out, json.loads((out / "bench.json").read_text())


@pytest.mark.slow
def test_files_and_keys(bench_run):
    out, result = bench_run
    assert {"settings", "world", "machine", "rows", "command"} <= result.keys()
    assert result["world"] == 2 and result["settings"]["model"] == "qwen2-h256"
    assert [r["method"] for r in result["rows"]] == list(METHODS)
    for row in result["rows"]:
        assert "error" not in row, row
        assert ROW_KEYS <= row.keys(), ROW_KEYS - row.keys()
        assert row["measured_steps"] == 2 and row["stage"] == 2 and row["offload"] is False
        assert row["interleaved"] is True and row["alone_step_ms"] > 0  # step times from the interleaved run
        pair = ["fft", "molf"] if row["method"] in ("fft", "molf") else ["lora", "molf-e"]  # each with its baseline
        assert row["interleaved_with"] == [f"zero2/{m}" for m in pair], row["interleaved_with"]
        assert {"own", "deepspeed_cpu_adam", "torch_adamw_fused"} <= row["isolated_ms"].keys()
    md = (out / "bench.md").read_text()
    assert md.count("| ZeRO-2 |") == 2 * len(METHODS)  # a row per method in each of the two tables
    for png in ("step_vs_fft.png", "optimizer_gbps.png", "peak_memory.png"):
        assert (out / png).stat().st_size > 0


@pytest.mark.slow
def test_huge_pages(bench_run):
    """Every rank allocates its big CPU tensors on transparent huge pages (the default), where the kernel offers
    them."""
    result = bench_run[1]
    assert result["huge_pages"] is True
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.is_file() or "[never]" in thp.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    assert all(row["huge_page_mib"] > 0 for row in result["rows"])


@pytest.mark.slow
def test_ratios(bench_run):
    rows = {r["method"]: r for r in bench_run[1]["rows"]}
    for method, row in rows.items():
        for base in ("fft", "lora"):
            assert row["ratios"][f"step_vs_{base}"] == pytest.approx(row["step_ms"] / rows[base]["step_ms"])
            assert row["ratios"][f"optimizer_vs_{base}"] == pytest.approx(
                row["optimizer_ms"] / rows[base]["optimizer_ms"])
    assert rows["fft"]["ratios"]["step_vs_fft"] == 1.0 and rows["lora"]["ratios"]["step_vs_lora"] == 1.0
    for method, base in (("molf", "fft"), ("molf-e", "lora")):  # step by step against the baseline beside it
        per_step = sorted(a / b for a, b in zip(rows[method]["step_ms_by_step"], rows[base]["step_ms_by_step"]))
        assert len(per_step) == 2
        assert rows[method]["ratios"][f"step_paired_vs_{base}"] == pytest.approx(sum(per_step) / 2)
        assert rows[method]["ratios"][f"step_paired_quartiles_vs_{base}"] == pytest.approx(
            [per_step[0] * 3 / 4 + per_step[1] / 4, per_step[0] / 4 + per_step[1] * 3 / 4])
    assert not any(k.startswith("step_paired") for m in ("fft", "lora") for k in rows[m]["ratios"])
    assert "step_paired_vs_lora" not in rows["molf"]["ratios"]  # run beside FFT, not beside LoRA
    for method, base in (("molf", "fft"), ("molf-e", "lora")):  # each paired ratio beside its compute floor
        q = rows[method]["ratios"]
        assert q["floor"] == bench_run[1]["floors"][method]
        assert q["step_over_floor"] == pytest.approx(q[f"step_paired_vs_{base}"] / q["floor"])
    assert bench_run[1]["floors"]["molf"] > 1 and bench_run[1]["floors"]["molf-e"] == 1.0  # LoRA's rank: their sum
    assert "floor" not in rows["fft"]["ratios"]
    text = report.text(bench_run[1])
    assert "x FFT" in text and "x best AdamW" in text


@pytest.mark.slow
def test_routing_recorded(bench_run):
    rows = {r["method"]: r for r in bench_run[1]["rows"]}
    assert set(rows["molf"]["routing_shares"]) == {"full", "lora0"}
    assert set(rows["molf-e"]["routing_shares"]) == {"lora0", "lora1"}
    assert sum(rows["molf"]["routing_shares"].values()) == pytest.approx(1.0)  # top-1: one winner per module
    assert "routing_shares" not in rows["fft"]


@pytest.mark.slow
@pytest.mark.parametrize("molf, baseline", [("molf", "fft"), ("molf-e", "lora")])
def test_exactly_one_more_all_reduce(bench_run, molf, baseline):
    """Same stage, same param grouping (fft takes MoLF's three groups; lora and molf-e have one): routing adds
    one all-reduce per optimizer step, of n_modules x n_experts float64 sums."""
    rows = {r["method"]: r for r in bench_run[1]["rows"]}
    ours = Counter(name for name, _ in rows[molf]["engine_step_collectives"])
    theirs = Counter(name for name, _ in rows[baseline]["engine_step_collectives"])
    assert ours - theirs == Counter({"allreduce": 1}) and not theirs - ours
    n_modules, n_experts = 4 * 7, 2  # qwen2-h256: 4 layers x 7 projections; full + lora0, or lora0 + lora1
    assert [n_modules * n_experts * 8] == [b for name, b in rows[molf]["engine_step_collectives"]
                                           if name == "allreduce" and b == n_modules * n_experts * 8]
    assert rows[molf]["ratios"][f"collectives_minus_{baseline}"] == 1


def test_floors_by_hand():
    """6 FLOPs per trained and 4 per frozen parameter and token: P = 1000, L(r) = 10 r."""
    floors = report.floors(1000, 10, (20,), (4, 16), 20)
    assert floors == {"molf": pytest.approx(1.2), "molf-e": 1.0}
    assert report.floors(1000, 10, (20,), (4, 16), 10)["molf-e"] == pytest.approx((4000 + 1200) / (4000 + 600))


def test_merge_takes_step_times_from_the_interleaved_run():
    """Memory and the isolated optimizer steps come from the cell's own run, step times and collectives from its
    steps in the interleaved run; an error in either run marks the row."""
    def steps(seconds: float, collectives: int) -> list[dict]:
        keys = ("step_s", "forward_backward_s", "engine_step_s", "optimizer_s", "step_cpu_s", "engine_step_cpu_s",
                "optimizer_cpu_s")
        return [{**dict.fromkeys(keys, seconds), "collectives": collectives, "collective_bytes": 8,
                 "step_collectives": [["allreduce", 8]], "optimizer_bytes": 28, "loss": 1.0}] * 3

    ident = {"cell": "zero2/molf", "stage": 2, "offload": False, "method": "molf", "world": 2}
    alone = [{**ident, "rank": r, "steps": steps(2.0, 5), "optimizer": "MoLFAdamW", "trainable_params": 10,
              "tokens_per_step": 100, "peak_rss_bytes": (r + 1) * 2**20, "huge_page_bytes": 0} for r in range(2)]
    timed = [{**ident, "rank": r, "steps": steps(0.5 + r, 7)} for r in range(2)]
    row = report.merge(alone, timed)
    assert row["interleaved"] and row["step_ms"] == 1500.0 and row["alone_step_ms"] == 2000.0
    assert row["collectives_per_step"] == 7 and row["peak_rss_mib"] == 2.0 and row["tokens_per_s"] == 100 / 1.5
    assert report.merge(alone)["step_ms"] == 2000.0 and not report.merge(alone)["interleaved"]
    failed = [{**timed[0], "error": "RuntimeError: boom"}, timed[1]]
    assert report.merge(alone, failed)["error"] == "RuntimeError: boom"


def test_cells_and_arguments():
    cells = bench.cells_for([0, 2], ["none", "cpu"], ["fft", "molf"])
    assert cells == [(0, False, "fft"), (0, False, "molf"), (2, False, "fft"), (2, False, "molf"),
                     (2, True, "fft"), (2, True, "molf")]  # no offload at stage 0
    with pytest.raises(ValueError, match="unknown method"):
        bench.cells_for([2], ["none"], ["adam"])


def test_without_checkout_says_where_bench_runs(monkeypatch, capsys):
    """An installed wheel has no benchmarks/ beside molf_ds: `molf-ds bench` says, in one line, where it runs."""
    from molf_ds.commands import bench as command

    monkeypatch.setattr(command, "checkout", lambda: None)
    assert cli.main(["bench", "--model", "qwen2-h256", "--stages", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "git checkout" in err and "pip install -e ." in err


@pytest.mark.slow
def test_gpu_optimizer_dry_run(tmp_path):
    """benchmarks/gpu_optimizer.sh --dry-run: both parts end to end on CPU, MoLF on the Triton kernels (interpreted),
    routing forced each way, ZeRO-2 and ZeRO-3 steps of MoLF beside FFT."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "gpu")}
    done = subprocess.run([str(root / "benchmarks" / "gpu_optimizer.sh"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    optimizer = json.loads((tmp_path / "gpu-dry-run" / "optimizer.json").read_text())
    rows = {r["routing"]: r for r in optimizer["rows"]}
    assert rows["full"]["routing_shares"]["full"] == 1.0 and rows["lora"]["routing_shares"]["lora0"] == 1.0
    assert {r["backend"] for r in rows.values()} == {"triton"}
    assert rows["lora"]["step_elements"]["update"] < rows["full"]["step_elements"]["update"]
    steps = json.loads((tmp_path / "gpu-dry-run" / "steps" / "bench.json").read_text())
    cells = {(r["stage"], r["method"]) for r in steps["rows"] if "error" not in r}
    assert cells == {(2, "fft"), (2, "molf"), (3, "fft"), (3, "molf")}, steps["rows"]
