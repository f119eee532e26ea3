"""Attention through the Pallas splash kernel (TPU), sharded with `shard_map`.

`splash_attention(q, k, v, mask)` takes q `[b, t, heads, d]`, k/v
`[b, t, kv_heads, d]` and a mask that is either None (every token sees every
token: the ViT) or a `SegmentMask` without image blocks (causal within each
packed document: the decoder). The kernel's mask is static (causal or full)
and the packed documents come in as its segment ids, so no `[b, t, t]` mask
is ever built. Bidirectional image blocks depend on the data and are not
expressible as a static mask plus segment ids; configs that ask for them
with this implementation are refused before anything is built.

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


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, seq: int, causal: bool, interpret: bool):
    """The splash kernel for one example: q `[heads, seq, d]`, k/v `[kv_heads, seq, d]`."""
    shape = (seq, seq)
    head_mask = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
    with jax.ensure_compile_time_eval():  # concrete mask tables, safe to reuse across traces
        return kernel_lib.make_splash_mha(
            mask_lib.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
            block_sizes=_block_sizes(seq), interpret=interpret,
            residual_checkpoint_name="attention_context")  # kept by the `attention` remat policies


def _pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    extra = padded(x.shape[axis], multiple) - x.shape[axis]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _local_attention(q, k, v, segment_ids, *, causal: bool, interpret: bool):
    """One device's share: q `[b, t, h, d]`, k/v `[b, t, kv, d]`, segment_ids
    `[b, t]` or None -> `[b, t, h, d]` (float32 statistics inside the kernel)."""
    b, t, h, d = q.shape
    q = q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q, k, v = (_pad_to(x, 3, LANES) for x in (q, k, v))  # zero lanes change no score
    q, k, v = (_pad_to(x, 1, SEQ_MULTIPLE) for x in (q, k, v))
    seq = q.shape[1]
    if segment_ids is None and seq != t:
        segment_ids = jnp.ones((b, t), jnp.int32)  # padded keys must stay unseen
    if segment_ids is not None:
        segment_ids = _pad_to(segment_ids.astype(jnp.int32), 1, SEQ_MULTIPLE, value=-1)
    run = _kernel(h, seq, causal, interpret)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [b, heads, seq, d]

    def one(q, k, v, seg):
        ids = None if seg is None else kernel_lib.SegmentIds(q=seg, kv=seg)
        return run(q, k, v, segment_ids=ids)

    out = jax.vmap(one)(q, k, v, segment_ids)
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
    `SegmentMask` without image ids (causal per segment) -> `[b, t, heads, d]`."""
    from mmjax.models.attention import SegmentMask

    if mask is None:
        causal, segment_ids = False, None
    elif isinstance(mask, SegmentMask) and mask.image_ids is None:
        causal, segment_ids = True, mask.segment_ids
    else:
        raise ValueError("splash attention takes no mask or packed causal segments; bidirectional "
                         "image blocks and dense masks need attention='xla' or 'dot_product_attention'.")
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"splash attention needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}.")
    resolver = current_resolver()
    if resolver is None:
        interpret = jax.default_backend() != "tpu"
        return _local_attention(q, k, v, segment_ids, causal=causal, interpret=interpret)
    mesh = resolver.mesh
    interpret = mesh.devices.flat[0].platform != "tpu"
    qkv_spec, seg_spec = _sharded_specs(resolver, q.shape, k.shape)
    local = functools.partial(_local_attention, causal=causal, interpret=interpret)
    if segment_ids is None:
        fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh,
                           in_specs=(qkv_spec,) * 3, out_specs=qkv_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + (seg_spec,),
                       out_specs=qkv_spec, check_vma=False)
    return fn(q, k, v, segment_ids)
