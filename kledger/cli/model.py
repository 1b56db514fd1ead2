"""apply, ask: writing the facts in force into the model, and asking it (one facade call each:
`Ledger.apply`, `Ledger.ask`)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import JSON_OPT, MODE_OPT, app, check_mode, open_ledger, want_json
from .output import emit_json, escape, out, progress_bar, say, short


@app.command()
def apply(rev: str = typer.Argument("HEAD", help="Revision whose facts to write into the model."),
          out_dir: Path | None = typer.Option(None, "--out", "-o", help="Write a Hugging Face model directory."),
          delta: Path | None = typer.Option(None, "--delta", help="Write only the edited tensors (safetensors + manifest)."),
          force: bool = typer.Option(False, "--force", help="Replace a --out directory or --delta file that kledger "
                                     "did not write (a directory as a whole)."),
          lora: Path | None = typer.Option(None, "--lora", help="Write the change as a PEFT LoRA adapter directory."),
          rank: int | None = typer.Option(None, "--rank", help="With --lora: the adapter's rank (default: the exact "
                                          "rank of the change; a smaller one truncates it)."),
          mode: str = MODE_OPT,
          json_: bool = JSON_OPT) -> None:
    """Solve the constraints in force at REV (float64) and write the edited model."""
    want_json(json_)
    check_mode(mode)
    with open_ledger() as ledger, progress_bar() as progress:
        # Solved before? Then answered from the cache without loading the model (nor torch);
        # else solved, and --out written, without loading it when the ledger remembers its files.
        res = ledger.apply(rev, mode, out_dir=out_dir, delta=delta, progress=progress, force=force, lora=lora,
                           rank=rank)
    if json_:
        emit_json("apply", res)
    else:
        src = "cache" if res["cached"] else "solve"
        say(f"Applied {short(res['revision'])}: {res['facts']} fact(s), {res['constraints']} constraint(s) on "
            f"layers {res['layers']} ({res['mode']}, from {src})")
        for k in ("delta", "manifest", "model", "lora"):
            if k in res:
                say(f"  wrote {k}: {escape(res[k])}")
        if "lora" in res:
            kept = min(res["lora_energy"].values(), default=1.0)
            say(f"  LoRA rank {res['lora_rank']}: " + ("exact" if kept >= 1 - 1e-12 else
                                                       f"truncated, at least {kept:.2%} of each layer's change kept"))


@app.command()
def ask(prompt: str = typer.Argument(..., help="Text for the model to complete."),
        rev: str = typer.Option("HEAD", "--rev", help="Revision to ask (its facts applied)."),
        top: int = typer.Option(5, "--top", min=1, max=50, help="How many next tokens to show."),
        max_new_tokens: int = typer.Option(8, "--max-new-tokens", min=1, max=200, help="Length of the answer."),
        mode: str = MODE_OPT,
        json_: bool = JSON_OPT) -> None:
    """The model's answer and top next tokens at REV, beside the base model's."""
    want_json(json_)
    check_mode(mode)
    with open_ledger() as ledger, progress_bar() as progress:
        res = ledger.ask(prompt, rev, mode, top=top, max_new_tokens=max_new_tokens, progress=progress)
    if json_:
        emit_json("ask", res)
        return
    cid, base, edited = res["revision"], res["base"], res["edited"]
    out.print(f"[bold]{escape(prompt)}[/]")
    out.print(f"  edited model (its facts at {escape(rev)}, {short(cid)}) answers: [bold]{escape(edited['answer'])}[/]")
    out.print(f"  base model (no edits) answers: [bold]{escape(base['answer'])}[/]")
    out.print(f"  {'next token':>14}  {'edited':>24}  {'base':>24}")
    for e, b in zip(edited["top"], base["top"]):
        out.print(f"  {'':>14}  {escape(repr(e['token'])):>16} {e['prob']:6.3f}  {escape(repr(b['token'])):>16} {b['prob']:6.3f}")

