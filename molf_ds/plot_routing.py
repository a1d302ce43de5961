"""`molf-ds plot-routing ROUTING.jsonl -o routing.png`: which expert won, module by step, and the share of
`full` updates per layer over time (the paper's routing-dynamics figures), from a routing log."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

LAYER = re.compile(r"\.layers\.(\d+)\.")


def read_log(path: Path) -> tuple[list[int], list[str], list[str], np.ndarray]:
    """(steps, module names, expert names, winners[step, module, expert] as bool); skipped steps left out."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if not line.get("skipped")]
    if not lines:
        raise ValueError(f"{path}: no routed steps in this routing log")
    modules = list(lines[0]["modules"])
    experts = list(next(iter(lines[0]["modules"].values()))["scores"])
    winners = np.array([[[e in line["modules"][m]["winners"] for e in experts] for m in modules] for line in lines])
    return [line["step"] for line in lines], modules, experts, winners


def plot(path: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    steps, modules, experts, winners = read_log(path)
    first_winner = winners.argmax(axis=2).T  # [module, step]: the top expert of each decision
    figure, (grid, lines) = plt.subplots(1, 2, figsize=(14, max(4, len(modules) * 0.06 + 2)),
                                         gridspec_kw={"width_ratios": [3, 2]})
    colours = ListedColormap(plt.get_cmap("tab10").colors[: len(experts)])
    grid.imshow(first_winner, aspect="auto", interpolation="nearest", cmap=colours, vmin=-0.5,
                vmax=len(experts) - 0.5, extent=(steps[0] - 0.5, steps[-1] + 0.5, len(modules) - 0.5, -0.5))
    grid.set(xlabel="optimizer step", ylabel="module (model order)", title="winning expert per module and step")
    grid.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(len(experts))],
                labels=experts, loc="upper right", fontsize=8)
    if "full" in experts:
        layers = [int(m.group(1)) if (m := LAYER.search(name)) else -1 for name in modules]
        full = winners[:, :, experts.index("full")]
        for layer in sorted(set(layers)):
            columns = [i for i, value in enumerate(layers) if value == layer]
            lines.plot(steps, full[:, columns].mean(axis=1), linewidth=1, label=f"layer {layer}")
        lines.set(ylabel="share of the layer's modules updating `full`", ylim=(-0.02, 1.02))
        if len(set(layers)) <= 12:
            lines.legend(fontsize=7)
    else:  # MoLF-E: share of each LoRA expert over all modules
        for i, expert in enumerate(experts):
            lines.plot(steps, winners[:, :, i].mean(axis=1), label=expert)
        lines.set(ylabel="share of modules", ylim=(-0.02, 1.02))
        lines.legend(fontsize=8)
    lines.set(xlabel="optimizer step", title="routing over training")
    lines.grid(alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("routing_log", type=Path, help="a routing.jsonl written by molf_ds")
    parser.add_argument("-o", "--output", type=Path, default=Path("routing.png"), help="PNG to write")


def run(args: argparse.Namespace) -> int:
    try:
        print(plot(args.routing_log, args.output))
    except (OSError, ValueError, KeyError) as error:
        raise SystemExit(f"molf-ds plot-routing: {args.routing_log}: {error}") from None
    return 0
