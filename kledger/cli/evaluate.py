"""eval: the edit metrics and the drift of general ability at a revision, beside the base model.
Options are checked by `Ledger.eval_options` before the ledger is opened; then one facade call,
`Ledger.evaluate`."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import JSON_OPT, MODE_OPT, RAY_OPT, WORKERS_OPT, app, open_ledger, scale_out, want_json
from .output import emit_json, escape, list_weak, out, progress_bar, say, short

_RATE_DIGITS = 3


def _fmt(value, digits: int = _RATE_DIGITS) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _change(a, b, digits: int = _RATE_DIGITS) -> str:
    return "" if a is None or b is None else f"{b - a:+.{digits}f}"


@app.command("eval")
def eval_(rev: str = typer.Argument("HEAD", help="Revision whose facts to evaluate (its facts applied)."),
          data: Path | None = typer.Option(
              None, "--data", "-d", help="Evaluate these records instead of the facts in force (any `add --file` format)."),
          fmt: str | None = typer.Option(None, "--format", help="Format of --data (default: detected)."),
          limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Evaluate only the first N records."),
          mode: str = MODE_OPT,
          text: Path | None = typer.Option(
              None, "--text", help="Held-out text for perplexity (default: the ledger's corpus, see docs)."),
          ppl_tokens: int = typer.Option(2048, "--ppl-tokens", min=0, help="Tokens of text for perplexity (0: skip it)."),
          gen_tokens: int = typer.Option(32, "--gen-tokens", min=0,
                                         help="Tokens generated per record for fluency (0: skip it)."),
          no_fluency: bool = typer.Option(False, "--no-fluency", help="Skip fluency (the same as --gen-tokens 0)."),
          batch_size: int = typer.Option(32, "--batch-size", min=1, max=4096, help="Sequences per forward pass."),
          plot: Path | None = typer.Option(
              None, "--plot", help="Also evaluate every commit of REV's first-parent history and plot the metrics (PNG)."),
          workers: int | None = WORKERS_OPT, ray: str | None = RAY_OPT,
          json_: bool = JSON_OPT) -> None:
    """Efficacy, generalization, specificity (CounterFact), token accuracy (ZsRE), perplexity and
    fluency at REV, beside the base model."""
    want_json(json_)
    scale_out(workers, ray)
    from ..ledger import Ledger

    opts = Ledger.eval_options(mode=mode, data=data, fmt=fmt, limit=limit, text=text, ppl_tokens=ppl_tokens,
                               gen_tokens=0 if no_fluency else gen_tokens, batch_size=batch_size,
                               plot=plot, plot_title=f"kledger eval {rev} ({mode})")
    with open_ledger() as ledger, progress_bar() as progress:
        res = ledger.evaluate(rev, opts, progress=progress)
    if json_:
        emit_json("eval", res)
        return
    _print(res, rev)


def _print(res: dict, rev: str) -> None:
    from rich.table import Table

    from ..ledger import Ledger

    KINDS, KIND_TITLES, GROUP_METRICS = Ledger.eval_metrics()

    d, base, edited = res["data"], res["base"], res["edited"]
    where = f"from {d['path']}" if d["source"] == "file" else f"in force at {rev}"
    table = Table(title=f"{d['records']} record(s) {where}; {res['mode']} solve", title_justify="left",
                  box=None, pad_edge=False)
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column(f"at {short(res['revision'])}", justify="right")
    table.add_column("change", justify="right")
    for kind in KINDS:
        if kind not in base:
            continue
        g = base[kind]
        table.add_row(f"[bold]{KIND_TITLES[kind]}[/] ({g['n']})", "", "", "")
        for name in GROUP_METRICS[kind]:
            a, b = base[kind][name], edited[kind][name]
            table.add_row(f"  {name}", _fmt(a), _fmt(b), _change(a, b))
    if res["text"] is not None or res["generation"] is not None:
        table.add_row("[bold]General[/]", "", "", "")
    if res["text"] is not None:
        a, b = base["perplexity"], edited["perplexity"]
        table.add_row("  perplexity", _fmt(a, 3), _fmt(b, 3), _change(a, b, 3))
    if res["generation"] is not None:
        a, b = base["fluency"], edited["fluency"]
        table.add_row("  fluency", _fmt(a), _fmt(b), _change(a, b))
    out.print(table)
    t = res["text"]
    if t is not None:
        src = {"file": escape(str(t["path"])), "ledger-corpus": f"the ledger's corpus {escape(str(t['path']))}",
               "model-sampled": "the model-sampled C0 corpus"}[t["source"]]
        held = {True: "held out from C0", False: "C0 was measured on it",
                None: "overlap with C0 unknown"}[t["held_out"]]
        say(f"perplexity: {t['tokens']} tokens of {src} from token {t['offset']} ({held}), "
            f"windows of {t['window']}")
    if res["generation"] is not None:
        say(f"fluency: weighted 2-/3-gram entropy (bits) of {res['generation']['tokens']} greedy tokens per record")
    weak = res.get("weak")
    if weak is not None:
        say(f"{len(weak)} of {d['records']} fact(s) in force do not hold (P(object | own prompt) < {res['weak_below']:g})"
            + (":" if weak else ""))
        list_weak(weak, "kledger eval --json")
    if res["seconds_per_record"] is not None:
        say(f"{res['seconds_per_record']:.3f} s per record (base and edited), {res['seconds']['total']:.1f} s in all")
    if "plot" in res:
        say(f"wrote {escape(res['plot'])} ({len(res['history'])} points)")
