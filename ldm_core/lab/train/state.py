"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

`state.safetensors` holds `model.<name>.<key>`, `ema.<name>.<key>`,
`optim.<name>.<param index>.<slot>` (tensor slots of the optimizer state) and `rng`
(the training generator's state as uint8). `state.json` holds the step, the run's
config, the optimizer param groups and non-tensor slots, and stage-specific values.
Both are written to temporary files and renamed, JSON last, so a run killed while
saving resumes from the previous complete state. The tensors file also records its step in
its metadata, so a reader that catches a run between the two renames (an export of a run
that is saving) gets an error instead of one step's weights under another step's JSON.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def optimizer_to_flat(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{name}.{index}.{slot}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[slot] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, slot = key[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[slot] = value
    for index, slots in meta["scalars"].items():
        state.setdefault(int(index), {}).update(slots)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(folder: Path, *, step: int, modules: dict[str, torch.nn.Module], emas: dict[str, Any],
               optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator, info: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
    optim_meta = {}
    for name, module in modules.items():
        tensors.update({f"model.{name}.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    for name, ema in emas.items():
        tensors.update({f"ema.{name}.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    for name, opt in optimizers.items():
        flat, meta = optimizer_to_flat(name, opt)
        tensors.update(flat)
        optim_meta[name] = meta
    _atomic(folder / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata={"step": str(step)}))
    doc = {"step": step, "optimizers": optim_meta, **info}
    _atomic(folder / STATE_JSON, lambda p: p.write_text(json.dumps(doc, indent=1, sort_keys=True)))


def has_state(folder: Path) -> bool:
    return (folder / STATE_JSON).is_file() and (folder / STATE_TENSORS).is_file()


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if not has_state(folder):
        raise FileNotFoundError(f"no training state in {folder} (expected {STATE_JSON} and {STATE_TENSORS})")
    with safe_open(str(folder / STATE_TENSORS), "pt") as f:  # tensors and their step from one opening of the file
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads((folder / STATE_JSON).read_text())
    if "step" in meta and int(meta["step"]) != int(doc.get("step", -1)):
        raise RuntimeError(f"{folder}: {STATE_TENSORS} is from step {meta['step']} but {STATE_JSON} from step "
                           f"{doc.get('step')}: the run is writing its state right now; try again in a moment")
    return tensors, doc


def sub_state(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` with it removed (e.g. "model.unet.")."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_weights(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], emas: dict[str, Any]) -> None:
    """The modules' and EMA copies' weights from a saved state's tensors (strict: every key)."""
    for name, module in modules.items():
        module.load_state_dict(sub_state(tensors, f"model.{name}."), strict=True)
    for name, ema in emas.items():
        ema.load_state_dict(sub_state(tensors, f"ema.{name}."))


def load_state(folder: Path, *, modules: dict[str, torch.nn.Module], emas: dict[str, Any],
               optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator) -> dict:
    """Restore everything `save_state` wrote; returns the JSON document (step, info)."""
    tensors, doc = read_state(folder)
    load_weights(tensors, modules, emas)
    for name, opt in optimizers.items():
        optimizer_from_flat(name, opt, tensors, doc["optimizers"][name])
    generator.set_state(tensors["rng"])
    return doc
