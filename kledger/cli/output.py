"""Output: data to stdout (rich, plain when piped; JSON with --json), messages to stderr.

Every JSON document is an object with `"version": JSON_VERSION` and `"command"`; the shapes are
documented in docs/json.md and only change with a new version number."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape

from .reads import JSON_VERSION, _emitted, emit_json, short  # noqa: F401  (the JSON and id helpers live there)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


PLAIN_EVERY_S = 10.0  # seconds between plain progress lines of one stage


@contextmanager
def progress_bar() -> Iterator:
    """A progress callback `(stage, done, total)`: rich bars on stderr, one per stage, when stderr
    is a terminal; else plain lines (CI logs, redirected output), one when a stage starts, one at
    most every PLAIN_EVERY_S seconds, and one when it ends, so a long step is never silent."""
    if not err.is_terminal:
        yield _plain_progress()
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=False) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            size = max(total, 1)
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=size)
            if done == 0:  # the stage starts (again): no note from its last run
                bar.update(tasks[stage], description=stage)
            bar.update(tasks[stage], completed=size if done >= total else done, total=size)

        def note(stage: str, text: str) -> None:  # a bar that ends early says why
            if stage in tasks:
                bar.update(tasks[stage], description=f"{stage} ({escape(text)})")

        update.note = note  # type: ignore[attr-defined]
        yield update


def _plain_progress():
    import sys
    import time

    started: dict[str, float] = {}
    last: dict[str, float] = {}

    def update(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        end = done >= total
        if stage not in started or (last.get(stage) == -1.0 and (done == 0 or not end)):
            started[stage], last[stage] = now, 0.0  # a stage (re)starts: its clock too
        elif end and last.get(stage) == -1.0:  # its end was said already
            return
        if last[stage] == 0.0 or end or now - last[stage] >= PLAIN_EVERY_S:
            print(f"kledger: {stage} {done}/{total} ({now - started[stage]:.0f} s)", file=sys.stderr, flush=True)
            last[stage] = -1.0 if end else now

    def note(stage: str, text: str) -> None:
        print(f"kledger: {stage}: {text}", file=sys.stderr, flush=True)

    update.note = note  # type: ignore[attr-defined]
    return update


def say(message: str) -> None:
    """A message for the person at the terminal (stderr)."""
    err.print(message)


def note_resolved(meta: dict) -> None:
    """Say (stderr) which conflicts a commit resolved with remembered decisions (rerere)."""
    for e in meta.get("resolved", []):
        if e.get("remembered"):
            say(f"Resolved conflict {e['conflict'][:10]} ({escape(repr(e['subject']))} · {escape(e['relation'])}) "
                f"with the remembered decision: keep {escape(', '.join(e['keep']))} "
                f"(decided by {escape(e.get('decided_by') or '?')} on {(e.get('decided_at') or '?')[:10]})")


def note_collisions(collisions: list[dict]) -> None:
    """Say (stderr) which key collisions there are: two different subjects the model reads with
    near-identical keys (not a contradiction; editing one may move the other's answer)."""
    for c in collisions:
        (a, b), (oa, ob) = c["subjects"], c["objects"]
        line = (f"note: key collision (cosine {c['cosine']:.3f}, not a conflict): {escape(repr(a))} → {escape(oa)} and "
                f"{escape(repr(b))} → {escape(ob)} share one key at the first edited layer")
        e = c.get("effect")
        if e:
            line += (f"; on the other's prompt its own object went {e['p_own_before']:.3f} → {e['p_own_after']:.3f}, "
                     f"the new object {e['p_new_before']:.3f} → {e['p_new_after']:.3f}")
        say(line)


def note_weak(weak: list[dict], threshold: float | None) -> None:
    """Say (stderr) which new facts did not take: their object's probability on their own prompt,
    with the commit solved in, is below `threshold` (kledger.model_side.WEAK_BELOW)."""
    if not weak:
        return
    say(f"warning: {len(weak)} new fact(s) did not take (P(object | own prompt) < {threshold:g} after this commit; "
        "they are recorded: check them with `kledger ask`, try another wording of the prompt)")
    list_weak(weak, "kledger show --json")


def weak_line(w: dict) -> str:
    """One fact that does not hold (`model_side.weak_entry`): prompt → object: probability."""
    return f"{w['prompt']!r} → {w['target']}: {w['p_new']:.4f}"


def list_weak(weak: list[dict], rest: str, shown: int = 10) -> None:
    """Say (stderr) the first `shown` facts that do not hold, prompt → object: probability, and
    where to find the rest."""
    for w in weak[:shown]:
        say("  " + escape(weak_line(w)))
    if len(weak) > shown:
        say(f"  … and {len(weak) - shown} more (`{rest}`)")


__all__ = ["emit_json", "err", "escape", "list_weak", "note_collisions", "note_resolved", "note_weak", "out", "say", "short",
           "weak_line"]
