"""Attention through the Pallas splash kernel (TPU), sharded with `shard_map`.

`splash_attention(q, k, v, mask)` takes q `[b, t, heads, d]`, k/v
`[b, t, kv_heads, d]` and a mask that is either None (every token sees every
token: the ViT) or a `SegmentMask` (causal within each packed document: the
decoder). The kernel's mask is causal or full and the packed documents come
in as its segment ids, so no `[b, t, t]` mask is ever built.

Bidirectional image blocks (`SegmentMask.image_ids`): a query inside an
image sees the keys up to the end of its image, i.e. the causal rule
`query position >= key position` with the query's position moved to the
last token of its image. The kernel evaluates its causal rule on a per-query
position array (`MaskInfo.q_sequence`), so each example passes its own
positions; the static block table marks the key blocks up to
`SegmentMask.image_span - 1` positions past the diagonal as partial (rule
evaluated) instead of skipped, and the blocks below it stay full.

Off TPU the kernel runs in Pallas' interpreter (slow; tests only). Inside a
training step the call is wrapped in `shard_map` over the active mesh: the
batch keeps its data-parallel sharding and the heads their model-axis
sharding, so each device runs the kernel on its own rows and heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec

from mmjax.models.partitioning import current_resolver

# Sequences are padded to a multiple of this (the kernel's smallest block).
SEQ_MULTIPLE = 128
# Largest block the kernel is given along either sequence axis.
MAX_BLOCK = 512
# Head dimensions are padded to a multiple of this (the TPU lane width).
LANES = 128


def padded(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple` (SEQ_MULTIPLE for sequences,
    LANES for head_dim): the sizes the kernel runs on."""
    return -(-n // multiple) * multiple


def block_size(seq: int) -> int:
    """The kernel's block along both sequence axes for an unpadded length `seq`."""
    return math.gcd(padded(seq, SEQ_MULTIPLE), MAX_BLOCK)


def _block_sizes(seq: int) -> kernel_lib.BlockSizes:
    block = block_size(seq)
    return kernel_lib.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block)


class ReachCausalMask(mask_lib._ComputableMask):  # the kernel's base class for rule-computed masks
    """Causal rule `q_position >= kv_position` for queries whose positions
    may be moved up to `reach` places ahead at run time (image blocks).

    The kernel computes the rule from the query positions it is given; this
    mask's entries only classify blocks for its static table: a block below
    the diagonal stays full (moving a query ahead only adds keys), a block
    past the diagonal that a moved query could reach is made partial (rule
    evaluated), one beyond `reach` stays empty (skipped)."""

    def __init__(self, shape: tuple[int, int], reach: int):
        self.reach = reach
        super().__init__(shape=shape, mask_function=lambda q_ids, kv_ids: q_ids >= kv_ids)

    def __getitem__(self, idx):
        q_slice, kv_slice = idx
        rows = self.q_sequence[q_slice][:, None]
        cols = np.arange(*kv_slice.indices(self.shape[1]))[None, :]
        block = rows >= cols
        if not block.any() and cols.min() - rows.max() <= self.reach:
            block[0, 0] = True  # some query of this block may reach it: partial, not empty
        return block

    def __eq__(self, other):
        return isinstance(other, ReachCausalMask) and (self.shape, self.reach) == (other.shape, other.reach)

    def __hash__(self):
        return hash((ReachCausalMask, self.shape, self.reach))


def evaluated_blocks(seq: int, reach: int = 0) -> int:
    """Key blocks the causal kernel runs over, summed over the query blocks,
    for an unpadded length `seq` whose queries may reach `reach` positions
    past the diagonal (image blocks; 0 for plain causal)."""
    n = padded(seq, SEQ_MULTIPLE) // block_size(seq)
    ahead = 0 if reach <= 0 else 1 + (reach - 1) // block_size(seq)
    return sum(i + 1 + min(ahead, n - 1 - i) for i in range(n))


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, seq: int, causal: bool, interpret: bool, reach: int = 0):
    """The splash kernel for one example: q `[heads, seq, d]`, k/v
    `[kv_heads, seq, d]`; `reach` > 0 lets causal queries be moved up to that
    many positions ahead (`with_query_positions`)."""
    shape = (seq, seq)
    if reach:
        head_mask = ReachCausalMask(shape, reach)
    else:
        head_mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return kernel_lib.make_splash_mha(
            mask_lib.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
            block_sizes=_block_sizes(seq), interpret=interpret,
            residual_checkpoint_name="attention_context")  # kept by the `attention` remat policies


def with_query_positions(run, positions: jax.Array):
    """`run` (a `_kernel` with reach) with the causal rule evaluated at
    `positions` `[seq]` int32 (one per query) in the forward and both
    backward kernels."""
    infos = [None if info is None else info._replace(q_sequence=positions)
             for info in (run.fwd_mask_info, run.dq_mask_info, run.dkv_mask_info)]
    return kernel_lib.SplashAttentionKernel(*infos, **run.kwargs)


def image_query_positions(image_ids: jax.Array) -> jax.Array:
    """image_ids `[b, t]` (-1 for text; one image's tokens contiguous) ->
    `[b, t]` int32: each query's own position, or for an image token the
    position of its image's last token (the last key it may see)."""
    b, t = image_ids.shape
    index = jnp.arange(t, dtype=jnp.int32)
    following = jnp.concatenate([image_ids[:, 1:], jnp.full((b, 1), -1, image_ids.dtype)], axis=1)
    run_end = (image_ids != following) | (image_ids < 0)  # last token of an image (or any text token)
    end = jax.lax.cummin(jnp.where(run_end, index, t), axis=1, reverse=True)
    return jnp.where(image_ids >= 0, end, index).astype(jnp.int32)


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = padded(x.shape[axis], multiple) - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _local_attention(q, k, v, segment_ids=None, image_ids=None, *, causal: bool, interpret: bool, reach: int = 0):
    """One device's share: q `[b, t, h, d]`, k/v `[b, t, kv, d]`, segment_ids
    and image_ids `[b, t]` or None -> `[b, t, h, d]` (float32 statistics
    inside the kernel); image blocks need `reach` >= the longest block - 1."""
    b, t, h, d = q.shape
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q, k, v = (_pad_to(x, 3, LANES) for x in (q, k, v))  # zero lanes change no score
    q, k, v = (_pad_to(x, 1, SEQ_MULTIPLE) for x in (q, k, v))
    seq = q.shape[1]
    if segment_ids is None and seq != t:
        segment_ids = jnp.ones((b, t), jnp.int32)  # padded keys must stay unseen
    if segment_ids is not None:
        segment_ids = _pad_to(segment_ids.astype(jnp.int32), 1, SEQ_MULTIPLE, value=-1)
    positions = None
    if image_ids is not None:
        positions = image_query_positions(_pad_to(image_ids.astype(jnp.int32), 1, SEQ_MULTIPLE, value=-1))
    run = _kernel(h, seq, causal, interpret, max(0, min(reach, seq - 1)) if positions is not None else 0)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, heads, seq, d]

    def one(q, k, v, seg, pos):
        ids = None if seg is None else kernel_lib.SegmentIds(q=seg, kv=seg)
        kernel = run if pos is None else with_query_positions(run, pos)
        return kernel(q, k, v, segment_ids=ids)

    out = jax.vmap(one)(q, k, v, segment_ids, positions)
    return jnp.swapaxes(out, 1, 2)[:, :t, :, :d].astype(q.dtype)


def _sharded_specs(resolver, q_shape, k_shape):
    """shard_map specs: the batch as the layout shards it, the heads only
    where q and k/v heads split the same way (GQA groups stay whole)."""
    q_spec = resolver(("batch", "seq", "heads", "head_dim"), q_shape).spec
    k_spec = resolver(("batch", "seq", "kv_heads", "head_dim"), k_shape).spec
    pad = lambda spec: tuple(spec) + (None,) * (4 - len(spec))
    q_spec, k_spec = pad(q_spec), pad(k_spec)
    batch = q_spec[0] if q_spec[0] == k_spec[0] else None
    heads = q_spec[2] if q_spec[2] == k_spec[2] else None
    return PartitionSpec(batch, None, heads, None), PartitionSpec(batch, None)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """q `[b, t, heads, d]`, k/v `[b, t, kv_heads, d]`; mask None (full) or a
    `SegmentMask` (causal per segment, with image blocks when it has
    image_ids) -> `[b, t, heads, d]`."""
    from mmjax.models.attention import SegmentMask

    if mask is None:
        causal, ids, reach = False, (), 0
    elif isinstance(mask, SegmentMask):
        causal, ids = True, (mask.segment_ids,)
        reach = 0
        if mask.image_ids is not None:
            ids += (mask.image_ids,)
            # without a known span every key block past the diagonal stays in play
            reach = int(mask.image_span) - 1 if mask.image_span else q.shape[1]
    else:
        raise ValueError("splash attention takes no mask or a SegmentMask; dense masks need "
                         "attention='xla' or 'dot_product_attention'.")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"splash attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}.")
    resolver = current_resolver()
    mesh = None if resolver is None else resolver.mesh
    platform = jax.default_backend() if mesh is None else mesh.devices.flat[0].platform
    local = functools.partial(_local_attention, causal=causal, interpret=platform != "tpu", reach=reach)
    if mesh is None:
        return local(q, k, v, *ids)
    qkv_spec, ids_spec = _sharded_specs(resolver, q.shape, k.shape)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (ids_spec,) * len(ids),
                       out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, *ids)
