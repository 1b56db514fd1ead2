"""Per-architecture access to a causal LM: where its decoder layers and MLP down-projections are,
and how the down-projection weight is oriented. Orientation is declared here, never guessed from
shapes: nn.Linear stores [d_out, d_in] ("out_in"); GPT-2's Conv1D stores [d_in, d_out] ("in_out").

Every other module of `kledger.edit` reaches the model through this one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import ModelError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

Layout = Literal["out_in", "in_out"]


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one architecture. Paths are dotted attribute paths from the
    *ForCausalLM model; `down_proj` is relative to one decoder layer."""

    family: str
    layers: str  # ModuleList of decoder layers, e.g. "model.layers"
    down_proj: str  # the MLP down-projection inside a layer, e.g. "mlp.down_proj"
    layout: Layout  # how down_proj.weight is stored
    embed: str  # token embedding
    final_norm: str  # norm before the lm head
    lm_head: str
    # The decoder layer's output is the residual stream; the down-projection's output is added to
    # it directly, except where a norm sits between them (Gemma 3's post-feed-forward norm).
    post_mlp_norm: bool = False

    def down_proj_name(self, layer: int) -> str:
        """State-dict name of the down-projection weight of `layer`."""
        return f"{self.layers}.{layer}.{self.down_proj}.weight"


_LLAMA = ArchSpec("llama", "model.layers", "mlp.down_proj", "out_in",
                  "model.embed_tokens", "model.norm", "lm_head")

SPECS: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma3_text": ArchSpec("gemma3", "model.layers", "mlp.down_proj", "out_in",
                            "model.embed_tokens", "model.norm", "lm_head", post_mlp_norm=True),
    "gpt2": ArchSpec("gpt2", "transformer.h", "mlp.c_proj", "in_out",
                     "transformer.wte", "transformer.ln_f", "lm_head"),
    "gptj": ArchSpec("gptj", "transformer.h", "mlp.fc_out", "out_in",
                     "transformer.wte", "transformer.ln_f", "lm_head"),
    "gpt_neox": ArchSpec("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h", "out_in",
                         "gpt_neox.embed_in", "gpt_neox.final_layer_norm", "lm_head"),
}


def supported_types() -> list[str]:
    return sorted(SPECS)


def spec_for(model_or_config) -> ArchSpec:
    """The spec for a model (or its config), by `config.model_type`; ModelError if unsupported."""
    config = getattr(model_or_config, "config", model_or_config)
    mtype = getattr(config, "model_type", None)
    spec = SPECS.get(mtype) if isinstance(mtype, str) else None
    if spec is None:
        raise ModelError(f"unsupported model type {mtype!r}; supported: {', '.join(supported_types())}",
                         "use a causal LM of a supported architecture")
    return spec


def get_module(root: "nn.Module", path: str) -> "nn.Module":
    mod = root
    for part in path.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part, None)
        if mod is None:
            raise ModelError(f"model has no module {path!r}", "the architecture spec does not match the model")
    return mod


def n_layers(model: "nn.Module", spec: ArchSpec) -> int:
    return len(get_module(model, spec.layers))


def layer_module(model: "nn.Module", spec: ArchSpec, layer: int) -> "nn.Module":
    layers = get_module(model, spec.layers)
    if not 0 <= layer < len(layers):
        raise ModelError(f"layer {layer} out of range: the model has {len(layers)} layers",
                         f"choose layers between 0 and {len(layers) - 1}")
    return layers[layer]


def down_proj(model: "nn.Module", spec: ArchSpec, layer: int) -> "nn.Module":
    return get_module(layer_module(model, spec, layer), spec.down_proj)


def to_canonical(weight: "torch.Tensor", spec: ArchSpec) -> "torch.Tensor":
    """Model orientation → canonical [d_out, d_in] (a view)."""
    return weight.T if spec.layout == "in_out" else weight


def from_canonical(weight: "torch.Tensor", spec: ArchSpec) -> "torch.Tensor":
    """Canonical [d_out, d_in] → model orientation (a view)."""
    return weight.T if spec.layout == "in_out" else weight


def get_weight(model: "nn.Module", spec: ArchSpec, layer: int) -> "torch.Tensor":
    """A detached copy of layer's down-projection weight, canonical [d_out, d_in], model dtype, on
    the CPU (wherever the model runs)."""
    w = down_proj(model, spec, layer).weight.detach()
    return to_canonical(w, spec).to("cpu", copy=True)


def set_weight(model: "nn.Module", spec: ArchSpec, layer: int, weight: "torch.Tensor") -> None:
    """Write a canonical [d_out, d_in] weight into layer's down-projection (cast to model dtype)."""
    import torch

    param = down_proj(model, spec, layer).weight
    new = from_canonical(weight, spec)
    if tuple(new.shape) != tuple(param.shape):
        raise ModelError(f"weight for layer {layer} has shape {tuple(weight.shape)}, expected canonical "
                         f"{tuple(to_canonical(param, spec).shape)}", "pass [d_out, d_in]")
    with torch.no_grad():
        param.copy_(new.to(device=param.device, dtype=param.dtype))
