"""Dense -> MoE upcycling: every expert starts as a copy of the dense MLP.

Works on pure-dict params of a decoder: a dense layer's
`mlp = {gate, up, down}` (kernels `[embed, mlp]`, `[embed, mlp]`,
`[mlp, embed]`) becomes `wi_gate`/`wi_up` `[E, embed, mlp]` and `wo`
`[E, mlp, embed]`; the router keeps its fresh initialisation, so the MoE
layer initially computes exactly the dense MLP (routing weights sum to 1).
"""

from __future__ import annotations

import numpy as np


def upcycle_mlp(dense_mlp: dict, router, num_experts: int) -> dict:
    """One layer's dense MLP params -> MoE params (router passed through)."""
    tile = lambda k: np.broadcast_to(np.asarray(k), (num_experts,) + np.shape(k)).copy()  # noqa: E731
    return {"router": router, "wi_gate": tile(dense_mlp["gate"]["kernel"]),
            "wi_up": tile(dense_mlp["up"]["kernel"]), "wo": tile(dense_mlp["down"]["kernel"])}


def upcycle_decoder(dense: dict, target: dict) -> dict:
    """Dense decoder params -> params shaped like `target` (an MoE decoder's
    pure dict): MoE layers get upcycled MLPs, everything else is copied."""
    out = dict(dense)
    source_layers = dense["layers"]["layers"]
    layers = {}
    for index, layer in target["layers"]["layers"].items():
        # Checkpoints restored without a target key list entries by strings.
        source = source_layers[index] if index in source_layers else source_layers[str(index)]
        mlp = layer["mlp"]
        if "wi_gate" in mlp and "gate" in source["mlp"]:
            dense_mlp = source["mlp"]
            if np.shape(dense_mlp["gate"]["kernel"]) != np.shape(mlp["wi_gate"])[1:]:
                raise ValueError(f"layer {index}: dense MLP {np.shape(dense_mlp['gate']['kernel'])} cannot fill "
                                 f"experts of shape {np.shape(mlp['wi_gate'])[1:]}; set moe.expert_mlp to the dense mlp size.")
            source = dict(source, mlp=upcycle_mlp(dense_mlp, mlp["router"], np.shape(mlp["wi_gate"])[0]))
        layers[index] = source
    out["layers"] = {"layers": layers}
    return out
