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
same way. The receive buffer (`buffer_factor`, `moe.dropless_buffer_factor`):
- 0: room for the worst case (every peer routes all its rows here,
  `P * T * k` rows), so nothing is dropped. Only the routed rows travel, but
  the experts' grouped matmuls are shaped (and megablox's cost estimate is
  charged) by the whole buffer.
- f > 0: room for `ceil(f * T * k)` rows, f times a shard's fair share (what
  it receives when routing is balanced). Rows beyond it are not sent: each
  shard takes its senders' rows in peer order, so the last senders' rows for
  the shard's last experts are the ones dropped (their output is 0, the
  residual carries them, as with capacity dispatch). With balanced routing
  (the LB loss or `balance="bias"`) f = 1.25-2 drops little and keeps the
  kernels' work near the routed rows.
The CPU backend has no ragged all-to-all: there the same exchange runs as an
`all_to_all` of per-peer buffers padded to the operand's length (same layout,
same results; it moves the padding too).
"""

from __future__ import annotations

import math

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


def megablox_rows_computed(rows: int, buffer: int, groups: int, k: int, n: int) -> int:
    """Rows megablox multiplies for `rows` routed rows in groups (`groups`
    experts, none empty) at the front of a `buffer`-row operand `[buffer, k]`
    @ `[k, n]`: the kernel visits only the row tiles holding routed rows, and
    a tile where one expert's rows end and the next one's begin is visited
    once per expert in it (expected: every one of the `groups - 1` boundaries
    falls inside a tile). At most the kernel's grid, `tiles + groups - 1`."""
    tm = megablox_tiling(buffer, k, n)[0]
    tiles = padded(buffer, tm) // tm
    return min(-(-rows // tm), tiles) * tm + (groups - 1) * tm if rows else 0


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


def receive_buffer_rows(tokens: int, top_k: int, peers: int, buffer_factor: float) -> int:
    """Rows of an expert shard's receive buffer (module doc): the worst case
    `peers * tokens * top_k` for buffer_factor 0, else
    `ceil(buffer_factor * tokens * top_k)` capped at the worst case."""
    worst = peers * tokens * top_k
    if buffer_factor <= 0:
        return worst
    return min(worst, int(math.ceil(buffer_factor * tokens * top_k)))


def expert_parallel_experts(x: jax.Array, weights: jax.Array, experts: jax.Array, params, impl: str, *,
                            axis: str, platform: str, buffer_factor: float = 0.0):
    """One device's share inside `shard_map`: its tokens x `[T, M]` with
    weights/experts `[T, k]`, and its experts' params (`[E_l, ...]`, shard
    `axis_index(axis)` of the expert axis) -> (y `[T, M]`, kept `[T, k]` bool:
    the assignments that found room in their shard's receive buffer). On the
    CPU platform the ragged exchange is emulated."""
    emulate = platform == "cpu"  # XLA:CPU has no ragged all-to-all
    t, k = experts.shape
    n_local = params[0].shape[0]
    peers = jax.lax.psum(1, axis)
    order, sizes = _sort_by(experts.reshape(-1), n_local * peers)       # [T*k], [E]
    rows = jnp.take(x, order // k, axis=0)                              # [T*k, M] by expert
    per_expert = sizes.reshape(peers, n_local)                          # [P, E_l] what I route
    matrix = jax.lax.all_gather(per_expert.sum(axis=1), axis)           # [P, P]: sender q -> peer p
    buffer = receive_buffer_rows(t, k, peers, buffer_factor)
    # each shard keeps its senders' rows in peer order while they fit
    kept = jnp.clip(buffer - _exclusive_cumsum(matrix, axis=0), 0, matrix)   # [P, P]
    me = jax.lax.axis_index(axis)
    send, recv = kept[me], kept[:, me]                                  # [P] sent / received rows
    send_offsets = _exclusive_cumsum(per_expert.sum(axis=1))            # my block for peer p in `rows`
    received = ragged_all_to_all(rows, jnp.zeros((buffer, x.shape[1]), x.dtype), send_offsets, send,
                                 _exclusive_cumsum(kept, axis=0)[me], recv, axis=axis, emulate=emulate)
    # rows arrive grouped by sender, then by local expert (a sender's block
    # cut short loses its last experts' rows): regroup by expert
    counts = jax.lax.all_to_all(per_expert, axis, 0, 0, tiled=True)     # [P, E_l] from sender q
    counts = jnp.clip(recv[:, None] - _exclusive_cumsum(counts, axis=1), 0, counts)
    local = jnp.tile(jnp.arange(n_local), peers)
    expert_of_row = jnp.repeat(local, counts.reshape(-1), total_repeat_length=buffer)
    expert_of_row = jnp.where(jnp.arange(buffer) < recv.sum(), expert_of_row, n_local)
    local_order, local_sizes = _sort_by(expert_of_row, n_local)
    results = swiglu_experts(jnp.take(received, local_order, axis=0), local_sizes, params, impl, platform)
    results = _unsort(results, local_order)
    # back to the senders, into the order they sent (rows not sent stay 0)
    returned = ragged_all_to_all(results, jnp.zeros_like(rows), _exclusive_cumsum(recv), recv,
                                 _exclusive_cumsum(matrix, axis=1)[:, me], send, axis=axis, emulate=emulate)
    position = jnp.arange(t * k)
    peer_of_row = jnp.repeat(jnp.arange(peers), per_expert.sum(axis=1), total_repeat_length=t * k)
    was_sent = position - send_offsets[peer_of_row] < send[peer_of_row]
    out = _unsort(returned, order).reshape(t, k, -1)
    y = jnp.einsum("tkm,tk->tm", out, weights.astype(out.dtype))
    return y, _unsort(was_sent, order).reshape(t, k)
