"""Training FLOPs per step from the config alone (peak FLOP/s and MFU:
`mmjax.train.peak_flops`, re-exported here).

`train_flops(config)` counts the matrix multiplications (and the connector's
convolutions) of one training step of the model `config.model.name` names,
by the objective its registry entry trains with (`step_ops`): "next_token"
counts `MM1Model` (or a text-only decoder) on `data.global_batch` sequences
of `data.seq_len` tokens with `data.max_images` images each; "contrastive"
a dual encoder on `data.global_batch` image-text pairs, "classification" an
image classifier on as many images (`mmjax.train.flops_dual`). A multiply-add is 2 FLOPs. Elementwise work
(norms, softmax, activations, the loss, the optimizer update) is not
counted: it is a few percent of the total for models whose matmuls are not
tiny.

Two totals:

- `model_flops`: the useful work, what MFU is computed from. Forward FLOPs
  x 3 (the backward pass is taken as twice the forward). MoE layers count
  only the `top_k` active experts per token (plus router and shared expert);
  causal decoder attention counts only the unmasked (query, key) pairs,
  s * (s + 1) / 2 per sequence and head for a length-s sequence (the exact
  lower triangle with its diagonal; the common s^2 / 2 convention is s / 2
  pairs fewer). The sequence is taken as one causal document: packing
  several documents into a row, or bidirectional attention among one image's
  tokens, changes the useful pairs but not this count. No rematerialisation.
- `hardware_flops`: an estimate of what the compiled program executes, the
  number XLA's `cost_analysis()["flops"]` reports (less its elementwise
  work). Differences from `model_flops`:
    * attention computes the full masked s x s score matrix
      (`attention.dot_product_attention`), so all s^2 pairs count;
    * capacity MoE (`dispatch="capacity"`) runs every expert on its whole
      buffer of C slots per token group (C = ceil(top_k * group * factor / E),
      one group per batch shard of the mesh, split into groups of at most
      `moe.group_size` tokens when set), and the one-hot dispatch and
      combine einsums are matmuls of their own (2 * T * E * C * embed each);
    * dropless MoE uses `jax.lax.ragged_dot` or the megablox kernel,
      executed as a grouped matmul (the routed rows only) on TPU/GPU but, for
      `ragged_dot` on the CPU backend, as a dense matmul against every
      expert (E times the active work); megablox multiplies whole row tiles
      and visits a tile where two experts' rows meet once per expert, so it
      is charged `moe_dropless.megablox_rows_computed` rows (balanced
      routing) instead of the routed ones;
    * the backward pass is counted per operation: an operation with one
      differentiable operand (the patch embedding, whose input is pixels; the
      constant average-pool matrices; the one-hot dispatch mask) needs one
      backward matmul, not two;
    * rematerialisation (`vit.remat` / `decoder.remat`) recomputes, in the
      backward pass, the layer-stack operations whose outputs the backward
      needs and the remat policy does not save (`full`: all of them; `dots`:
      none of the matmuls; `dots_no_batch`: the batched ones, i.e. attention
      scores/values and the MoE dispatch/expert einsums). A layer's last
      projection (MLP down / MoE combine) is never recomputed: only its
      input is needed. The recompute is reported separately (`remat_flops`).
  Convolutions count only window positions inside the input (SAME padding
  zeros are skipped), as XLA's cost analysis does, in both totals.

Per-device values divide by the device count (the work is split evenly by
data/FSDP/expert parallelism). For an SPMD-partitioned step, XLA's
`compiled.cost_analysis()["flops"]` is per device (measured: an 8-device
program reports about 1/8 of the same step on one device, a few percent more
for work the partitioner replicates), so compare it with
`hardware_flops_per_device`. With `scan=True` XLA's cost analysis may count
a scanned layer stack's body once rather than once per layer; the analytic
count is always per layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
from mmjax.errors import ConfigError
from mmjax.train.peak_flops import (  # noqa: F401  (re-exported: the callers' import path)
    PEAK_FLOPS_PER_DEVICE,
    calibrate_peak_flops,
    mfu,
    peak_flops_per_device,
    table_peak,
)

# ---------------------------------------------------------------------------
# Analytic FLOPs
# ---------------------------------------------------------------------------

# Operation kinds and which remat policy keeps (does not recompute) them.
_DOT, _BATCHED_DOT, _RAGGED, _CONV = "dot", "batched_dot", "ragged_dot", "conv"
# Tags of the activations the named policies keep (`models/stack.py`).
_QKV, _CONTEXT = "qkv", "context"
_SAVED_BY_POLICY = {
    "": None,  # no remat: nothing is recomputed
    "full": frozenset(),
    "dots": frozenset({_DOT, _BATCHED_DOT}),
    "dots_no_batch": frozenset({_DOT}),
    "qkv_proj": frozenset({_QKV}),
    "attention": frozenset({_QKV, _CONTEXT}),
}
# Host offload changes where the kept activations live, not what is recomputed.
_SAVED_BY_POLICY.update({f"{name}_offload": _SAVED_BY_POLICY[name] for name in
                         ("qkv_proj", "attention", "dots_no_batch")})


@dataclasses.dataclass(frozen=True)
class _Op:
    """One matmul-like operation (summed over all its instances in a step)."""

    component: str      # breakdown key, e.g. "decoder/attention_scores"
    model: float        # useful forward FLOPs
    hardware: float     # forward FLOPs as executed
    grads: int = 2      # backward ops of the forward's size (1: one differentiable operand)
    kind: str = _DOT
    weight_only: bool = False  # its only differentiable operand is a weight (the patch embedding)
    weights: bool = True       # one operand is a weight (False: activations only, e.g. attention scores)
    entry: bool = False        # reads the previous component's output (the connector's first op)
    stack: str = ""     # "vit" / "decoder": inside a rematerialisable layer stack
    residual: bool = True  # the backward needs its output (False: never recomputed)
    tag: str = ""       # what a named remat policy may keep: "qkv" projections, attention "context"
    kernel: bool = False  # attention as a fused kernel: its lse is kept with the context, and the
    #                       backward recomputes the scores inside (half the forward again)


@dataclasses.dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs of one training step (global batch, all devices together).

    Dicts map a component ("vit/mlp", "decoder/moe_experts", ...) to FLOPs:
    `forward` the useful forward work, `hardware_forward`/`hardware_backward`
    the executed forward/backward work, `remat` the backward recompute."""

    forward: dict[str, float]
    hardware_forward: dict[str, float]
    hardware_backward: dict[str, float]
    remat: dict[str, float]
    num_devices: int
    tokens_per_step: int
    images_per_step: int
    # passes per component: 3 (forward + backward), 2 (frozen, gradients pass through), 1 (frozen)
    passes: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def model_forward_flops(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def model_flops(self) -> float:
        """Useful FLOPs, what MFU is computed from: 3 x forward for trainable
        components, 2 x for frozen ones that gradients pass through, 1 x for
        frozen ones nothing before trains (no backward pass)."""
        return float(sum(self.passes.get(name.split("/")[0], 3.0) * value for name, value in self.forward.items()))

    def model_flops_at(self, images_per_step: float) -> float:
        """`model_flops` with `images_per_step` images encoded instead of every
        image slot (`images_per_step` here): the ViT and connector work scales
        with the images actually present."""
        image = sum(self.passes.get(name.split("/")[0], 3.0) * value for name, value in self.forward.items()
                    if name.split("/")[0] in ("vit", "connector"))
        share = images_per_step / self.images_per_step if self.images_per_step else 0.0
        return self.model_flops - image * (1.0 - share)

    @property
    def remat_flops(self) -> float:
        return float(sum(self.remat.values()))

    @property
    def hardware_flops(self) -> float:
        """Executed forward + backward + remat recompute."""
        return float(sum(self.hardware_forward.values()) + sum(self.hardware_backward.values())
                     + self.remat_flops)

    @property
    def model_flops_per_device(self) -> float:
        return self.model_flops / self.num_devices

    @property
    def hardware_flops_per_device(self) -> float:
        return self.hardware_flops / self.num_devices

    def table(self) -> str:
        """A readable per-component table (GFLOPs per step)."""
        lines = [f"{'GFLOPs per step':32s} {'model fwd':>12s} {'hw fwd':>12s} {'hw bwd':>12s} {'remat':>12s}"]
        for name in self.hardware_forward:
            lines.append(f"{name:32s} {self.forward.get(name, 0.0) / 1e9:12.5g} "
                         f"{self.hardware_forward[name] / 1e9:12.5g} "
                         f"{self.hardware_backward.get(name, 0.0) / 1e9:12.5g} "
                         f"{self.remat.get(name, 0.0) / 1e9:12.5g}")
        lines.append(f"model_flops={self.model_flops:.6g} hardware_flops={self.hardware_flops:.6g} "
                     f"(remat {self.remat_flops:.6g}) on {self.num_devices} device(s): "
                     f"{self.model_flops_per_device:.6g} / {self.hardware_flops_per_device:.6g} per device")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"forward": dict(self.forward), "hardware_forward": dict(self.hardware_forward),
                "hardware_backward": dict(self.hardware_backward), "remat": dict(self.remat),
                "model_flops": self.model_flops, "hardware_flops": self.hardware_flops,
                "remat_flops": self.remat_flops, "num_devices": self.num_devices,
                "model_flops_per_device": self.model_flops_per_device,
                "hardware_flops_per_device": self.hardware_flops_per_device}


def _conv_positions(size: int, kernel: int) -> int:
    """(output, tap) pairs along one dimension of a stride-1 SAME convolution
    whose tap falls inside the input (padding excluded)."""
    half = kernel // 2
    return sum(max(0, size - abs(offset)) for offset in range(-half, kernel - half))


def _vit_ops(vit, n_img: int, blocks: int | None = None, map_head: bool = False,
             batch_shards: int = 1) -> list[_Op]:
    """The ViT on `n_img` images through `blocks` blocks (default: as far as
    `ViT.features` runs, `feature_layer`), then the MAP head if `map_head`.
    A Mobile V-MoE block (`vit.moe`) runs per-image routed experts instead
    of its MLP, dispatched by capacity in one group per batch shard."""
    from mmjax.models.vision_moe import is_moe_block
    from mmjax.models.vit import FLAVOURS

    flavour = FLAVOURS[vit.flavour]
    e, m, p = vit.embed, vit.mlp, vit.patch_size
    patches = (vit.image_size // p) ** 2
    tokens = patches + (1 if flavour.class_token else 0)
    if blocks is None:
        blocks = vit.depth + 1 + vit.feature_layer  # `ViT.features` stops after this block
    rows = n_img * tokens
    ops = [_Op("vit/patch_embed", *(2.0 * n_img * patches * p * p * 3 * e,) * 2, grads=1, weight_only=True)]
    proj = 2.0 * rows * e * e
    scores = 2.0 * n_img * tokens * tokens * e  # all heads: heads * head_dim = e
    hw_scores, kernel = scores, vit.get("attention", "xla") == "splash"
    if kernel:  # sequences padded to the kernel's block, head_dim to the lane width
        head_dim = e // vit.heads
        from mmjax.models.splash import LANES, SEQ_MULTIPLE, padded

        hw_scores = 2.0 * n_img * padded(tokens, SEQ_MULTIPLE) ** 2 * vit.heads * padded(head_dim, LANES)
    mlp = 2.0 * rows * e * m
    for i in range(blocks):
        ops += [_Op("vit/attention_proj", 3 * proj, 3 * proj, stack="vit", tag=_QKV),
                _Op("vit/attention_proj", proj, proj, stack="vit"),
                _Op("vit/attention_scores", 2 * scores, 2 * hw_scores, kind=_BATCHED_DOT, stack="vit",
                    weights=False, tag=_CONTEXT, kernel=kernel)]
        if is_moe_block(vit, i):
            ops += _vision_moe_ops(vit, n_img, tokens, batch_shards)
            continue
        ops += [_Op("vit/mlp", mlp, mlp, stack="vit"),
                _Op("vit/mlp", mlp, mlp, stack="vit", residual=False)]
    # The MAP head only feeds `ViT.pooled` (MM1 takes patch features): one
    # probe per image attends to the tokens, then an MLP on the probe.
    head = 0.0
    if map_head:
        head = (2.0 * n_img * e * e * 2  # query (the probe) and output projections
                + 2.0 * rows * e * 2 * e  # keys, values
                + 2.0 * 2 * n_img * tokens * e  # scores, weighted values
                + 2.0 * 2 * n_img * e * m)  # MLP
    ops.append(_Op("vit/map_head", head, head))
    return ops


def _vision_moe_ops(vit, n_img: int, tokens: int, batch_shards: int) -> list[_Op]:
    """One Mobile V-MoE block's MLP (`mmjax.models.vision_moe`): the router on
    each image's mean patch token, its `tokens` through top_k experts (useful)
    or every expert's capacity buffer (executed), the one-hot dispatch and
    combine einsums `[G, S, E, C] x [G, S, n, M]`."""
    from mmjax.models.moe import capacity, dispatch_groups

    moe, e = vit.moe, vit.embed
    experts, k, h = moe.num_experts, moe.top_k, moe.expert_mlp
    groups = dispatch_groups(n_img, batch_shards)
    slots = groups * experts * capacity(n_img // groups, k, experts, moe.capacity_factor)
    router = 2.0 * n_img * e * experts
    one_hot = 2.0 * n_img * (slots // groups) * tokens * e
    active, executed = 2.0 * n_img * k * tokens * e * h, 2.0 * slots * tokens * e * h  # one of fc1 / fc2
    return [_Op("vit/moe_router", router, router, stack="vit"),
            _Op("vit/moe_dispatch", 0.0, one_hot, grads=1, kind=_BATCHED_DOT, stack="vit", weights=False),
            _Op("vit/moe_experts", 2 * active, 2 * executed, kind=_BATCHED_DOT, stack="vit"),
            _Op("vit/moe_dispatch", 0.0, one_hot, kind=_BATCHED_DOT, stack="vit", residual=False, weights=False)]


def _pool_op(component: str, n: int, grid: int, side: int, channels: int) -> _Op:
    """`adaptive_avg_pool2d`: two contractions with constant matrices (rows first)."""
    flops = 2.0 * n * channels * (side * grid * grid + side * side * grid)
    return _Op(component, flops, flops, grads=1, weights=False)


def _connector_ops(cfg, vit_embed: int, num_patches: int, embed: int, n_img: int) -> list[_Op]:
    kind, k = cfg.kind, cfg.num_tokens
    grid, side = math.isqrt(num_patches), math.isqrt(k)
    ops: list[_Op] = []

    def dense(name, rows, fan_in, fan_out):
        flops = 2.0 * rows * fan_in * fan_out
        ops.append(_Op(name, flops, flops))

    def conv(name, size, c_in, c_out, kernel):
        flops = 2.0 * n_img * c_in * c_out * _conv_positions(size, kernel) ** 2
        ops.append(_Op(name, flops, flops, kind=_CONV))

    if kind == "c_abstractor":
        h = cfg.hidden
        for stage, size, c_in in (("stage1", grid, vit_embed), ("stage2", side, h)):
            if stage == "stage2":
                ops.append(_pool_op("connector/pool", n_img, grid, side, h))
            if c_in != h:
                conv(f"connector/{stage}", size, c_in, h, 1)
            for _ in range(cfg.depth):
                conv(f"connector/{stage}", size, h, h, 1)
                conv(f"connector/{stage}", size, h, h, 3)
                conv(f"connector/{stage}", size, h, h, 1)
        dense("connector/readout", n_img * k, h, embed)
        dense("connector/readout", n_img * k, embed, embed)
    elif kind == "avg_pool":
        ops.append(_pool_op("connector/pool", n_img, grid, side, vit_embed))
        dense("connector/proj", n_img * k, vit_embed, embed)
    elif kind == "attention_pool":
        dense("connector/attention_proj", n_img * k, vit_embed, vit_embed)  # queries
        dense("connector/attention_proj", n_img * num_patches, vit_embed, 2 * vit_embed)  # keys, values
        dense("connector/attention_proj", n_img * k, vit_embed, vit_embed)  # out
        scores = 2.0 * 2 * n_img * k * num_patches * vit_embed
        ops.append(_Op("connector/attention_scores", scores, scores, kind=_BATCHED_DOT, weights=False))
        dense("connector/proj", n_img * k, vit_embed, embed)
    else:
        raise ConfigError(f"config.model.connector.kind={kind!r} is unknown.")
    return [dataclasses.replace(ops[0], entry=True)] + ops[1:]


def _mesh_sizes(config, num_devices: int) -> dict[str, int]:
    from mmjax.parallel.mesh import resolve_mesh_shape

    return resolve_mesh_shape(dict(config.mesh), num_devices)


def _batch_shards(config, sizes: Mapping[str, int]) -> int:
    from mmjax.parallel.rules import get_layout

    axes = get_layout(config.rules).get("batch")
    names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return math.prod(sizes.get(a, 1) for a in names)


def _megablox_tile_overhead(moe, tokens_per_device: int, expert_shards: int, embed: int) -> float:
    """Rows the megablox kernels multiply per routed row on one expert shard
    (`moe_dropless.megablox_rows_computed`, with balanced routing: the shard
    receives `tokens_per_device * top_k` rows), for the up-projections'
    `[rows, embed] @ [embed, expert_mlp]` tiling."""
    from mmjax.models.moe_dropless import megablox_rows_computed, receive_buffer_rows

    rows = tokens_per_device * moe.top_k
    if not rows:
        return 1.0
    buffer = receive_buffer_rows(tokens_per_device, moe.top_k, expert_shards,
                                 float(moe.get("dropless_buffer_factor", 0.0))) if expert_shards > 1 else rows
    groups = moe.num_experts // expert_shards
    return megablox_rows_computed(rows, buffer, groups, embed, moe.expert_mlp) / rows


def _decoder_ops(dec, b: int, s: int, image_reach: int, sizes: Mapping[str, int], batch_shards: int,
                 ragged_dot: str, causal: bool = True, lm_head: bool = True, name: str = "decoder") -> list[_Op]:
    """The decoder's layers on `b` sequences of `s` tokens (causal, or every
    pair useful when not `causal`: a bidirectional text tower, which runs
    through XLA's attention) and its `lm_head`; components `{name}/...`."""
    from mmjax.models.decoder import is_moe_layer
    from mmjax.models.moe import capacity, dispatch_groups

    t = b * s
    m, hd = dec.embed, dec.head_dim
    q_out, kv_out = dec.heads * hd, dec.kv_heads * hd
    causal_pairs = s * (s + 1) / 2 if causal else s * s
    ops: list[_Op] = []
    kernel = dec.get("attention", "xla") == "splash" and causal  # the kernel takes causal masks only
    # The kernel skips key blocks above the diagonal ((n + 1) / 2 of n blocks
    # per query block) except those an image's queries reach.
    executed_pairs, lanes = s * s, hd
    if kernel:
        from mmjax.models.splash import LANES, block_size, evaluated_blocks, padded

        executed_pairs = evaluated_blocks(s, image_reach) * block_size(s) ** 2
        lanes = padded(hd, LANES)
    for i in range(dec.layers):
        qkv = 2.0 * t * m * (q_out + 2 * kv_out)  # q: heads; k, v: kv_heads (GQA)
        out = 2.0 * t * m * q_out
        ops += [_Op(f"{name}/attention_proj", qkv, qkv, stack=name, tag=_QKV),
                _Op(f"{name}/attention_proj", out, out, stack=name)]
        per_pair = 2.0 * 2 * b * dec.heads * hd  # scores + weighted values
        hw_pair = per_pair * lanes / hd
        ops.append(_Op(f"{name}/attention_scores", per_pair * causal_pairs, hw_pair * executed_pairs,
                       kind=_BATCHED_DOT, stack=name, weights=False, tag=_CONTEXT, kernel=kernel))
        if not is_moe_layer(dec, i):
            up = 2.0 * t * m * dec.mlp
            ops += [_Op(f"{name}/mlp", 2 * up, 2 * up, stack=name),  # gate, up
                    _Op(f"{name}/mlp", up, up, stack=name, residual=False)]  # down
            continue
        moe = dec.moe
        e, k, h = moe.num_experts, moe.top_k, moe.expert_mlp
        router = 2.0 * t * m * e
        ops.append(_Op(f"{name}/moe_router", router, router, stack=name))
        active = 2.0 * t * k * m * h  # one of gate / up / down for the routed tokens
        if moe.dispatch == "capacity":
            groups = dispatch_groups(t, batch_shards, moe.get("group_size", 0))
            slots = groups * e * capacity(t // groups, k, e, moe.capacity_factor)  # all expert buffers
            one_hot = 2.0 * t * (slots // groups) * m  # dispatch or combine einsum: T x (E * C) x M
            hw = 2.0 * slots * m * h
            ops += [_Op(f"{name}/moe_dispatch", 0.0, one_hot, grads=1, kind=_BATCHED_DOT, stack=name,
                        weights=False),
                    _Op(f"{name}/moe_experts", 3 * active, 3 * hw, kind=_BATCHED_DOT, stack=name),
                    _Op(f"{name}/moe_dispatch", 0.0, one_hot, kind=_BATCHED_DOT, stack=name,
                        residual=False, weights=False)]
        else:
            # Expert parallelism runs in `shard_map` with weights replicated over `model`:
            # the model axis repeats the expert work.
            repeat = sizes.get("model", 1) if sizes.get("expert", 1) > 1 else 1
            hw = active * repeat * (e if ragged_dot == "dense" else 1)
            if moe.get("grouped_matmul") == "megablox" and ragged_dot == "grouped":
                hw *= _megablox_tile_overhead(moe, t // batch_shards, sizes.get("expert", 1), m)
            combine = 2.0 * t * k * m  # weighting the k outputs of each token
            ops += [_Op(f"{name}/moe_experts", 3 * active, 3 * hw, kind=_RAGGED, stack=name),
                    _Op(f"{name}/moe_dispatch", 0.0, combine, kind=_BATCHED_DOT, stack=name,
                        residual=False, weights=False)]
        if moe.shared_expert:
            shared = 2.0 * t * m * h
            ops += [_Op(f"{name}/moe_shared", 2 * shared, 2 * shared, stack=name),
                    _Op(f"{name}/moe_shared", shared, shared, stack=name, residual=False)]
    if lm_head:
        head = 2.0 * t * m * dec.vocab_size  # lm_head or tied embedding.attend
        ops.append(_Op(f"{name}/lm_head", head, head))
    return ops


def _recompute(op: _Op, policies: Mapping[str, str]) -> float:
    """Forward FLOPs the backward pass runs again under the stack's policy."""
    inside_kernel = op.hardware / 2 if op.kernel else 0.0  # a fused backward recomputes its scores
    if not op.stack or not op.residual:
        return inside_kernel
    policy = policies.get(op.stack) or ""
    if policy is True:
        policy = "full"
    if policy not in _SAVED_BY_POLICY:
        raise ValueError(f"remat policy {policy!r} is unknown; choose one of {sorted(_SAVED_BY_POLICY)}.")
    saved = _SAVED_BY_POLICY[policy]
    if saved is None or op.kind in saved:
        return inside_kernel
    if op.tag and op.tag in saved:
        # A kept context spares the kernel's forward; the XLA path still
        # recomputes the scores (q k^T, half the work) for the softmax's backward.
        return inside_kernel if op.kernel else (op.hardware / 2 if op.tag == _CONTEXT else 0.0)
    return op.hardware + inside_kernel


@dataclasses.dataclass(frozen=True)
class StepOps:
    """The matmul-like operations of one training step and how the model's
    components connect (what `train_flops` counts for one objective)."""

    ops: list[_Op]
    components: tuple[str, ...]             # the model's components (top-level parameter names)
    upstream: dict[str, tuple[str, ...]]    # component -> the components its input comes from, transitively
    policies: dict[str, str]                # layer stack -> remat policy
    tokens: int                             # tokens per step
    images: int                             # images per step
    stateless: frozenset[str] = frozenset()  # components without weights: they train when one upstream does


# Components of a next-token model in the order activations flow through them.
COMPONENTS = ("vit", "connector", "decoder")


def _next_token_ops(config, num_devices: int, ragged_dot: str) -> StepOps:
    """MM1 (ViT -> connector -> decoder) or a text-only decoder, on
    `data.global_batch` sequences of `data.seq_len` tokens."""
    from mmjax.models import model_spec

    model, data = config.model, config.data
    b, s = data.global_batch, data.seq_len
    n_img = b * data.max_images if model_spec(model).uses_images else 0  # text-only models encode no image
    sizes = _mesh_sizes(config, num_devices)
    num_patches = (model.vit.image_size // model.vit.patch_size) ** 2
    # how far past the diagonal a query of a bidirectional image block sees
    image_reach = data.tokens_per_image - 1 if n_img and model.get("bidirectional_image_attention") else 0
    ops = (_vit_ops(model.vit, n_img)
           + _connector_ops(model.connector, model.vit.embed, num_patches, model.decoder.embed, n_img)
           + _decoder_ops(model.decoder, b, s, image_reach, sizes, _batch_shards(config, sizes), ragged_dot))
    return StepOps(ops, COMPONENTS, {c: COMPONENTS[:i] for i, c in enumerate(COMPONENTS)},
                   {"vit": model.vit.get("remat", ""), "decoder": model.decoder.get("remat", "")}, b * s, n_img)


def step_ops(config, num_devices: int, ragged_dot: str) -> StepOps:
    """The operations of the objective the registry names for
    `config.model.name` (`ModelSpec.objective`): "next_token",
    "contrastive" (a dual encoder) or "classification" (an image
    classifier; both `mmjax.train.flops_dual`)."""
    from mmjax.models import model_spec

    objective = model_spec(config.model).objective
    if objective == "next_token":
        return _next_token_ops(config, num_devices, ragged_dot)
    if objective == "contrastive":
        from mmjax.train.flops_dual import dual_encoder_ops

        return dual_encoder_ops(config, num_devices)
    if objective == "classification":
        from mmjax.train.flops_dual import classifier_ops

        return classifier_ops(config, num_devices)
    raise ValueError(f"train_flops has no FLOPs count for objective {objective!r} of model "
                     f"{model_spec(config.model).name!r}; add one to mmjax.train.flops.step_ops.")


def train_flops(config, num_devices: int | None = None, ragged_dot: str | None = None) -> FlopsBreakdown:
    """FLOPs of one training step of the model in `config` (see module doc).

    Args:
      config: the full run config (`model`, `data`, `mesh`, `rules`).
      num_devices: devices the step runs on (default: the product of
        `config.mesh`, or `jax.device_count()` when an axis is -1); sets the
        per-device values, resolves a -1 in `config.mesh`, and gives the MoE
        group count (batch shards) of capacity dispatch.
      ragged_dot: how dropless MoE's `ragged_dot` executes: "grouped" (only the
        routed rows: TPU, GPU) or "dense" (against every expert: the CPU
        backend). Default: by `jax.default_backend()`.
    """
    if num_devices is None:
        from mmjax.parallel.mesh import axis_settings

        fixed = [int(v) for v in axis_settings(config.mesh).values()]
        num_devices = math.prod(fixed) if all(v > 0 for v in fixed) else jax.device_count()
    num_devices = int(num_devices)
    if ragged_dot is None:
        ragged_dot = "dense" if jax.default_backend() == "cpu" else "grouped"
    if ragged_dot not in ("grouped", "dense"):
        raise ValueError(f"ragged_dot={ragged_dot!r}; choose 'grouped' or 'dense'.")
    step = step_ops(config, num_devices, ragged_dot)
    frozen = frozen_components(config, step.components)
    forward: dict[str, float] = {}
    hw_fwd: dict[str, float] = {}
    hw_bwd: dict[str, float] = {}
    remat: dict[str, float] = {}
    passes: dict[str, float] = {}
    for op in step.ops:
        part = op.component.split("/")[0]
        upstream = any(c not in frozen for c in step.upstream[part])
        trainable = upstream if part in step.stateless else part not in frozen
        backward = _backward_ops(op, trainable, upstream)
        passes[part] = 3.0 if trainable else (2.0 if upstream else 1.0)
        for table, value in ((forward, op.model), (hw_fwd, op.hardware), (hw_bwd, backward * op.hardware),
                             (remat, _recompute(op, step.policies) if backward else 0.0)):
            table[op.component] = table.get(op.component, 0.0) + value
    return FlopsBreakdown(forward, hw_fwd, hw_bwd, remat, num_devices, step.tokens, step.images, passes)


def frozen_components(config, components: tuple[str, ...] = COMPONENTS) -> frozenset[str]:
    """Components whose parameters `optimizer.module_lr_scale` sets to 0
    (the whole component, e.g. "vit=0.0"; a frozen sub-module is counted as
    trainable)."""
    from mmjax.train.optimizer import parse_module_lr_scale

    scales = parse_module_lr_scale(config.optimizer.get("module_lr_scale", ""))
    return frozenset(c for c in components if scales.get(c, 1.0) == 0.0)


def _backward_ops(op: _Op, trainable: bool, upstream: bool) -> int:
    """Backward matmuls of the forward's size that the step executes: weight
    gradients where the component trains, input gradients where a gradient
    must flow further back (a trainable component upstream, or earlier
    layers of this one); XLA removes the rest."""
    if op.weight_only:
        return op.grads if trainable else 0
    flows_back = upstream or (trainable and not op.entry)
    if not op.weights:  # activations only: every operand's gradient is needed, or none
        return op.grads if (trainable or upstream) else 0
    return (1 if trainable else 0) + (op.grads - 1 if flows_back else 0)
