"""An experiment for the sweep (`bench/sweep.py edit --two-keys`): two constraints per fact and
layer instead of one. kledger stores one (k, v) per fact and layer, k the mean of the subject's
key over the bare prompt and the prefixed contexts. For prompts that start with the subject, the
bare prompt's key differs from the prefixed ones that dominate that mean, and such facts land
weaker on the bare prompt (docs/editing.md, "Looking further"). Here each fact gets one
constraint for the bare prompt's key and one for the prefixed contexts' mean key, each with the
value that moves its own residual by the optimised δ, so each reading is edited where it is read.
Storage per fact doubles. Not part of kledger: the sweep keeps its constraints in memory.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from kledger.edit import engine
from kledger.edit.hooks import capture_down_inputs, capture_residual, run_until
from kledger.edit.solve import solve_history
from kledger.edit.spec import get_weight, set_weight


def _measure_all(lm: Any, toks: Any, layer: int, z_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys at `layer` [N, C, d_in] and residuals at `z_layer` [N, C, d] of every context."""
    N, C = len(toks), len(toks[0].ctx)
    batch, rows, cols = engine._at_subjects(lm, toks)
    with capture_down_inputs(lm.model, lm.spec, [layer]) as keys, \
            capture_residual(lm.model, lm.spec, z_layer, stop=True) as res:
        run_until(lm.model, batch.input_ids, batch.attention_mask)
    return keys[layer][rows, cols].float().view(N, C, -1).cpu(), res[z_layer][rows, cols].float().view(N, C, -1).cpu()


@torch.no_grad()
def spread_two(lm: Any, toks: Any, z: torch.Tensor, hp: Any, c0: Mapping[int, torch.Tensor],
               W0: Mapping[int, torch.Tensor], prior: Mapping[int, Any] | None = None,
               progress: Any = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`engine.spread` with two rows per fact: [bare rows; prefixed-mean rows] (2N rows)."""
    prior = prior or {}
    L = hp.layers[-1]
    new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    target = None  # [N, 2, d]: the residual each reading should reach at L
    for i, layer in enumerate(hp.layers):
        K_all, Z_all = _measure_all(lm, toks, layer, L)  # [N, C, *]
        two_k = torch.stack([K_all[:, 0], K_all[:, 1:].mean(1)], 1)  # [N, 2, d_in]
        two_z = torch.stack([Z_all[:, 0], Z_all[:, 1:].mean(1)], 1)  # [N, 2, d]
        if target is None:  # nothing of this commit is written yet: the readings' own residuals + δ
            target = two_z + (z - Z_all[:, 0])[:, None]
        resid = (target - two_z) / (len(hp.layers) - i)
        K = two_k.transpose(0, 1).reshape(-1, two_k.shape[-1])  # [2N, d_in]: bare rows, then prefixed
        W_cur = get_weight(lm.model, lm.spec, layer).double()
        V = (K.double() @ W_cur.T + resid.transpose(0, 1).reshape(-1, resid.shape[-1]).double()).float()
        new[layer] = (K, V)
        W = solve_history(W0[layer], engine._batches(prior.get(layer)) + [new[layer]], c0[layer], hp.lam, hp.mode)
        set_weight(lm.model, lm.spec, layer, W)
    return new


def install() -> None:
    engine.spread = spread_two
