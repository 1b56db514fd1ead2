"""Settings: the environment variables and defaults kledger reads, read once into one object.

No other module reads `os.environ`: the CLI (or a library caller) makes one `Settings`, usually
`Settings.from_env()`, and passes it down; `Ledger.open`/`Ledger.init` take one (default: from
the environment at that moment). Values are validated when they are read (KLEDGER_DATE when a
commit time is taken), so a bad variable is a one-line usage error.

| variable | field | meaning |
|---|---|---|
| KLEDGER_DIR | ledger_dir | the ledger to use (like `--ledger`) |
| KLEDGER_AUTHOR | author | commit author (default user@host) |
| KLEDGER_DATE | date | commit time, ISO 8601 (reproducible histories) |
| KLEDGER_MODEL | model | the model `init` records (default smollm2-135m) |
| KLEDGER_LOCK_WAIT | lock_wait | seconds to wait for a busy ledger (default 5) |
| KLEDGER_DEVICE | device | where the model runs: auto, cpu, cuda, cuda:N (default auto) |
| KLEDGER_CACHE | model_cache | where the default model's safetensors cache lives |
| HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME | hub_cache | the Hugging Face hub cache |
| KLEDGER_FAULT | fault | fault injection for the crash tests: die at that named point |
| KLEDGER_WORKERS | workers | measure a commit's facts across this many Ray workers (like `commit --workers`; 0: in process) |
| KLEDGER_RAY_ADDRESS | ray_address | an existing Ray cluster to measure on (like `commit --ray`) |
| KLEDGER_MAX_MEMORY | max_memory | load the model across devices, e.g. `0=20GiB,cpu=64GiB`; the rest on disk (device_map) |
"""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

from .errors import UsageError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_BRANCH = "main"
DEFAULT_LOCK_WAIT = 5.0
# Solver modes of `apply` (kledger.edit.solve implements them), the default first.
MODES = ("accumulated", "alphaedit", "alphaedit-no-history", "no-history")
DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")

# A progress callback: (stage, done, total). The library reports; the CLI draws.
Progress = Callable[[str, int, int], None]


def report(progress: Progress | None, stage: str, done: int, total: int) -> None:
    """Call `progress` if there is one."""
    if progress is not None:
        progress(stage, done, total)


def colour_forced(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks rich to colour output that is not a terminal."""
    env = os.environ if env is None else env
    return any(env.get(v) for v in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"))


def note(progress: Progress | None, stage: str, text: str) -> None:
    """Say why a stage ends where it does (a step budget not used up), if the progress callback
    can show it (its `note` attribute)."""
    show = getattr(progress, "note", None)
    if show is not None:
        show(stage, text)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"unknown solver mode {mode!r}", f"choose one of {', '.join(MODES)}")
    return mode


def check_device(name: str | None) -> str:
    """The device name's shape only (auto, cpu, cuda, cuda:N); kledger.edit.device checks that it
    exists, which needs torch."""
    value = (name or "auto").strip().lower()
    if not DEVICE_RE.fullmatch(value):
        raise UsageError(f"unknown device {name!r}", "use --device auto, cpu, cuda or cuda:N")
    return value


def check_workers(value: object) -> int:
    """A number of Ray workers: a whole number from 0 (in process) to 1,024."""
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if not 0 <= n <= 1024:
        raise UsageError(f"workers must be a whole number from 0 to 1024, got {str(value)[:20]!r}",
                         "e.g. --workers 4 (0: measure in this process)")
    return n


_SIZE_RE = re.compile(r"[0-9]+(\.[0-9]+)?\s*([KMGT]i?B|B)?", re.IGNORECASE)


def parse_max_memory(text: str) -> tuple[tuple[str, str], ...]:
    """`0=20GiB,1=20GiB,cpu=64GiB` → (("0", "20GiB"), ...): devices (a GPU index, cpu) and sizes."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        dev, _, size = part.partition("=")
        dev, size = dev.strip().lower(), size.strip()
        if not (dev == "cpu" or dev.isdigit()) or not _SIZE_RE.fullmatch(size):
            raise UsageError(f"KLEDGER_MAX_MEMORY: {part!r} is not DEVICE=SIZE",
                             "e.g. KLEDGER_MAX_MEMORY=0=20GiB,cpu=64GiB (a GPU index or cpu, and a size)")
        out.append((dev, size))
    return tuple(out)


def _hub_cache(env: Mapping[str, str]) -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(env[var]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


@dataclass(frozen=True)
class Settings:
    ledger_dir: str | None = None
    author: str | None = None
    date: str | None = None
    model: str | None = None
    lock_wait: float = DEFAULT_LOCK_WAIT
    device: str = "auto"
    model_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "kledger" / "models")
    hub_cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "huggingface" / "hub")
    fault: str | None = None
    workers: int = 0  # Ray workers that measure a commit's facts (kledger.edit.scale); 0: in process
    ray_address: str | None = None  # an existing Ray cluster (None: a local one, when workers > 0)
    max_memory: tuple[tuple[str, str], ...] = ()  # (device, size) pairs: load the model across them (device_map)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, device: str | None = None) -> "Settings":
        """The settings from `env` (default: the process environment). `device` (the CLI's
        --device) takes the place of $KLEDGER_DEVICE, which is then not read."""
        env = os.environ if env is None else env
        wait = env.get("KLEDGER_LOCK_WAIT")
        try:
            lock_wait = DEFAULT_LOCK_WAIT if wait in (None, "") else float(wait)
        except ValueError:
            raise UsageError(f"KLEDGER_LOCK_WAIT={wait!r} is not a number",
                             "set it to the seconds to wait for a busy ledger, e.g. 5") from None
        cache = env.get("KLEDGER_CACHE")
        return cls(ledger_dir=env.get("KLEDGER_DIR") or None, author=env.get("KLEDGER_AUTHOR") or None,
                   date=env.get("KLEDGER_DATE") or None, model=env.get("KLEDGER_MODEL") or None,
                   lock_wait=lock_wait, device=check_device(device if device is not None else env.get("KLEDGER_DEVICE")),
                   model_cache=Path(cache) if cache else Path.home() / ".cache" / "kledger" / "models",
                   hub_cache=_hub_cache(env),
                   fault=env.get("KLEDGER_FAULT") or None,
                   workers=check_workers(env.get("KLEDGER_WORKERS") or 0),
                   ray_address=env.get("KLEDGER_RAY_ADDRESS") or None,
                   max_memory=parse_max_memory(env.get("KLEDGER_MAX_MEMORY") or ""))

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    def now(self) -> str:
        """Commit time: `date` when set (for reproducible histories), else now, in UTC, ISO 8601."""
        if self.date:
            try:
                dt = datetime.fromisoformat(self.date)
            except ValueError as exc:
                raise UsageError(f"KLEDGER_DATE={self.date!r} is not an ISO 8601 date",
                                 "use e.g. 2026-01-31T12:00:00+00:00") from exc
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
        else:
            dt = datetime.now(timezone.utc)
        return dt.astimezone(timezone.utc).replace(microsecond=0).isoformat()

    def default_author(self) -> str:
        if self.author:
            return self.author
        try:
            user = getpass.getuser()
        except Exception:  # pragma: no cover - no user database
            user = "unknown"
        return f"{user}@{socket.gethostname()}"

    def fault_point(self, name: str) -> None:
        """Fault injection for the crash-safety tests: with KLEDGER_FAULT=name the process dies
        here, mid-transaction, as if killed."""
        if self.fault == name:
            os._exit(137)
