"""Dropless MoE experts: grouped matmuls and the token exchange between
expert shards.

Grouped matmul (`moe.grouped_matmul`): rows `[m, in]` sorted by expert, one
weight `[in, out]` per expert, `sizes` `[E]` rows per expert.
- "ragged_dot": `jax.lax.ragged_dot` (XLA: grouped on TPU/GPU; the CPU
  backend runs it as a dense matmul against every expert).
- "megablox": the Pallas grouped-matmul kernel
  (`jax.experimental.pallas.ops.tpu.megablox`, with its own backward
  kernels), TPU; off TPU it runs in Pallas' interpreter (tests).

Token exchange with expert parallelism (`expert_parallel_experts`): every
device sorts its (token, choice) assignments by expert and sends each expert
shard only the rows routed to its experts (`jax.lax.ragged_all_to_all`),
runs its local experts on what it received, and sends the results back the
same way. The receive buffer has room for the worst case (every peer routes
all its rows here), so nothing is dropped; only the routed rows travel. The
CPU backend has no ragged all-to-all: there the same exchange runs as an
`all_to_all` of per-peer buffers padded to the worst case (same layout,
same results; it moves the padding too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.models.splash import padded

GROUPED_MATMULS = ("ragged_dot", "megablox")
# Largest row, contraction and output tiles of the megablox kernel (each
# clipped to the problem). The kernel reads an expert's [k, n] weights once
# per row tile it visits, so the row tile sets how often the weights cross
# HBM: 512-row tiles read them 4x less often than 128-row ones.
MEGABLOX_TILING = (512, 1024, 1024)
ROW_MULTIPLE = 128  # row tiles are whole multiples of this (TPU sublanes x packing)


def megablox_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
    """(tm, tk, tn) for x `[m, k]` @ w `[k, n]`: MEGABLOX_TILING clipped to the
    shapes (rows rounded up to ROW_MULTIPLE)."""
    tm, tk, tn = MEGABLOX_TILING
    return min(tm, padded(m, ROW_MULTIPLE)), min(tk, k), min(tn, n)


def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, impl: str = "ragged_dot",
                   platform: str | None = None) -> jax.Array:
    """x `[m, in]` (rows grouped by expert, `sizes` `[E]` int32 rows each,
    trailing rows beyond their sum ignored), w `[E, in, out]` -> `[m, out]`.
    `platform`: where the program runs (default: JAX's default backend);
    megablox runs as a TPU kernel there and in Pallas' interpreter elsewhere."""
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w, sizes)
    if impl != "megablox":
        raise ValueError(f"grouped matmul {impl!r}; choose one of {GROUPED_MATMULS}.")
    from jax.experimental.pallas.ops.tpu import megablox

    m = x.shape[0]
    tiling = megablox_tiling(m, w.shape[1], w.shape[2])
    rows = padded(m, tiling[0])  # the kernel walks whole row tiles
    x_rows = jnp.pad(x, ((0, rows - m), (0, 0)))
    out = megablox.gmm(x_rows, w, sizes.astype(jnp.int32), x.dtype, tiling,
                       interpret=(platform or jax.default_backend()) != "tpu")
    valid = jnp.arange(rows) < jnp.sum(sizes)  # rows past the groups are left unwritten
    return jnp.where(valid[:, None], out, 0)[:m]


def swiglu_experts(x: jax.Array, sizes: jax.Array, params, impl: str, platform: str | None = None) -> jax.Array:
    """x `[m, M]` sorted by expert, sizes `[E]`, params (wi_gate, wi_up
    `[E, M, H]`, wo `[E, H, M]`) -> `[m, M]`."""
    wi_gate, wi_up, wo = params
    gate = grouped_matmul(x, wi_gate, sizes, impl, platform)
    up = grouped_matmul(x, wi_up, sizes, impl, platform)
    return grouped_matmul(jax.nn.silu(gate) * up, wo, sizes, impl, platform)


def _sort_by(group: jax.Array, num_groups: int):
    """group `[n]` int in 0..num_groups (num_groups = none: sorted last) ->
    (order `[n]`, sizes `[num_groups]` int32)."""
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=num_groups + 1)[:num_groups].astype(jnp.int32)
    return order, sizes


def _unsort(values: jax.Array, order: jax.Array) -> jax.Array:
    return jnp.zeros_like(values).at[order].set(values)


def local_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, params, impl: str,
                  platform: str | None = None) -> jax.Array:
    """All experts on this device. x `[T, M]`, weights/experts `[T, k]` -> `[T, M]`."""
    t, k = experts.shape
    order, sizes = _sort_by(experts.reshape(-1), params[0].shape[0])
    out = _unsort(swiglu_experts(jnp.take(x, order // k, axis=0), sizes, params, impl, platform), order)
    return jnp.einsum("tkm,tk->tm", out.reshape(t, k, -1), weights.astype(out.dtype))


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                axis: str):
    """`jax.lax.ragged_all_to_all` from a dense `all_to_all`: each peer's rows
    travel in a buffer padded to the operand's length."""
    n, cap = send_sizes.shape[0], operand.shape[0]
    i = jnp.arange(cap)
    rows = jnp.take(operand, jnp.clip(input_offsets[:, None] + i, 0, cap - 1), axis=0)  # [P, cap, ...]
    mask = (i[None, :] < send_sizes[:, None]).reshape((n, cap) + (1,) * (operand.ndim - 1))
    received = jax.lax.all_to_all(jnp.where(mask, rows, 0), axis, 0, 0, tiled=True)    # row q: from peer q
    where = jax.lax.all_to_all(output_offsets, axis, 0, 0, tiled=True)                   # q's offset here
    target = jnp.where(i[None, :] < recv_sizes[:, None], where[:, None] + i, output.shape[0])
    return output.at[target.reshape(-1)].set(received.reshape((n * cap,) + operand.shape[1:]), mode="drop")


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                      axis: str, emulate: bool):
    """`jax.lax.ragged_all_to_all` over mesh axis `axis` (the dense emulation
    where the backend has none)."""
    args = (operand, output, input_offsets, send_sizes, output_offsets, recv_sizes)
    if emulate:
        return _emulated_ragged_all_to_all(*args, axis=axis)
    return jax.lax.ragged_all_to_all(*args, axis_name=axis)


def expert_parallel_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, params, impl: str, *,
                            axis: str, platform: str) -> jax.Array:
    """One device's share inside `shard_map`: its tokens x `[T, M]` with
    weights/experts `[T, k]`, and its experts' params (`[E_l, ...]`, shard
    `axis_index(axis)` of the expert axis) -> `[T, M]`. On the CPU platform
    the ragged exchange is emulated."""
    emulate = platform == "cpu"  # XLA:CPU has no ragged all-to-all
    t, k = experts.shape
    n_local = params[0].shape[0]
    peers = jax.lax.psum(1, axis)
    order, sizes = _sort_by(experts.reshape(-1), n_local * peers)       # [T*k], [E]
    rows = jnp.take(x, order // k, axis=0)                              # [T*k, M] by expert
    per_expert = sizes.reshape(peers, n_local)                          # [P, E_l] what I send
    send = per_expert.sum(axis=1)                                       # [P]
    matrix = jax.lax.all_gather(send, axis)                             # [P, P]: sender q -> peer p
    me = jax.lax.axis_index(axis)
    output_offsets = _exclusive_cumsum(matrix, axis=0)[me]              # where my rows land at each peer
    recv = matrix[:, me]                                                # [P] from each sender
    recv_offsets = _exclusive_cumsum(recv)
    buffer = peers * t * k  # worst case: every peer routes all its rows here
    received = ragged_all_to_all(rows, jnp.zeros((buffer, x.shape[1]), x.dtype), _exclusive_cumsum(send),
                                 send, output_offsets, recv, axis=axis, emulate=emulate)
    # rows arrive grouped by sender, then by local expert: regroup by expert
    counts = jax.lax.all_to_all(per_expert, axis, 0, 0, tiled=True)     # [P, E_l] from sender q
    local = jnp.tile(jnp.arange(n_local), peers)
    expert_of_row = jnp.repeat(local, counts.reshape(-1), total_repeat_length=buffer)
    expert_of_row = jnp.where(jnp.arange(buffer) < recv.sum(), expert_of_row, n_local)
    local_order, local_sizes = _sort_by(expert_of_row, n_local)
    results = swiglu_experts(jnp.take(received, local_order, axis=0), local_sizes, params, impl, platform)
    results = _unsort(results, local_order)
    # back to the senders, into the order they sent
    returned = ragged_all_to_all(results, jnp.zeros_like(rows), recv_offsets, recv,
                                 _exclusive_cumsum(matrix, axis=1)[:, me], send, axis=axis, emulate=emulate)
    out = _unsort(returned, order).reshape(t, k, -1)
    return jnp.einsum("tkm,tk->tm", out, weights.astype(out.dtype))
