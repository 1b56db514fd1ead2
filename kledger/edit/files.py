"""A model's safetensors files read and written without building the model: the edited layers'
base weights read straight from them, and an edited model directory written by copying them and
overwriting the edited tensors' bytes in place. This is how `kledger apply` solves and writes
without importing transformers (see `Editor.solve_unloaded`). numpy and safetensors only.

A directory qualifies when its weights are safetensors files (one `model.safetensors`, or shards
named by `model.safetensors.index.json`) holding every tensor in float32, so that what is written
is what loading the model in float32 and saving it would give; anything else returns None and the
caller loads the model.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .spec import ArchSpec

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# files of a Hugging Face model directory that an edited copy carries over unchanged
CARRIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
           "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes lie: its file, byte offset from the file's start, shape."""

    file: str
    offset: int
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 4
        for s in self.shape:
            n *= s
        return n


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (its first 8 bytes give the header's length)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError("header too large")
        head = json.loads(f.read(n))
    head["__start__"] = 8 + n
    return head


def weight_files(directory: Path) -> list[str] | None:
    """The safetensors files holding the model's weights, or None when there are none."""
    if (directory / INDEX).is_file():
        try:
            index = json.loads((directory / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            return None
        return files if files and all("/" not in f and (directory / f).is_file() for f in files) else None
    return [SINGLE] if (directory / SINGLE).is_file() else None


def locate(directory: Path, spec: "ArchSpec", layers: Iterable[int],
           shapes: Mapping[int, tuple[int, int]] | None = None) -> dict[int, Slot] | None:
    """Where each edited layer's down-projection weight lies in the directory's files, or None
    when the directory does not qualify (see the module's note) or a tensor is missing."""
    files = weight_files(directory)
    if files is None:
        return None
    slots: dict[str, Slot] = {}
    try:
        for name in files:
            head = _header(directory / name)
            start = head.pop("__start__")
            head.pop("__metadata__", None)
            for tname, t in head.items():
                if t.get("dtype") != "F32":
                    return None
                b, e = t["data_offsets"]
                slots[tname] = Slot(name, start + int(b), tuple(int(s) for s in t["shape"]))
                if slots[tname].nbytes != int(e) - int(b):
                    return None
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    found = {}
    for la in layers:
        slot = slots.get(spec.down_proj_name(int(la)))
        if slot is None or len(slot.shape) != 2:
            return None
        found[int(la)] = slot
    return found


def _canonical(a: "np.ndarray", spec: "ArchSpec") -> "np.ndarray":
    return a.T if spec.layout == "in_out" else a


def read_weights(directory: Path, spec: "ArchSpec", slots: Mapping[int, Slot]) -> dict[int, "np.ndarray"]:
    """The tensors at `slots`, canonical [d_out, d_in], float32."""
    import numpy as np

    out = {}
    for la, s in slots.items():
        with open(directory / s.file, "rb") as f:
            f.seek(s.offset)
            buf = f.read(s.nbytes)
        if len(buf) != s.nbytes:
            raise OSError(f"{s.file} is shorter than its header says")
        out[la] = np.ascontiguousarray(_canonical(np.frombuffer(bytearray(buf), dtype="<f4").reshape(s.shape), spec))
    return out


def write_edited(directory: Path, dest: Path, spec: "ArchSpec", slots: Mapping[int, Slot],
                 weights: Mapping[int, "np.ndarray"]) -> None:
    """Into the empty directory `dest`: the model's carried files and weight files copied, the
    edited tensors (canonical [d_out, d_in]) written over their bytes in the copies."""
    import numpy as np

    names = [n for n in CARRIED if (directory / n).is_file()] + (weight_files(directory) or [])
    if (directory / INDEX).is_file():
        names.append(INDEX)
    for name in names:
        shutil.copyfile(directory / name, dest / name)
    for la, s in slots.items():
        w = np.ascontiguousarray(_canonical(np.asarray(weights[la], dtype=np.float32), spec), dtype="<f4")
        if tuple(w.shape) != s.shape:
            raise ValueError(f"layer {la}: solved weight of shape {w.shape}, the file holds {s.shape}")
        with open(dest / s.file, "r+b") as f:
            f.seek(s.offset)
            f.write(w.tobytes())
