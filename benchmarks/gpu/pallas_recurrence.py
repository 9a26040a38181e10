"""A fused Pallas kernel for the QRNN's linear recurrence c_t = a_t * c_{t-1} + b_t (c_0 = 0).

a, b, c: [batch, time, hidden]. One kernel instance owns one batch row and a block of
hidden units, holds the state in registers and walks the time axis once: each element
of a and b is read once and each of c written once (the sequential scan's traffic,
without a kernel launch or a loop trip of XLA's per step). The gradient is the same
recurrence run backwards (the adjoint, as yt8m_qrnn's sequential scan does it):
lam_t = a_{t+1} * lam_{t+1} + g_t, dL/db_t = lam_t, dL/da_t = lam_t * c_{t-1}, in a
second kernel of the same form that also writes both gradients.

On a GPU the kernels go through Pallas' Triton lowering; elsewhere they run in Pallas'
interpret mode (the same kernel code, executed by XLA on the CPU), so tests check the
kernel itself against a float64 reference.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_BLOCK = 64  # hidden units per kernel instance (Triton wants a power of 2)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def hidden_block(hidden: int) -> int:
    """The largest power of 2 that divides `hidden`, at most MAX_BLOCK (so no masking is needed)."""
    block = 1
    while block < MAX_BLOCK and hidden % (2 * block) == 0:
        block *= 2
    return block


def _compiler_params(block: int):
    if not on_gpu():
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=max(1, block // 32), num_stages=1)


def _call(kernel, arrays, outputs: int):
    """pallas_call of `kernel` over grid (batch, hidden blocks), each instance seeing [time, block]."""
    batch, steps, hidden = arrays[0].shape
    block = hidden_block(hidden)
    spec = pl.BlockSpec((None, steps, block), lambda row, column: (row, 0, column))
    shape = jax.ShapeDtypeStruct(arrays[0].shape, jnp.float32)
    return pl.pallas_call(
        functools.partial(kernel, steps=steps, block=block),
        out_shape=[shape] * outputs,
        grid=(batch, hidden // block),
        in_specs=[spec] * len(arrays),
        out_specs=[spec] * outputs,
        compiler_params=_compiler_params(block),
        interpret=not on_gpu(),
        name=kernel.__name__,
    )(*arrays)


def _forward_kernel(a_ref, b_ref, c_ref, *, steps, block):
    def step(t, state):
        state = a_ref[t, :] * state + b_ref[t, :]
        c_ref[t, :] = state
        return state

    jax.lax.fori_loop(0, steps, step, jnp.zeros((block,), jnp.float32))


def _adjoint_kernel(a_ref, c_ref, g_ref, da_ref, db_ref, *, steps, block):
    def step(i, carry):
        adjoint_after, decay_after = carry  # lam_{t+1}, a_{t+1} (zero after the last step)
        t = steps - 1 - i
        adjoint = decay_after * adjoint_after + g_ref[t, :]
        previous_state = jnp.where(t > 0, c_ref[jnp.maximum(t - 1, 0), :], 0.0)
        db_ref[t, :] = adjoint
        da_ref[t, :] = adjoint * previous_state
        return adjoint, a_ref[t, :]

    zeros = jnp.zeros((block,), jnp.float32)
    jax.lax.fori_loop(0, steps, step, (zeros, zeros))


@jax.custom_vjp
def _recurrence_f32(a, b):
    (states,) = _call(_forward_kernel, [a, b], outputs=1)
    return states


def _recurrence_forward(a, b):
    states = _recurrence_f32(a, b)
    return states, (a, states)


def _recurrence_backward(saved, upstream):
    a, states = saved
    da, db = _call(_adjoint_kernel, [a, states, upstream.astype(jnp.float32)], outputs=2)
    return da, db


_recurrence_f32.defvjp(_recurrence_forward, _recurrence_backward)


def linear_recurrence_pallas(a, b):
    """c_t = a_t * c_{t-1} + b_t over axis 1 in one fused kernel (float32 inside), with its adjoint as gradient."""
    dtype = jnp.result_type(a, b)
    states = _recurrence_f32(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return states.astype(dtype)


def lowering() -> str:
    return "triton (GPU)" if on_gpu() else "interpret mode (no GPU: the kernel run by XLA on the CPU)"
