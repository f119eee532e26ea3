"""MoE routing health by modality, on the host at log steps.

The train step's metrics carry, per MoE layer, each modality's expert load
`expert_fraction_{text,image}` `[n_moe_layers, E]` (share of that modality's
routed assignments per expert), `dropped_fraction_*` and `router_entropy_*`
`[n_moe_layers]`, and the token counts `moe_tokens_*` (see
`mmjax.train.step.moe_losses`). Here they become compact TensorBoard scalars
(`routing_scalars`) and a starvation check (`StarvedExperts`) that warns when
an expert's load stays under a share of its fair load 1/E for several
consecutive log windows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

MODALITIES = ("text", "image")


def load_summary(fractions) -> tuple[float, float]:
    """One layer's expert load `[E]` (sums to 1) -> (max/mean: the busiest
    expert over the fair load 1/E, min share: the idlest expert's load as a
    share of 1/E). Balanced: (1, 1)."""
    f = np.asarray(fractions, np.float64)
    total = f.sum() or 1.0
    return float(f.max() * f.size / total), float(f.min() * f.size / total)


def modality_present(record: Mapping, modality: str) -> bool:
    """Whether the step routed tokens of `modality` (its statistics are defined)."""
    return float(record.get(f"moe_tokens_{modality}", 0.0)) > 0


def routing_scalars(record: Mapping) -> dict[str, float]:
    """Per MoE layer j and modality m (all, text, image; a modality without
    tokens is left out): `moe_layer{j}/{m}/router_entropy`,
    `.../dropped_fraction`, `.../load_max_over_mean`, `.../load_min_share`
    (see `load_summary`). `all` recombines the modalities by their counts.
    Empty for a record without modality-split statistics."""
    if "expert_fraction_text" not in record:
        return {}
    counts = {m: float(record.get(f"moe_tokens_{m}", 0.0)) for m in MODALITIES}
    present = [m for m in MODALITIES if counts[m] > 0]
    out = {}
    for m in present + (["all"] if present else []):
        fractions = np.asarray(record["expert_fraction" if m == "all" else f"expert_fraction_{m}"], np.float64)
        for j, layer in enumerate(fractions):
            prefix = f"moe_layer{j}/{m}/"
            out[prefix + "load_max_over_mean"], out[prefix + "load_min_share"] = load_summary(layer)
            for stat in ("router_entropy", "dropped_fraction"):
                if m == "all":
                    value = sum(counts[k] * float(np.asarray(record[f"{stat}_{k}"])[j]) for k in present)
                    value /= sum(counts[k] for k in present)
                else:
                    value = float(np.asarray(record[f"{stat}_{m}"])[j])
                out[prefix + stat] = value
    return out


def moe_layer_names(decoder_cfg) -> list[str]:
    """`MoE layer j (decoder layer i)` for each MoE layer of a decoder config (0-based)."""
    from mmjax.models.decoder import is_moe_layer

    indices = [i for i in range(decoder_cfg.layers) if is_moe_layer(decoder_cfg, i)]
    return [f"MoE layer {j} (decoder layer {i})" for j, i in enumerate(indices)]


class StarvedExperts:
    """Counts, per (MoE layer, expert, modality), the consecutive log windows
    in which the expert's load was below `share` of its fair load 1/E.

    `update(record)` takes one log step's record (host values) and returns
    (metrics, messages): `moe_starved_experts` (and `_text`, `_image`) the
    number of experts starved for at least `windows` windows,
    `moe_starved` their [moe_layer, expert, modality], and a warning line
    when an expert reaches `windows` (one per onset) or recovers after one.
    A window without tokens of a modality neither counts nor resets that
    modality's counters. `windows=0` switches the check off."""

    def __init__(self, share: float = 0.1, windows: int = 3, layer_names: list[str] | None = None):
        self.share, self.windows, self.layer_names = float(share), int(windows), layer_names
        self.runs: dict[str, np.ndarray] = {}  # modality -> [n_moe_layers, E] consecutive starved windows

    def _layer(self, j: int) -> str:
        return self.layer_names[j] if self.layer_names and j < len(self.layer_names) else f"MoE layer {j}"

    def update(self, record: Mapping) -> tuple[dict, list[str]]:
        if not self.windows or "expert_fraction_text" not in record:
            return {}, []
        metrics, messages, starved = {}, [], []
        for m in MODALITIES:
            load = np.asarray(record[f"expert_fraction_{m}"], np.float64)  # [n_moe_layers, E]
            runs = self.runs.setdefault(m, np.zeros(load.shape, np.int64))
            if modality_present(record, m):
                fair = 1.0 / load.shape[-1]
                low = load < self.share * fair
                for j, e in zip(*np.nonzero(~low & (runs >= self.windows))):
                    messages.append(f"MoE routing: expert {e} of {self._layer(j)} recovered on {m} tokens "
                                    f"(load {load[j, e]:.2%}, fair 1/{load.shape[-1]})")
                runs[:] = np.where(low, runs + 1, 0)
                for j, e in zip(*np.nonzero(runs == self.windows)):
                    messages.append(
                        f"warning: MoE routing: expert {e} of {self._layer(j)} is starved of {m} tokens: load "
                        f"{load[j, e]:.2%} of {m} assignments, under {self.share:g} x its fair load "
                        f"1/{load.shape[-1]} for {self.windows} consecutive log windows")
            hits = [[int(j), int(e), m] for j, e in zip(*np.nonzero(runs >= self.windows))]
            metrics[f"moe_starved_experts_{m}"] = len(hits)
            starved += hits
        metrics["moe_starved_experts"] = len(starved)
        metrics["moe_starved"] = starved
        return metrics, messages
