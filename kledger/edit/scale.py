"""Scale-out: a commit's value optimisation sharded across Ray actors (the `scale` extra).

Given the parent's weights, each fact's value optimisation is independent of the others' (its own
δ, its own optimiser state, its own stop rule; kledger.edit.values.optimise_values), and it is almost
all of a commit's cost. So with `Settings.workers` (`commit --workers N`, a local Ray cluster) or
`Settings.ray_address` (`--ray ADDRESS`, an existing one), `Editor.measure` hands the value
optimisation to `RayValues`: a pool of actors, each holding one replica of the model, loaded once
per process and kept across commits; each commit sends the parent's edited weights (a few
megabytes; skipped when an actor holds them already) and one contiguous shard of the facts to
each actor, and gathers the target residuals z in the facts' order. The driver keeps everything
else: the keys, the spreading over the layers, the solves and the store, exactly as in one process.

An actor that dies has its shard run again on another one; when none is left the commit fails
(`ModelError`) before anything is written. Errors raised by kledger inside an actor (a fact longer
than the model's context, say) come back as themselves. Nothing imports ray unless a command asks
for workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import KledgerError, MissingExtraError, ModelError
from ..settings import Progress, Settings, report
from .hparams import HParams

if TYPE_CHECKING:  # pragma: no cover
    import torch

_POOLS: dict[tuple, "_Pool"] = {}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MissingExtraError("measuring across workers needs Ray, which is not installed",
                                "install it with: pip install 'kledger[scale]'") from None
    return ray


class _Worker:
    """One model replica (a Ray actor): the value optimisation of the shards it is given."""

    def __init__(self, model: str, env: Settings, index: int, threads: int | None):
        import torch

        from .weights import load_model

        if threads:
            torch.set_num_threads(threads)
        self.lm = load_model(model, env=env)
        self.env, self.index, self.key = env, index, None

    def ready(self) -> bool:
        """True once the model is loaded (the actor's constructor has run)."""
        return True

    def _at(self, key: str, weights: dict) -> None:
        """The edited layers at `weights` (named by `key`: not copied again when already there)."""
        if self.env.fault in (f"scale-worker-{self.index}", "scale-worker-all"):
            os._exit(137)  # fault injection: this worker dies as if killed
        if key != self.key:
            import torch

            from .spec import set_weight

            for la, w in weights.items():
                set_weight(self.lm.model, self.lm.spec, int(la), torch.from_numpy(w.copy()))
            self.key = key

    def evaluate(self, key: str, weights: dict, records: list, bos_id: int | None, batch_size: int,
                 gen_tokens: int) -> dict:
        """`evaluate_model` on `records` at `weights`, without perplexity."""
        from .evaluate import Scorer, evaluate_model

        self._at(key, weights)
        scorer = Scorer(self.lm.model, self.lm.tokenizer, bos_id, batch_size=batch_size, spec=self.lm.spec)
        return evaluate_model(scorer, records, gen_tokens=gen_tokens)

    def values(self, key: str, weights: dict, requests: list, hp: dict) -> tuple[Any, dict]:
        """z [n, d] (numpy) and the diagnostics for `requests`, at the parent's `weights`."""
        from .engine import optimise_values, prepare

        self._at(key, weights)
        hparams = HParams.from_dict(hp)
        z, info = optimise_values(self.lm, prepare(self.lm, requests, hparams), hparams)
        return z.numpy(), info


def _errors_to_stderr() -> None:
    """Ray's driver prints the cluster's error messages ("A worker died ...") on stdout, where
    kledger's --json documents go: send them to stderr, with the other messages."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - another Ray layout: left as it is
        return
    show = getattr(ray_worker, "print_to_stdstream", None)
    if show is None or getattr(show, "kledger_stderr", False):
        return

    def to_stderr(data: dict, *args: Any, **kwargs: Any) -> Any:
        return show({**data, "is_err": True}, *args, **kwargs)

    to_stderr.kledger_stderr = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr


class _Pool:
    """The actors of one model, on one Ray cluster; dead ones are replaced at the next commit."""

    def __init__(self, env: Settings, model: str):
        ray = _ray()
        if not ray.is_initialized():
            common = {"logging_level": logging.ERROR, "log_to_driver": False}
            if env.ray_address:
                ray.init(address=env.ray_address, **common)
            else:
                ray.init(num_cpus=env.workers, include_dashboard=False, **common)
        _errors_to_stderr()
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.n = min(env.workers, cpus) if env.workers else cpus  # each actor takes one CPU: all can start
        self.threads = None if env.ray_address else max(1, (os.cpu_count() or 1) // self.n)
        self.env, self.model = env, model
        self.cls = ray.remote(num_cpus=1, max_restarts=0)(_Worker)
        self.actors: dict[int, Any] = {}
        self.next = 0

    def live(self) -> list[Any]:
        while len(self.actors) < self.n:
            self.actors[self.next] = self.cls.remote(self.model, self.env, self.next, self.threads)
            self.next += 1
        return list(self.actors.items())

    def drop(self, index: int) -> None:
        self.actors.pop(index, None)

    def close(self) -> None:
        """Stop the actors (their CPUs go back to the cluster)."""
        ray = _ray()
        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()


def pool(env: Settings, model: str) -> _Pool:
    """The process's pool for this model and settings; one at a time, so that a pool for another
    model (or other settings) does not wait for the CPUs the previous one holds."""
    key = (env.ray_address, env.workers, model, env.fault)
    if key not in _POOLS:
        for old in _POOLS.values():
            old.close()
        _POOLS.clear()
        _POOLS[key] = _Pool(env, model)
    return _POOLS[key]


def _weights(lm: Any, layers: Sequence[int]) -> tuple[str, Any]:
    """(key, object ref) of the edited layers' current weights (numpy, canonical), put once in
    Ray's object store for every actor; the key names them, so an actor that holds them skips the copy."""
    from .spec import get_weight

    h = hashlib.sha256()
    out = {}
    for la in layers:
        w = get_weight(lm.model, lm.spec, la).detach().to("cpu").float().numpy().copy()
        h.update(f"{la}\0".encode())
        h.update(w.tobytes())
        out[int(la)] = w
    return h.hexdigest(), _ray().put(out)


def run_sharded(pool: _Pool, method: str, items: Sequence[Any], args: tuple, weights: tuple[str, Any],
                progress: Progress | None = None, stage: str = "values") -> list[Any]:
    """Call `method(key, weights, shard, *args)` on the pool's actors, one contiguous shard of
    `items` each, and return their results in the shards' order. A shard whose actor dies runs
    again on another actor; kledger's own errors raised in an actor are raised here as they are."""
    ray = _ray()
    key, wref = weights
    actors = pool.live()
    n = len(items)
    k = max(1, min(len(actors), n))
    shards = [list(items[i * n // k:(i + 1) * n // k]) for i in range(k)]

    def submit(actor: tuple[int, Any], shard: int) -> Any:
        return getattr(actor[1], method).remote(key, wref, shards[shard], *args)

    results: dict[int, Any] = {}
    pending = {submit(actors[i], i): (i, actors[i][0]) for i in range(k)}
    report(progress, stage, 0, n)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        shard, index = pending.pop(ready[0])
        try:
            results[shard] = ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:  # an error raised by the code inside the actor
            cause = getattr(exc, "cause", None)
            raise cause if isinstance(cause, KledgerError) else ModelError(
                f"a Ray worker failed: {' '.join(str(exc).split())[:300]}", "see the worker's log") from None
        except ray.exceptions.RayError:  # the actor died: its shard goes to another one
            pool.drop(index)
            busy = {i for _, i in pending.values()}
            others = [a for a in pool.actors.items() if a[0] not in busy] or list(pool.actors.items())
            if not others:
                raise ModelError("every Ray worker died; nothing was written",
                                 "check the workers' memory and logs, then run the command again") from None
            pending[submit(others[0], shard)] = (shard, others[0][0])
            continue
        report(progress, stage, sum(len(shards[s]) for s in results), n)
    return [results[i] for i in range(k)]


class RayValues:
    """A stand-in for `optimise_values` (see `kledger.edit.engine.compute_constraints`'s `values`)
    that runs it across the actors of `pool(env, model)`."""

    def __init__(self, env: Settings, model: str):
        self.pool = pool(env, model)

    def __call__(self, lm: Any, requests: Sequence[Any], hp: HParams,
                 progress: Progress | None = None) -> tuple["torch.Tensor", dict]:
        import numpy as np
        import torch

        hp_dict = hp.to_dict() | {"layers": list(hp.layers)}
        got = run_sharded(self.pool, "values", list(requests), (hp_dict,), _weights(lm, hp.layers), progress)
        z = torch.from_numpy(np.concatenate([r[0] for r in got]))
        info = {name: [v for r in got for v in r[1][name]] for name in got[0][1]}
        return z, info


def evaluate_across(env: Settings, model: str, lm: Any, layers: Sequence[int], facts: Sequence[Any], *,
                    bos_id: int | None, batch_size: int, gen_tokens: int,
                    progress: Progress | None = None) -> dict:
    """`kledger.edit.evaluate.evaluate_model` of the model as `lm` holds it now (its edited layers'
    weights are sent), its records sharded across the workers; without perplexity (the caller
    measures it). Records are scored independently, so the metrics are those of one process."""
    from .evaluate import _mean, record_kind, summarize

    got = run_sharded(pool(env, model), "evaluate", list(facts), (bos_id, batch_size, gen_tokens),
                      _weights(lm, layers), progress, stage="records")
    per = [m for r in got for m in r["per_record"]]
    metrics: dict[str, Any] = summarize([record_kind(f) for f in facts], per)
    metrics["perplexity"] = None
    metrics["fluency"] = _mean(m["fluency"] for m in per) if gen_tokens > 0 and per else None
    seconds = {k: max(r["seconds"][k] for r in got) for k in ("records", "greedy", "fluency")}
    return {"metrics": metrics, "per_record": per, "perplexity": None, "seconds": {**seconds, "perplexity": 0.0}}


def values_for(env: Settings, model: str) -> RayValues | None:
    """The value optimisation a commit uses: across Ray workers when `env` asks for them, else
    None (in this process)."""
    if not (env.workers or env.ray_address):
        return None
    return RayValues(env, model)
