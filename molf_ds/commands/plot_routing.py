"""`molf-ds plot-routing ROUTING.jsonl -o routing.png`: the experts' shares over training, per projection type,
per layer and per module (the paper's routing-dynamics figures), from a routing log."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from molf_ds.optim.layout import projection_type

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
    """Four panels: each expert's share of all decisions; the share of the first expert (`full`, or `lora0` for
    MoLF-E) per projection type and per layer over training; and the winner of every module at every step."""
    import matplotlib  # deferred: slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    steps, modules, experts, winners = read_log(path)
    first = experts[0]
    wins_first = winners[:, :, 0].astype(float)  # [step, module]
    figure, ((overall, by_type), (by_layer, grid)) = plt.subplots(2, 2, figsize=(14, 9))
    for i, expert in enumerate(experts):
        overall.plot(steps, winners[:, :, i].mean(axis=1), label=expert, linewidth=1.4)
    overall.set(title="share of all modules each expert updated", ylabel="share of modules")
    kinds = list(dict.fromkeys(projection_type(m) for m in modules))
    for kind in kinds:
        columns = [i for i, m in enumerate(modules) if projection_type(m) == kind]
        by_type.plot(steps, wins_first[:, columns].mean(axis=1), label=kind, linewidth=1.2)
    by_type.set(title=f"share of `{first}` per projection type", ylabel=f"share of the type's modules: {first}")
    for axes in (overall, by_type):
        axes.set(xlabel="optimizer step", ylim=(-0.02, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8, ncol=2)

    layers = [int(m.group(1)) if (m := LAYER.search(name)) else -1 for name in modules]
    rows = sorted(set(layers))
    share = np.array([wins_first[:, [i for i, v in enumerate(layers) if v == layer]].mean(axis=1) for layer in rows])
    extent = (steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5)
    image = by_layer.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1,
                            extent=extent)
    by_layer.set(xlabel="optimizer step", ylabel="layer", title=f"share of `{first}` per layer")
    figure.colorbar(image, ax=by_layer, fraction=0.04)

    colours = ListedColormap(plt.get_cmap("tab10").colors[: len(experts)])
    grid.imshow(winners.argmax(axis=2).T, aspect="auto", interpolation="nearest", cmap=colours, vmin=-0.5,
                vmax=len(experts) - 0.5, extent=(steps[0] - 0.5, steps[-1] + 0.5, len(modules) - 0.5, -0.5))
    grid.set(xlabel="optimizer step", ylabel="module (model order)", title="winning expert per module and step")
    grid.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours(i)) for i in range(len(experts))],
                labels=experts, loc="upper right", fontsize=8)
    figure.suptitle(f"MoLF routing: {len(modules)} modules, {len(steps)} logged steps")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
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
