"""Where the model runs and the solves happen: CUDA when there is one, the CPU otherwise.

The name comes from the caller's `Settings.device` (`--device` on the command line, or
$KLEDGER_DEVICE, read once by kledger.settings): "auto" (the default), "cpu", "cuda" or
"cuda:N". The device never changes what is stored: constraints are kept on the CPU in float32,
solves run in float64 with TF32 off on either device, and results come back to the CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

CHOICES = "auto, cpu, cuda or cuda:N"


def check_device_name(name: str) -> str:
    """`name` if it names a device kledger can use here; InputError otherwise. Cheap: imports
    torch only to ask whether CUDA is available."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}", f"use {CHOICES}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {name!r} is not supported", f"use {CHOICES}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} was asked for, but this machine has no CUDA device "
                             "(or torch was built without CUDA)", "use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)", "use cuda:0 or auto")
    return name


def resolve_device(name: str | None = None) -> torch.device:
    """The torch device for `name` (a `Settings.device`; None: "auto")."""
    name = check_device_name(name if name is not None else "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_of(model: Any) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
