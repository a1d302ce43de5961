"""examples/replication/report.py: each variant's lrs chosen from the dev runs (compare output directories), the
summary's gaps and paired intervals, and the table of lora_regimes.sh's candidates."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

REPORT = Path(__file__).parent.parent / "examples" / "replication" / "report.py"


def _fake_run(root: Path, method: str, lr: float, lora_lr: float, scores: dict, alphas=(32, 32), seed=100) -> Path:
    run = root / f"lr{lr}" / "runs" / f"{method}-seed{seed}"
    run.mkdir(parents=True)
    config = {"method": method, "molf": {"lora_ranks": [32, 128], "lora_alphas": list(alphas)}, "lora": {"r": 32},
              "data": {"task": "fact"}, "train": {"seed": seed, "lr": lr, "lora_lr": lora_lr, "max_steps": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    (run / "eval.jsonl").write_text(json.dumps({"step": 4, **scores}) + "\n")
    return run


def test_report_selects_each_variants_best_dev_setting(tmp_path):
    spec = importlib.util.spec_from_file_location("replication_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    good, bad = {"efficacy": 1.0, "paraphrase": 0.6, "neighborhood": 0.8}, {"efficacy": 1.0, "paraphrase": 0.2,
                                                                             "neighborhood": 0.9}
    _fake_run(tmp_path, "fft", 1e-4, 1e-4, bad)
    _fake_run(tmp_path, "fft", 2e-4, 2e-4, good)
    _fake_run(tmp_path, "molf-e", 1e-4, 1e-4, good)
    _fake_run(tmp_path, "molf-e", 2e-4, 2e-4, good, alphas=(32, 64))  # equal rsLoRA scaling: its own variant
    dirs = sorted(tmp_path.iterdir())
    assert report.main(["select", *map(str, dirs), "--variants", "fft,molf-e,molf-e-eq",
                        "--table", str(tmp_path / "selection.md"), "--sets", str(tmp_path / "sets.txt")]) == 0
    assert (tmp_path / "sets.txt").read_text().splitlines() == [
        "--set=fft:train.lr=0.0002", "--set=fft:train.lora_lr=0.0002", "--set=molf-e:train.lr=0.0001",
        "--set=molf-e:train.lora_lr=0.0001", "--set=molf-e:train.lr=0.0002", "--set=molf-e:train.lora_lr=0.0002"]
    assert (tmp_path / "selection.md").read_text().count("**yes**") == 3
    assert report.main(["select", *map(str, dirs), "--variants", "lora", "--table", str(tmp_path / "s.md"),
                        "--sets", str(tmp_path / "s.txt")]) == 1


def test_report_summary_gaps_and_molf_e_minus_adalora(tmp_path):
    spec = importlib.util.spec_from_file_location("replication_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for method, efficacy in (("molf", 0.795), ("fft", 0.8), ("lora", 0.6), ("adalora", 0.5), ("molf-e", 0.7)):
            scores = {"efficacy": efficacy + shift, "paraphrase": 0.5, "neighborhood": 0.5}
            _fake_run(tmp_path / "test", method, 1e-4, 1e-4, scores, seed=seed)
    _fake_run(tmp_path / "supplement", "molf", 2e-4, 2e-4, {"efficacy": 0.9, "paraphrase": 0.5, "neighborhood": 0.5})
    (tmp_path / "base.json").write_text(json.dumps({"efficacy": 0.0, "paraphrase": 0.1, "neighborhood": 0.9}))
    assert report.main(["summary", str(tmp_path / "test" / "lr0.0001"), str(tmp_path / "supplement" / "lr0.0002"),
                        "--base", str(tmp_path / "base.json"), "--output", str(tmp_path / "summary.md")]) == 0
    text = (tmp_path / "summary.md").read_text()
    rows = [line.split(" | ")[0].strip("| ") for line in text.splitlines()[2:9]]
    assert rows == ["base model", "fft", "lora", "adalora", "molf", "molf (lr0.0002)", "molf-e"]
    assert "| molf (lr0.0002) | +11.1% **yes** |" in text  # a second directory's MoLF runs: a row of their own
    assert "| fft | 2 | 0.810 ± 0.014 | 0.500 ± 0.000 |" in text
    assert "| molf | -0.6% **yes** | +0.0% **yes** | +0.0% **yes** |" in text  # (0.805 - 0.81) / 0.81
    assert "| molf-e | -12.3% | +0.0% **yes** |" in text  # (0.71 - 0.81) / 0.81
    assert "- molf-e: efficacy +0.200, paraphrase +0.000, neighborhood +0.000" in text
    assert "| molf | fft | 2 | -0.6% [-0.6, -0.6] **within** |" in text  # the same shift on both seeds
    assert "| molf-e | adalora | 2 | +39.2% [+39.2, +39.2] **within** |" in text  # 0.2 / 0.51 of the paired mean


def test_paired_interval_and_verdict():
    spec = importlib.util.spec_from_file_location("replication_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    mean, low, high = report.paired_interval([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303
    assert mean == 2.0 and abs(low - (2 - 4.303 / 3**0.5)) < 1e-12 and abs(high - (2 + 4.303 / 3**0.5)) < 1e-12
    assert report.verdict(-1.5, 3.0) == "**within**" and report.verdict(-5.0, -1.6) == "below"
    assert report.verdict(-2.0, 1.0) == "undecided" and report.verdict(*report.paired_interval([4.0])[1:]) == "one seed"


def test_pilots_table_gives_loras_lead_and_the_neighbourhood_kept(tmp_path):
    spec = importlib.util.spec_from_file_location("replication_report", REPORT)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert report.main(["pilots", str(tmp_path), "--output", str(tmp_path / "summary.md")]) == 1  # nothing yet
    fft = _fake_run(tmp_path, "fft", 2e-4, 2e-4, {"efficacy": 0.8, "paraphrase": 0.8, "neighborhood": 0.8})
    _fake_run(tmp_path, "lora", 2e-4, 2e-4, {"efficacy": 0.6, "paraphrase": 0.6, "neighborhood": 0.6})
    _fake_run(tmp_path, "lora", 4e-4, 4e-4, {"efficacy": 0.9, "paraphrase": 0.9, "neighborhood": 0.9})
    (fft / "forgetting.json").write_text(json.dumps({"efficacy": 0.1, "paraphrase": 0.1, "neighborhood": 0.75}))
    (tmp_path / "base.json").write_text(json.dumps({"efficacy": 0.0, "paraphrase": 0.0, "neighborhood": 0.938}))
    assert report.main(["pilots", str(tmp_path), "--output", str(tmp_path / "summary.md")]) == 0
    lines = (tmp_path / "summary.md").read_text().splitlines()
    assert "neighbourhood kept (base 0.938)" in lines[0] and len(lines) == 5
    assert lines[2:] == ["| lr0.0002 | fft | 4 |  | 0.0002 | 0.800 |  | 1.0000 | 0.750 |",
                         "| lr0.0002 | lora | 4 | 32 | 0.0002 | 0.600 | -0.200 | 1.0000 |  |",
                         "| lr0.0004 | lora | 4 | 32 | 0.0004 | 0.900 |  | 1.0000 |  |"]
