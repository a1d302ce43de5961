"""What each method of `molf-ds compare` trains: the LoRA baselines' defaults (MoLF's own LoRA expert) and, per
run, its adapter settings, trainable parameters and lrs, for the comparison table.

`lora` and `lora-rest` take every `lora.*` key the user left unset (r, alpha, use_rslora, dropout,
target_modules) from MoLF's settings: the first expert of `molf` (its rank and alpha), or, where only `molf-e` is
compared, a LoRA of the sum of MoLF-E's ranks (the same total rank, as `molf-ds bench` and `estimate-memory`
compare them) with its first expert's alpha.
"""
from __future__ import annotations

import json
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .memory import load_config as model_config
from .methods import EXPERT_BASELINES, MOLF_METHODS, REGISTRY, is_molf, trains_base, uses_lrs
from .sources import SourceError
from .train.methods import shaped_model

if TYPE_CHECKING:
    from .train.config import TrainConfig

EXPERT_KEYS = ("r", "alpha", "use_rslora", "dropout", "target_modules")  # lora.* keys taken from MoLF's expert
SETTINGS = ("ranks", "alphas", "scaling", "rslora", "dropout", "trainable_params", "lr", "lora_lr")  # CSV columns


def expert_source(methods: list[str], yaml_method: Any) -> str:
    """The MoLF method whose settings the LoRA baselines take: molf if compared, else molf-e if compared, else the
    YAML's own method if it is one of them, else molf (MoLF's defaults)."""
    own = yaml_method if isinstance(yaml_method, str) and is_molf(yaml_method) else "molf"
    return next((m for m in MOLF_METHODS if m in methods), own)


def expert_settings(source: TrainConfig) -> dict[str, tuple[Any, str]]:
    """lora.* key -> (value, where it comes from) of the LoRA expert of `source` (a molf or molf-e config)."""
    molf, given = source.molf_config(), source.molf

    def where(field: str, part: str = "") -> str:
        return f"molf.{field}{part}" if field in given else f"MoLF's default {field}{part}"

    if not trains_base(source.method):  # molf-e: its experts as one LoRA of their total rank
        r = (sum(molf.lora_ranks), f"sum of molf-e's {where('lora_ranks')}")
    else:
        r = (molf.lora_ranks[0], where("lora_ranks", "[0]"))
    return {"r": r, "alpha": (molf.lora_alphas[0], where("lora_alphas", "[0]")),
            "use_rslora": (molf.use_rslora, where("use_rslora")), "dropout": (molf.lora_dropout, where("lora_dropout")),
            "target_modules": (list(molf.target_modules), where("target_modules"))}


def baseline_overrides(expert: dict[str, tuple[Any, str]], given: dict[str, Any]) -> tuple[list[str], str]:
    """The `lora.KEY=VALUE` overrides for the expert keys the user did not set (`given`: the raw lora.* section), and
    what the baseline took and from where."""
    overrides, said = [], []
    for key in EXPERT_KEYS:
        if key in given:
            said.append(f"{key}={_show(given[key])} (lora.{key})")
        else:
            value, source = expert[key]
            overrides.append(f"lora.{key}={json.dumps(value)}")
            said.append(f"{key}={_show(value)} ({source})")
    return overrides, ", ".join(said)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return json.dumps(value) if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def baselines_line(source: TrainConfig | None, said: dict[str, str], adalora: TrainConfig | None) -> str:
    """One line: which settings each baseline took and from where (`said`: per expert baseline, from
    baseline_overrides; `source`: the MoLF config they took them from; `adalora`: its resolved config)."""
    groups: dict[str, list[str]] = {}
    for method in EXPERT_BASELINES:
        if method in said:
            groups.setdefault(said[method], []).append(method)
    took = "molf-e's experts as one LoRA of their total rank" if source and not trains_base(source.method) else \
        "molf's LoRA expert"
    parts = [f"{' and '.join(names)} take{'s' if len(names) == 1 else ''} {took} where lora.* is unset: {text}"
             for text, names in groups.items()]
    excluded = source.molf_config().exclude_modules if source is not None else ()
    if excluded and any("(lora.target_modules)" not in text for text in groups):
        parts[-1] += f" (molf.exclude_modules={','.join(excluded)} has no lora.* key: list lora.target_modules)"
    if adalora is not None:
        lo = adalora.lora
        parts.append(f"adalora takes lora.* (set or default): init_r={lo.init_r}, target_r={lo.target_r}, "
                     f"alpha={lo.alpha:g}, dropout={lo.dropout:g}")
    return "baselines: " + "; ".join(parts) if parts else ""


# ---- per run, for the table --------------------------------------------------------------------------
def describe(config: TrainConfig, trainable: int | None) -> dict[str, str]:
    """The SETTINGS of one run's config, as text: adapter ranks / alphas / scaling (per expert, joined by '/'),
    rsLoRA, dropout, trainable parameters, and the lrs the method uses (empty where it uses none)."""
    method, lo, t = config.method, config.lora, config.train
    freeze = False
    if is_molf(method):
        molf = config.molf_config()
        ranks, alphas = list(molf.lora_ranks), list(molf.lora_alphas)
        rslora, dropout = molf.use_rslora, molf.lora_dropout
        freeze = bool(molf.freeze_non_linear)
    elif REGISTRY[method].adapter == "adalora":  # PEFT scales by alpha / init_r (its ranknum)
        ranks, alphas, rslora, dropout = [lo.init_r], [lo.alpha], False, lo.dropout
    elif REGISTRY[method].peft:
        ranks, alphas, rslora, dropout = [lo.r], [lo.alpha], lo.use_rslora, lo.dropout
    else:
        ranks, alphas, rslora, dropout = [], [], False, None
    scaling = [a / (math.sqrt(r) if rslora else r) for r, a in zip(ranks, alphas)]
    uses_lr, uses_lora_lr = uses_lrs(method, freeze)
    adalora = REGISTRY[method].adapter == "adalora"
    return {
        "ranks": f"{lo.init_r}->{lo.target_r}" if adalora else "/".join(map(str, ranks)),
        "alphas": "/".join(f"{a:g}" for a in alphas),
        "scaling": "/".join(f"{s:.6g}" for s in scaling),
        "rslora": str(rslora).lower() if ranks else "",
        "dropout": "" if dropout is None else f"{dropout:g}",
        "trainable_params": "" if trainable is None else str(trainable),
        "lr": f"{t.lr:g}" if uses_lr else "",
        "lora_lr": f"{t.lora_lr:g}" if uses_lora_lr else "",
    }


def trainable_parameters(config: TrainConfig) -> int | None:
    """The run's trainable parameters, counted on its architecture built on the meta device and set up as the run
    sets it up (MoLF wrapping, PEFT, lora-rest's extra parameters); None where the model's config is not at hand."""
    from transformers import AutoConfig, AutoModelForCausalLM  # deferred: slow to import

    m = config.model
    try:
        try:
            architecture = model_config(m.name_or_path, "model.name_or_path", gguf_file=m.gguf_file)
        except SourceError:  # a hub id: its run downloaded it
            architecture = AutoConfig.from_pretrained(m.name_or_path, gguf_file=m.gguf_file)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecations that PEFT calls into
            model = shaped_model(config, AutoModelForCausalLM.from_config(architecture))
    except (OSError, ValueError, RuntimeError, ImportError):  # the table goes on without the count
        return None
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
