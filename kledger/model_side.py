"""The ledger's glue to the model side (kledger.edit): the ledger's Editor, and the library calls
behind `commit`'s measuring, `apply`, `ask` and `eval`.

Each function takes the Ledger first and reads its parts (store, history, model, settings; the
Editor is kept on it); the facade (`Ledger.apply`, `.ask`, `.evaluate`, `.editor`) and
kledger.commits call them. The constraints in force come from `History.constraints_at`. The
model side itself (kledger.edit.editor.Editor) is given constraints and returns weights or
constraints; it knows nothing of commits. Importing this module needs
neither torch nor transformers; `apply` of a revision solved before needs neither either.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .errors import InputError, LedgerLocked, ModelError, StateError, UsageError, missing_model_module
from .records import Constraint, Fact, constraints_hash, short
from .settings import Progress, check_mode, report

CACHE_SECRET = "apply_cache_secret"  # ledger meta: the key of the apply cache's MACs
DEFAULTS_VERSION_KEY = "defaults_version"  # meta: the version of the default hyper-parameters
# a fact whose object has less probability than this on its own prompt (P̄, as `eval` scores) does
# not hold: `commit` names new facts below it, `eval` the facts in force below it
WEAK_BELOW = 0.5

if TYPE_CHECKING:  # pragma: no cover
    from .edit.editor import Editor
    from .ledger import Ledger


def editor(ledger: "Ledger", progress: Progress | None = None, **options: Any) -> "Editor":
    """The ledger's Editor: its model, hyper-parameter overrides and corpus (`options` may replace
    `model`, `overrides`, `corpus`), its store for C0 and the fingerprint memo, its apply cache
    and Settings. One per Ledger unless options are given; torch loads when the model is used."""
    from .edit.editor import Editor

    if options or ledger._editor is None:
        if not ledger.has_model and "model" not in options:
            raise StateError("this ledger has no model (it was made with --model none)",
                             "make a ledger with `kledger init --model NAME` to edit a model")
        if not ledger.measured and "model" not in options:
            raise StateError("this ledger was replayed with `init --from --no-measure`: its commits carry no "
                             "constraints, so it can be checked but cannot measure, apply, ask, eval or replay",
                             "replay the text ledger again without --no-measure, with the model installed")
        opts = {"model": ledger.model, "overrides": json.loads(ledger.store.meta("hparams") or "{}"),
                "corpus": ledger.store.meta("corpus"), "defaults_version": defaults_version(ledger), **options}
        ledger._editor = Editor(opts.pop("model"), store=ledger.store, cache_dir=ledger.path / "cache" / "apply",
                                prior_dir=ledger.path / "cache" / "prior", env=ledger.env, progress=progress,
                                cache_secret=_cache_secret(ledger), **opts)
    elif progress is not None:
        ledger._editor.progress = progress
    return ledger._editor


def check_loadable(model: str | None, env: Any) -> None:
    """A ModelError, before a ledger is made, when its model cannot be found offline: the default
    model needs its package (or its converted cache), another name a local directory or a
    snapshot in the Hugging Face cache. Nothing is imported or loaded ("none": nothing to check)."""
    from .edit.weights import gguf_path, model_source
    from .settings import DEFAULT_MODEL

    if model in (None, "", "none"):
        return
    if model == DEFAULT_MODEL:
        if model_source(model, env) is None:
            gguf_path()  # says which package to install
        return
    if model_source(model, env) is None:
        raise ModelError(f"cannot load model {model!r} offline: it is neither a local directory nor in the Hugging Face "
                         f"cache ({env.hub_cache})", "download it there first, give a local directory, or use --model none")


def defaults_version(ledger: "Ledger") -> int:
    """The version of the default hyper-parameters the ledger was made with (1: made before
    versions were recorded)."""
    value = ledger.store.meta(DEFAULTS_VERSION_KEY)
    try:
        return int(value) if value is not None else 1
    except ValueError:
        raise StateError(f"the ledger's defaults_version {value!r} is not a number",
                         "run `kledger fsck`; the ledger's meta table was edited by hand") from None


def _cache_secret(ledger: "Ledger") -> str | None:
    """The ledger's key for the apply cache's MACs (made at `init`; for a ledger made before
    that, the first time it is needed, kept by `persist`)."""
    secret = ledger.store.meta(CACHE_SECRET)
    if secret is None:
        import secrets

        secret = secrets.token_hex(32)
        with ledger.store.transaction():
            ledger.store.set_meta(CACHE_SECRET, secret)
    return secret


def persist(ledger: "Ledger") -> None:
    """Write what a command that only reads deferred on its way (C0, the fingerprint memo, the
    cache key: see `Store`), when the write lock comes; when it does not, only those caches are
    lost (the next command computes them again)."""
    if ledger.store.read_only and ledger.store.deferred:
        try:
            ledger.store.upgrade()
        except LedgerLocked:
            pass


def store_constraints(ledger: "Ledger", cid: str, rows: list[Constraint]) -> None:
    """Store commit `cid`'s measured constraints with the fingerprint they depend on (in the
    caller's transaction)."""
    if not rows:
        return
    fp_id, body = editor(ledger).fingerprint()
    ledger.store.put_fingerprint(fp_id, body)
    ledger.store.put_constraints(cid, rows)


def load_at(ledger: "Ledger", cid: str | None, mode: str = "accumulated", progress: Progress | None = None,
            batches: list[list[Constraint]] | None = None) -> dict:
    """Write the weights at `cid` (solved with `mode`; None: the base weights) into the ledger's
    in-memory model; returns the solve's info ({} for the base weights). `batches`: the
    constraints in force at `cid`, when the caller has them already."""
    ed = editor(ledger, progress)
    if cid is None:
        ed.load(None)
        return {}
    weights, info = ed.solve(ledger.history.constraints_at(cid) if batches is None else batches, mode)
    ed.load(weights)
    return info


def _needs_edit_extra(doing: str, replay_hint: bool = False) -> Callable:
    """A missing torch or transformers (the `edit` extra) in the decorated call becomes a one-line
    ModelError saying how to install it (kledger.errors.missing_model_module), not a traceback."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ImportError as exc:
                err = missing_model_module(exc, doing, replay_hint)
                if err is None:
                    raise
                raise err from None
        return call
    return wrap


# ---------------------------------------------------------------------------- commit: measuring

@_needs_edit_extra("measuring facts' keys for soft conflicts", replay_hint=True)
def first_keys(ledger: "Ledger", facts: list[Fact]) -> dict:
    """fact id → first-edited-layer key of each fact that no commit has measured yet (the keys
    soft conflicts compare), measured in one short forward pass; {} on a ledger without a model or
    without soft conflicts, or when every fact has stored keys."""
    if not ledger.has_model or not ledger.measured or ledger.soft_threshold() is None:
        return {}
    known = ledger.store.measured_facts(f.id for f in facts)
    todo = [f for f in facts if f.id not in known]
    return editor(ledger).first_keys(todo) if todo else {}


@_needs_edit_extra("measuring facts on the model", replay_hint=True)
def measure(ledger: "Ledger", parent: str | None, facts: list[Fact], exclude: Iterable[str] = (),
            progress: Progress | None = None, *, skip_known: bool = False,
            probe: Sequence[tuple[str, str]] = (), probed: dict | None = None) -> tuple[str | None, list[Constraint]]:
    """(constraints hash, constraints) of `facts` measured against apply(parent) (without the
    constraints of the facts in `exclude`); with `skip_known`, only of those no commit has
    measured yet. (None, []) when there is nothing to measure or the ledger has no model."""
    if not ledger.has_model:
        return None, []
    if skip_known:
        known = ledger.store.measured_facts(f.id for f in facts)
        facts = [f for f in facts if f.id not in known]
    if not facts:
        return None, []
    rows = editor(ledger, progress).measure(ledger.history.constraints_at(parent), facts, exclude=exclude,
                                            probe=probe, probed=probed)
    return constraints_hash(rows), rows


# ---------------------------------------------------------------------------- apply, ask

@_needs_edit_extra("apply")
def apply(ledger: "Ledger", rev: str | None = "HEAD", mode: str = "accumulated", out_dir: Path | None = None,
          delta: Path | None = None, progress: Progress | None = None, force: bool = False,
          lora: Path | None = None, rank: int | None = None) -> dict:
    """Solve the constraints in force at `rev` (float64) and write the edited model: `delta`, only
    the edited tensors (safetensors + manifest); `out_dir`, a Hugging Face model directory; `lora`,
    the change as a PEFT LoRA adapter of rank `rank` (default: exact; kledger.edit.lora). A
    revision solved before is answered from the apply cache without loading the model (nor
    torch); one not solved before is solved without loading the model when the ledger remembers
    its files (`Editor.solve_unloaded`), and `out_dir` is then written by copying the model's
    safetensors files with the edited tensors replaced (`Editor.model_files`), else the model is
    loaded. The paths are checked before anything is loaded or solved, and written whole or not
    at all; a directory or file that kledger did not write is replaced only with `force`
    (kledger.edit.weights.check_out_dir, check_delta_path). The `kledger apply` document."""
    check_mode(mode)
    out_dir, delta, lora = _check_outputs(out_dir, delta, lora, rank, force)
    cid = ledger.history.resolve(rev)
    ed = editor(ledger, progress)
    batches = ledger.history.constraints_at(cid)

    def meta(fp_id: str) -> dict:
        return {"revision": cid, "mode": mode, "fingerprint": fp_id, "model": ed.model_name}

    outputs = {"out_dir": out_dir, "delta": delta, "lora": lora, "rank": rank, "force": force}
    hit = ed.cached(batches, mode) or ed.solve_unloaded(batches, mode)
    needs_files = out_dir is not None or lora is not None
    files = ed.model_files(hit.model_type, hit.info["layers"]) if hit is not None and needs_files else None
    if hit is not None and (not needs_files or files is not None):  # nothing to load: no transformers
        info = hit.info
        written = _write_unloaded(ledger, ed, hit, files, meta(hit.fingerprint), **outputs)
    else:
        weights, info = ed.solve(batches, mode)
        written = _write_loaded(ledger, ed, weights, meta(ed.fingerprint()[0]), **outputs)
    persist(ledger)
    return {"revision": cid, **info, **written}


def _check_outputs(out_dir: Path | None, delta: Path | None, lora: Path | None, rank: int | None,
                   force: bool) -> tuple[Path | None, Path | None, Path | None]:
    """`apply`'s output paths, checked before anything is loaded or solved."""
    from .edit.weights import check_delta_path, check_out_dir

    if rank is not None and (lora is None or rank < 1):
        raise UsageError("--rank takes a whole number >= 1 and goes with --lora", "e.g. --lora adapter --rank 16")
    out_dir = check_out_dir(out_dir, force) if out_dir is not None else None
    lora = check_out_dir(lora, force) if lora is not None else None
    if out_dir is not None and lora is not None and (out_dir == lora or out_dir in lora.parents
                                                     or lora in out_dir.parents):
        raise UsageError(f"--lora {lora} and --out {out_dir} overlap, and each is replaced as a whole",
                         "write them to separate directories")
    if delta is not None:
        delta = check_delta_path(delta, force)
        for d in (out_dir, lora):
            if d is not None and d in delta.parents:
                raise UsageError(f"--delta {delta} is inside {d}, which is replaced as a whole",
                                 "write the delta somewhere else")
    return out_dir, delta, lora


def _write_unloaded(ledger: "Ledger", ed: Any, hit: Any, files: Any, meta: dict, *, out_dir: Path | None,
                    delta: Path | None, lora: Path | None, rank: int | None, force: bool) -> dict[str, Any]:
    """`apply`'s outputs from solved weights without the model: the delta; the model's own files
    copied with the edited tensors written over and the adapter, both from `files`
    (Editor.model_files: W0 read from them)."""
    written: dict[str, Any] = {}
    if delta is not None:
        from .edit.weights import write_delta

        t, m = write_delta(delta, hit.weights, hit.spec(), meta=meta, force=force)
        written["delta"], written["manifest"] = str(t), str(m)
    if out_dir is not None:
        from .edit.weights import save_edited_files

        written["model"] = str(save_edited_files(files, hit.weights, out_dir, meta=meta, force=force,
                                                 before_rename=lambda: ledger.env.fault_point("apply-out")))
    if lora is not None:
        from .edit.files import read_weights
        from .edit.lora import save_adapter

        directory, spec, slots = files
        written.update(save_adapter(lora, hit.weights, read_weights(directory, spec, slots), spec, ed.model_name,
                                    rank, meta=meta, force=force))
    return written


def _write_loaded(ledger: "Ledger", ed: Any, weights: dict, meta: dict, *, out_dir: Path | None,
                  delta: Path | None, lora: Path | None, rank: int | None, force: bool) -> dict[str, Any]:
    """`apply`'s outputs with the model loaded (`weights`: the solve, torch tensors by layer)."""
    written: dict[str, Any] = {}
    if delta is not None:
        from .edit.weights import save_delta

        t, m = save_delta(delta, weights, ed.lm.spec, meta=meta, force=force)
        written["delta"], written["manifest"] = str(t), str(m)
    if lora is not None:
        from .edit.lora import save_adapter

        written.update(save_adapter(lora, {la: w.double().numpy() for la, w in weights.items()},
                                    {la: w.double().numpy() for la, w in ed.W0.items()}, ed.lm.spec, ed.model_name,
                                    rank, meta=meta, force=force))
    if out_dir is not None:
        from .edit.weights import save_model

        ed.load(weights)
        written["model"] = str(save_model(ed.lm.model, ed.lm.tokenizer, out_dir, meta=meta, force=force,
                                          before_rename=lambda: ledger.env.fault_point("apply-out")))
    return written


@_needs_edit_extra("ask")
def ask(ledger: "Ledger", prompt: str, rev: str | None = "HEAD", mode: str = "accumulated", top: int = 5,
        max_new_tokens: int = 8, progress: Progress | None = None) -> dict:
    """The model's greedy answer and top next tokens at `rev` (its facts applied with `mode`),
    beside the base model's. The `kledger ask` document."""
    check_mode(mode)
    from .edit.ask import answer

    cid = ledger.history.resolve(rev)
    ed = editor(ledger, progress)  # (refuses a ledger that cannot edit the model; loads nothing yet)
    batches = ledger.history.constraints_at(cid)  # checked before anything runs
    ed.load(None)
    bos = ed.hparams.bos
    base = answer(ed.lm, prompt, top, max_new_tokens, bos)
    load_at(ledger, cid, mode, batches=batches)
    edited = answer(ed.lm, prompt, top, max_new_tokens, bos)
    persist(ledger)
    return {"prompt": prompt, "revision": cid, "mode": mode, "base": base, "edited": edited}


# ---------------------------------------------------------------------------- eval

@dataclass
class EvalOptions:
    """What `kledger eval` measures. `data` None: the facts in force at each revision. `history`:
    also every commit of the revision's first-parent history; `plot`: and plot it there."""

    mode: str = "accumulated"
    data: Path | None = None
    fmt: str | None = None
    limit: int | None = None
    text: Path | None = None
    ppl_tokens: int = 2048
    gen_tokens: int = 32
    batch_size: int = 32
    history: bool = False
    plot: Path | None = None
    plot_title: str = ""

    def __post_init__(self) -> None:
        if self.plot is not None:
            self.history = True  # the plot is of the history

    def check(self) -> "EvalOptions":
        """Refuse bad options before anything slow happens (no ledger needed)."""
        _check_options(self)
        return self


def _records(ledger: "Ledger", cid: str, opts: EvalOptions, fixed: list[Fact] | None) -> list[Fact]:
    if fixed is not None:
        return fixed
    facts = ledger.history.facts_in_force(cid)
    return facts[:opts.limit] if opts.limit else facts


def _fixed_records(opts: EvalOptions) -> list[Fact] | None:
    """The records of `--data`, or None (the facts in force); checks `--text` too."""
    fixed = None
    if opts.data is not None:
        from .formats import read_facts

        fixed = read_facts(opts.data, opts.fmt, opts.limit)
    if opts.text is not None and not Path(opts.text).is_file():
        raise InputError(f"cannot read text {opts.text}: no such file", "give a UTF-8 text file")
    return fixed


def _check_options(opts: EvalOptions) -> None:
    """Refuse bad options before anything slow happens."""
    check_mode(opts.mode)
    if opts.ppl_tokens < 0 or opts.gen_tokens < 0:
        raise InputError("token counts must be 0 or more", "give --ppl-tokens and --gen-tokens ≥ 0")
    if opts.fmt is not None and opts.data is None:
        raise UsageError("--format applies to --data only", "give --data FILE, or leave out --format")
    if opts.plot is not None:
        if not Path(opts.plot).parent.is_dir():
            raise InputError(f"cannot write the plot {opts.plot}: no folder {Path(opts.plot).parent}",
                             "give a path in an existing folder")
        try:
            import matplotlib  # noqa: F401  (fail before the slow part)
        except ImportError:
            raise StateError("--plot needs matplotlib, which is not installed", "pip install 'kledger[eval]'") from None


@_needs_edit_extra("eval")
def evaluate(ledger: "Ledger", rev: str | None = "HEAD", opts: EvalOptions | None = None,
             progress: Progress | None = None) -> dict:
    """Evaluate the model at `rev` beside the base model (the `kledger eval` document, without
    the envelope). Writes nothing to the ledger but the apply cache (and the plot, if asked)."""
    from .edit.evaluate import Scorer, evaluate_model, held_out_text, plot_history, record_kind
    from .edit.hooks import boundary_token

    opts = opts or EvalOptions()
    _check_options(opts)
    started = time.perf_counter()
    cid = ledger.history.resolve(rev)
    fixed = _fixed_records(opts)
    facts = _records(ledger, cid, opts, fixed)
    if not ledger.has_model:
        raise StateError("this ledger has no model (it was made with --model none)",
                         "evaluate a ledger made with `kledger init --model NAME`")
    ed = editor(ledger, progress)  # (refuses a ledger that cannot edit the model; loads nothing yet)
    batches = ledger.history.constraints_at(cid)  # checked before anything runs
    lm = ed.lm
    scorer = Scorer(lm.model, lm.tokenizer, boundary_token(lm.tokenizer, ed.hparams.bos),
                    batch_size=opts.batch_size, spec=lm.spec, progress=progress)
    ed.load(None)
    ppl_ids, text_info = (held_out_text(ed, opts.text, opts.ppl_tokens) if opts.ppl_tokens > 0 else (None, None))
    loaded = time.perf_counter()

    def run(records: list[Fact]) -> dict:
        if ledger.env.workers or ledger.env.ray_address:
            return _eval_across(ledger, ed, scorer, records, opts, ppl_ids, progress)
        return evaluate_model(scorer, records, ppl_ids=ppl_ids, gen_tokens=opts.gen_tokens)

    base = run(facts)
    info = load_at(ledger, cid, opts.mode, batches=batches)
    edited = run(facts)
    res = _document(cid, opts, fixed, facts, [record_kind(f) for f in facts], base, edited, text_info, info)
    hist_s = 0.0
    if opts.history:
        t = time.perf_counter()
        res["history"] = _history(ledger, cid, opts, fixed, base, edited, run, progress)
        hist_s = time.perf_counter() - t
    res["seconds"] = {"load": loaded - started,
                      "records": sum(r["seconds"]["records"] for r in (base, edited)),
                      "greedy": sum(r["seconds"]["greedy"] for r in (base, edited)),
                      "fluency": sum(r["seconds"]["fluency"] for r in (base, edited)),
                      "perplexity": sum(r["seconds"]["perplexity"] for r in (base, edited)),
                      "history": hist_s, "total": time.perf_counter() - started}
    if opts.plot is not None:
        res["plot"] = str(plot_history(res["history"], opts.plot, title=opts.plot_title))
    persist(ledger)
    return res


def _eval_across(ledger: "Ledger", ed: Any, scorer: Any, records: list[Fact], opts: EvalOptions,
                 ppl_ids: Any, progress: Progress | None) -> dict:
    """`evaluate_model` with the records scored across the Ray workers (kledger.edit.scale) and
    the perplexity here."""
    from .edit.evaluate import PPL_WINDOW
    from .edit.scale import evaluate_across

    res = evaluate_across(ledger.env, ed.model_name, ed.lm, ed.hparams.layers, records, bos_id=scorer.bos_id,
                          batch_size=opts.batch_size, gen_tokens=opts.gen_tokens, progress=progress)
    if ppl_ids:
        t = time.perf_counter()
        res["perplexity"] = scorer.perplexity(ppl_ids, PPL_WINDOW)
        res["metrics"]["perplexity"] = res["perplexity"]["perplexity"]
        res["seconds"]["perplexity"] = time.perf_counter() - t
    return res


def _document(cid: str, opts: EvalOptions, fixed: list[Fact] | None, facts: list[Fact], kinds: list[str],
              base: dict, edited: dict, text_info: dict | None, info: dict) -> dict[str, Any]:
    from .edit.evaluate import KINDS

    n = len(facts)
    work = sum(r["seconds"]["records"] + r["seconds"]["greedy"] + r["seconds"]["fluency"] for r in (base, edited))
    return {
        "revision": cid, "mode": opts.mode,
        "data": {"source": "file" if fixed is not None else "ledger",
                 "path": str(opts.data) if opts.data is not None else None, "records": n,
                 **{k: kinds.count(k) for k in KINDS}},
        "base": base["metrics"], "edited": edited["metrics"],
        "text": text_info,
        "generation": {"tokens": opts.gen_tokens, "greedy": True} if opts.gen_tokens > 0 else None,
        "records": [{"fact_id": f.id, "subject": f.subject, "prompt": f.prompt, "target": f.target,
                     "kind": k, "base": b, "edited": e}
                    for f, k, b, e in zip(facts, kinds, base["per_record"], edited["per_record"])],
        "weak": _weak(fixed, facts, edited["per_record"]),
        "weak_below": WEAK_BELOW,
        "facts_solved": info.get("facts"),
        "seconds_per_record": work / n if n else None,
    }


def _weak(fixed: list[Fact] | None, facts: list[Fact], per_record: list[dict]) -> list[dict] | None:
    """The facts in force (None when other records were evaluated) whose object's probability on
    their own prompt is below WEAK_BELOW at the revision."""
    if fixed is not None:
        return None
    return [weak_entry(f, m["p_new_prompt"])
            for f, m in zip(facts, per_record) if m.get("p_new_prompt") is not None and m["p_new_prompt"] < WEAK_BELOW]


def weak_entry(f: Fact, p_new: float) -> dict:
    """A fact that does not hold, as `commit` (meta.weak) and `eval` (weak) report it."""
    return {"fact_id": f.id, "subject": f.subject, "prompt": f.prompt, "target": f.target, "p_new": p_new}


def _history(ledger: "Ledger", cid: str, opts: EvalOptions, fixed: list[Fact] | None, base: dict,
             edited: dict, run: Callable[[list[Fact]], dict], progress: Progress | None) -> list[dict]:
    """One point per commit on `cid`'s first-parent chain, oldest first, after a "base" point (the
    base model on the records evaluated at `cid`)."""
    chain = list(reversed(ledger.history.first_parent_chain(cid)))
    points = [{"commit": None, "label": "base", "records": len(base["per_record"]), "metrics": base["metrics"]}]
    for i, c in enumerate(chain):
        report(progress, "history", i, len(chain))
        if c == cid:
            got = edited
        else:
            load_at(ledger, c, opts.mode)
            got = run(_records(ledger, c, opts, fixed))
        points.append({"commit": c, "label": short(c, 7), "records": len(got["per_record"]),
                       "metrics": got["metrics"]})
    report(progress, "history", len(chain), len(chain))
    return points
