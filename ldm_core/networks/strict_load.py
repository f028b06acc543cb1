"""Strict state-dict loading with errors that name the offending keys."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ldm_core.errors import StateDictMismatchError

_SHOW = 8  # keys listed per category in an error message


def _listing(title: str, items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{title}: {', '.join(items[:_SHOW])}{more}"


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise StateDictMismatchError unless `sd` has exactly the keys and shapes of `module`."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = sorted(
        f"{k} (file {tuple(sd[k].shape)}, model {expected[k]})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(_listing(f"{len(missing)} missing", missing))
        if unexpected:
            parts.append(_listing(f"{len(unexpected)} unexpected", unexpected))
        if wrong:
            parts.append(_listing(f"{len(wrong)} of the wrong shape", wrong))
        raise StateDictMismatchError(
            f"{what}: the weights do not fit the architecture ({'; '.join(parts)}). "
            "The file is of another model variant than detected, or damaged; pass the right "
            "config, or use a file of a supported family."
        )


def load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Load `sd` into `module` strictly, casting to each parameter's dtype; returns the module.

    `assign=True` lets a module built on the meta device take the file's (possibly
    memory-mapped) tensors without allocating twice.
    """
    check_state_dict(module, sd, what)
    own = module.state_dict()
    cast = {k: (v if v.dtype == own[k].dtype else v.to(own[k].dtype)) for k, v in sd.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    return module
