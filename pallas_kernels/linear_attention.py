"""Linear attention over already-featurised queries and keys, beside its jnp reference.

Layout everywhere: ``(batch, heads, tokens, head_dim)``; q and k share ``head_dim``
(``d_k``), v may have its own (``d_v``); the output has v's shape and q's dtype.

Meaning (the reference, ``linear_attention_reference``), per batch and head,
with phi already applied by the caller (so DyDiLA's differential
``q_eff = phi(Q) - lambda_q phi(Q')`` goes straight in):

    non-causal:  S = sum_m k_m^T v_m  (d_k, d_v),   z = sum_m k_m  (d_k,)
                 o_n = q_n S / (q_n . z + eps)             normalize="denominator"
                 o_n = q_n S                               normalize="none"
    causal:      the sums run over m <= n only.

Kernels (Pallas) follow fla-org/flash-linear-attention ``fla/ops/linear_attn``:
the causal form is chunked (intra-chunk masked matmul plus a carried float32
state), every state and normaliser is accumulated in float32 whatever the
input dtype, and the backward pass is its own set of kernels under
``jax.custom_vjp``. Two drivers run the same per-chunk math:

* GPU (Triton lowering): one program per (batch*head) walks the chunks in an
  in-kernel loop for the sequential sweeps; purely token-parallel passes use a
  (batch*head, chunks) grid. Head dims are zero-padded to a power of two.
* TPU (Mosaic): a (batch*head, chunks) grid whose chunk axis is "arbitrary"
  (sequential) and carries the state in VMEM scratch; blocks are
  (chunk, full head_dim), which meets the (8, 128) rule for any head dim.

Tokens are zero-padded to a multiple of the chunk; padded keys/values add
nothing to the state, padded rows get denominator 1 so eps = 0 cannot make
NaNs there. ``impl="auto"`` picks the kernel for the platform the call is
lowered for (``lax.platform_dependent``) and the chunked jnp path on CPU.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

Normalize = Literal["none", "denominator"]
Impl = Literal["auto", "pallas", "xla"]
Variant = Literal["triton", "mosaic_tpu"]

F32 = jnp.float32


# --------------------------------------------------------------------------- reference


def linear_attention_reference(q, k, v, *, causal: bool = False, normalize: Normalize = "denominator",
                               eps: float = 1e-6):
    """Defining jnp implementation (float32 math; causal is the O(N^2) masked form).

    q, k: (batch, heads, tokens, d_k); v: (batch, heads, tokens, d_v) -> (batch, heads, tokens, d_v).
    """
    _check_args(q, k, v, normalize)
    qf, kf, vf = (x.astype(F32) for x in (q, k, v))
    hi = lax.Precision.HIGHEST
    if causal:
        n = q.shape[-2]
        scores = jnp.einsum("bhnd,bhmd->bhnm", qf, kf, precision=hi)
        scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, 0.0)
        num = jnp.einsum("bhnm,bhme->bhne", scores, vf, precision=hi)
        den = jnp.sum(scores, axis=-1, keepdims=True)
    else:
        state = jnp.einsum("bhnd,bhne->bhde", kf, vf, precision=hi)
        num = jnp.einsum("bhnd,bhde->bhne", qf, state, precision=hi)
        den = jnp.sum(qf * jnp.sum(kf, axis=-2, keepdims=True), axis=-1, keepdims=True)
    out = num / (den + eps) if normalize == "denominator" else num
    return out.astype(q.dtype)


def _check_args(q, k, v, normalize):
    if normalize not in ("none", "denominator"):
        raise ValueError(f"normalize must be 'none' or 'denominator', got {normalize!r}")
    if q.ndim != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError("expected q, k (batch, heads, tokens, d_k) and v (batch, heads, tokens, d_v); "
                         f"got {q.shape}, {k.shape}, {v.shape}")


def _linear_attention_xla(q, k, v, *, causal, normalize, eps, chunk=256):
    """O(N) jnp path: the non-causal sums directly, causal as a chunked scan with a float32 state."""
    if not causal:
        return linear_attention_reference(q, k, v, causal=False, normalize=normalize, eps=eps)
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    chunk = min(chunk, n)
    n_pad = -n % chunk
    pad = lambda x: jnp.pad(x.astype(F32), ((0, 0), (0, 0), (0, n_pad), (0, 0)))
    split = lambda x: jnp.moveaxis(x.reshape(b, h, -1, chunk, x.shape[-1]), 2, 0)
    qc, kc, vc = split(pad(q)), split(pad(k)), split(pad(v))
    mask = jnp.tril(jnp.ones((chunk, chunk), bool))
    hi = lax.Precision.HIGHEST

    def step(carry, xs):
        state, z = carry
        qi, ki, vi = xs
        scores = jnp.where(mask, jnp.einsum("bhnd,bhmd->bhnm", qi, ki, precision=hi), 0.0)
        num = jnp.einsum("bhnd,bhde->bhne", qi, state, precision=hi) + jnp.einsum(
            "bhnm,bhme->bhne", scores, vi, precision=hi)
        den = jnp.sum(qi * z, -1, keepdims=True) + jnp.sum(scores, -1, keepdims=True)
        state = state + jnp.einsum("bhnd,bhne->bhde", ki, vi, precision=hi)
        z = z + jnp.sum(ki, axis=-2, keepdims=True)
        return (state, z), (num, den)

    init = (jnp.zeros((b, h, dk, dv), F32), jnp.zeros((b, h, 1, dk), F32))
    _, (num, den) = lax.scan(step, init, (qc, kc, vc))
    num = jnp.moveaxis(num, 0, 2).reshape(b, h, -1, dv)[:, :, :n]
    den = jnp.moveaxis(den, 0, 2).reshape(b, h, -1, 1)[:, :, :n]
    out = num / (den + eps) if normalize == "denominator" else num
    return out.astype(q.dtype)


# --------------------------------------------------------------------------- per-chunk math
# Shared by both drivers. Token arrays are (chunk, dim); states are float32
# S (d_k, d_v) and z (1, d_k). Matmul operands stay in the input dtype with
# float32 accumulation (fla's choice); for float32 inputs they run at HIGHEST.


def _dot(a, b, dims, dtype):
    precision = lax.Precision.HIGHEST if dtype == F32 else lax.Precision.DEFAULT
    return lax.dot_general(a.astype(dtype), b.astype(dtype), (dims, ((), ())),
                           precision=precision, preferred_element_type=F32)


def _mm(a, b, dtype):  # a @ b
    return _dot(a, b, ((1,), (0,)), dtype)


def _mm_nt(a, b, dtype):  # a @ b^T
    return _dot(a, b, ((1,), (1,)), dtype)


def _mm_tn(a, b, dtype):  # a^T @ b
    return _dot(a, b, ((0,), (0,)), dtype)


def _rows(start, chunk):
    return start + lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)


def _causal_mask(chunk):
    return lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >= lax.broadcasted_iota(
        jnp.int32, (chunk, chunk), 1)


def _den(raw, start, chunk, n_valid, eps):
    """raw + eps, with padded rows (index >= n_valid) set to 1 so they stay finite."""
    return jnp.where(_rows(start, chunk) < n_valid, raw + eps, 1.0)


def _grad_num_den(do, o, den, normalize):
    """Cotangents of num and den from o = num / den: (dnum (chunk, d_v), dden (chunk, 1))."""
    do = do.astype(F32)
    if normalize == "none":
        return do, None
    return do / den, -jnp.sum(do * o.astype(F32), axis=-1, keepdims=True) / den


def _fwd_chunk(cfg, start, tok, const, state):
    """Causal forward chunk, or the non-causal output pass (state given as const)."""
    q, k, v = tok
    dt = q.dtype
    chunk = q.shape[0]
    qf = q.astype(F32)
    if cfg["causal"]:
        s, z = state
        scores = jnp.where(_causal_mask(chunk), _mm_nt(q, k, dt), 0.0)
        num = _mm(q, s, dt) + _mm(scores, v, dt)
        raw = jnp.sum(qf * z, -1, keepdims=True) + jnp.sum(scores, -1, keepdims=True)
        new_state = (s + _mm_tn(k, v, dt), z + jnp.sum(k.astype(F32), 0, keepdims=True))
    else:
        s, z = const
        num = _mm(q, s, dt)
        raw = jnp.sum(qf * z, -1, keepdims=True)
        new_state = ()
    den = _den(raw, start, chunk, cfg["n_valid"], cfg["eps"])
    out = num / den if cfg["normalize"] == "denominator" else num
    return (out.astype(cfg["out_dtype"]), den), new_state


def _kv_state_chunk(cfg, start, tok, const, state):
    """Non-causal reduction: S += k^T v, z += sum k."""
    k, v = tok
    s, z = state
    return (), (s + _mm_tn(k, v, k.dtype), z + jnp.sum(k.astype(F32), 0, keepdims=True))


def _bwd_q_chunk(cfg, start, tok, const, state):
    """dq per chunk. Non-causal: also reduces dS = q^T dnum, dz = q^T dden over tokens.
    Causal: forward sweep re-building S, z (the intra-chunk part of dq needs k, v)."""
    dt = tok[0].dtype
    if cfg["causal"]:
        q, k, v, do, o, den = tok
        s, z = state
    else:
        q, do, o, den = tok
        s, z = const
    dnum, dden = _grad_num_den(do, o, den, cfg["normalize"])
    dq = _mm_nt(dnum, s, dt)
    if dden is not None:
        dq = dq + dden * z
    if cfg["causal"]:
        chunk = q.shape[0]
        dscores = _mm_nt(dnum, v, dt)
        if dden is not None:
            dscores = dscores + dden
        dscores = jnp.where(_causal_mask(chunk), dscores, 0.0)
        dq = dq + _mm(dscores, k, dt)
        new_state = (s + _mm_tn(k, v, dt), z + jnp.sum(k.astype(F32), 0, keepdims=True))
    else:
        ds, dz = state
        new_state = (ds + _mm_tn(q, dnum, dt),
                     dz if dden is None else dz + jnp.sum(q.astype(F32) * dden, 0, keepdims=True))
    return (dq.astype(cfg["q_dtype"]),), new_state


def _bwd_kv_chunk(cfg, start, tok, const, state):
    """dk, dv per chunk. Causal: reverse sweep carrying dS, dz of the later chunks."""
    q, k, v, do, o, den = tok
    dt = q.dtype
    if cfg["causal"]:
        ds, dz = state
    else:
        ds, dz = const
    dk = _mm_nt(v, ds, dt) + dz
    dv = _mm(k, ds, dt)
    new_state = ()
    if cfg["causal"]:
        chunk = q.shape[0]
        dnum, dden = _grad_num_den(do, o, den, cfg["normalize"])
        mask = _causal_mask(chunk)
        scores = jnp.where(mask, _mm_nt(q, k, dt), 0.0)
        dscores = _mm_nt(dnum, v, dt)
        if dden is not None:
            dscores = dscores + dden
        dscores = jnp.where(mask, dscores, 0.0)
        dk = dk + _mm_tn(dscores, q, dt)
        dv = dv + _mm_tn(scores, dnum, dt)
        new_state = (ds + _mm_tn(q, dnum, dt),
                     dz if dden is None else dz + jnp.sum(q.astype(F32) * dden, 0, keepdims=True))
    return (dk.astype(cfg["k_dtype"]), dv.astype(cfg["v_dtype"])), new_state


# --------------------------------------------------------------------------- drivers


def _drive(body: Callable, cfg: dict, *, tokens: Sequence[jax.Array], consts: Sequence[jax.Array],
           token_outs: Sequence[tuple[int, jnp.dtype]], state_shapes: Sequence[tuple[int, int]],
           reverse: bool = False):
    """Run ``body`` over chunks of every (batch*head) row.

    tokens: (bh, tokens_padded, dim) arrays split into (chunk, dim) blocks; consts:
    (bh, r, c) arrays given whole; token_outs: (dim, dtype) of each per-token output;
    state_shapes: float32 states carried from chunk to chunk (empty: chunks are
    independent and run in parallel). Returns the per-token outputs, then the final states.
    """
    variant, interpret, chunk = cfg["variant"], cfg["interpret"], cfg["chunk"]
    bh, n_pad = tokens[0].shape[:2]
    n_chunks = n_pad // chunk
    n_tok, n_const, n_tout = len(tokens), len(consts), len(token_outs)
    out_shape = [jax.ShapeDtypeStruct((bh, n_pad, d), dt) for d, dt in token_outs]
    out_shape += [jax.ShapeDtypeStruct((bh,) + tuple(s), F32) for s in state_shapes]
    const_specs = [pl.BlockSpec((None,) + c.shape[1:], lambda i, j: (i, 0, 0)) for c in consts]
    state_specs = [pl.BlockSpec((None,) + tuple(s), lambda i, j: (i, 0, 0)) for s in state_shapes]
    sequential = bool(state_shapes)
    name = getattr(body, "__name__", "chunk").strip("_")

    def chunk_index(j):
        return n_chunks - 1 - j if reverse else j

    def split_refs(refs):
        tok = refs[:n_tok]
        const = refs[n_tok:n_tok + n_const]
        touts = refs[n_tok + n_const:n_tok + n_const + n_tout]
        rest = refs[n_tok + n_const + n_tout:]
        return tok, const, touts, rest

    if variant == "triton" and sequential:
        # One program per row; the chunk loop runs inside, state in registers.
        def kernel(*refs):
            tok, const, touts, souts = split_refs(refs)
            const_vals = tuple(r[...] for r in const)

            def step(j, state):
                start = pl.multiple_of(chunk_index(j) * chunk, chunk)
                vals = tuple(r[pl.ds(start, chunk), :] for r in tok)
                outs, state = body(cfg, start, vals, const_vals, state)
                for r, o in zip(touts, outs):
                    r[pl.ds(start, chunk), :] = o
                return state

            init = tuple(jnp.zeros(s, F32) for s in state_shapes)
            final = lax.fori_loop(0, n_chunks, step, init)
            for r, s in zip(souts, final):
                r[...] = s

        spec_full = lambda d: pl.BlockSpec((None, n_pad, d), lambda i: (i, 0, 0))
        return pl.pallas_call(
            kernel, grid=(bh,), out_shape=out_shape,
            in_specs=[spec_full(t.shape[-1]) for t in tokens]
            + [pl.BlockSpec((None,) + c.shape[1:], lambda i: (i, 0, 0)) for c in consts],
            out_specs=[spec_full(d) for d, _ in token_outs]
            + [pl.BlockSpec((None,) + tuple(s), lambda i: (i, 0, 0)) for s in state_shapes],
            compiler_params=None if interpret else pltriton.CompilerParams(
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
            interpret=interpret, name=f"linear_attention_{name}",
        )(*tokens, *consts)

    tok_spec = lambda d: pl.BlockSpec((None, chunk, d), lambda i, j: (i, chunk_index(j), 0))
    in_specs = [tok_spec(t.shape[-1]) for t in tokens] + const_specs
    out_specs = [tok_spec(d) for d, _ in token_outs] + state_specs

    if variant == "triton":
        # Token-parallel pass: every (row, chunk) is its own program.
        def kernel(*refs):
            tok, const, touts, _ = split_refs(refs)
            j = pl.program_id(1)
            start = chunk_index(j) * chunk
            outs, _ = body(cfg, start, tuple(r[...] for r in tok), tuple(r[...] for r in const), ())
            for r, o in zip(touts, outs):
                r[...] = o

        return pl.pallas_call(
            kernel, grid=(bh, n_chunks), out_shape=out_shape, in_specs=in_specs,
            out_specs=out_specs,
            compiler_params=None if interpret else pltriton.CompilerParams(
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]),
            interpret=interpret, name=f"linear_attention_{name}",
        )(*tokens, *consts)

    # Mosaic TPU: chunk axis sequential ("arbitrary") when a state is carried, in VMEM scratch.
    def kernel(*refs):
        tok, const, touts, rest = split_refs(refs)
        souts, scratch = rest[:len(state_shapes)], rest[len(state_shapes):]
        j = pl.program_id(1)
        start = chunk_index(j) * chunk

        if sequential:
            @pl.when(j == 0)
            def _init():
                for s in scratch:
                    s[...] = jnp.zeros(s.shape, F32)

        state = tuple(s[...] for s in scratch)
        outs, state = body(cfg, start, tuple(r[...] for r in tok), tuple(r[...] for r in const), state)
        for r, o in zip(touts, outs):
            r[...] = o
        if sequential:
            for s, new in zip(scratch, state):
                s[...] = new

            @pl.when(j == n_chunks - 1)
            def _write_state():
                for r, s in zip(souts, scratch):
                    r[...] = s[...]

    semantics = ("parallel", "arbitrary" if sequential else "parallel")
    return pl.pallas_call(
        kernel, grid=(bh, n_chunks), out_shape=out_shape, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM(tuple(s), F32) for s in state_shapes],
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"linear_attention_{name}",
    )(*tokens, *consts)


# --------------------------------------------------------------------------- kernels + custom_vjp


def _prepare(q, k, v, cfg):
    """(batch, heads, tokens, d) -> (bh, tokens_padded, d_padded) for the kernels."""
    b, h, n, dk = q.shape
    dv = v.shape[-1]
    chunk = cfg["chunk"]
    n_pad = -n % chunk
    if cfg["variant"] == "triton":  # Triton blocks need power-of-two sizes (at least 16 for dots).
        dk_p, dv_p = max(16, pl.next_power_of_2(dk)), max(16, pl.next_power_of_2(dv))
    else:
        dk_p, dv_p = dk, dv

    def flat(x, d_p):
        x = x.reshape(b * h, n, x.shape[-1])
        return jnp.pad(x, ((0, 0), (0, n_pad), (0, d_p - x.shape[-1])))

    return flat(q, dk_p), flat(k, dk_p), flat(v, dv_p)


def _unflat(x, shape):
    b, h, n, d = shape
    return x[:, :n, :d].reshape(b, h, n, d)


def _forward(cfg, q, k, v):
    qp, kp, vp = _prepare(q, k, v, cfg)
    dk_p, dv_p = qp.shape[-1], vp.shape[-1]
    states = [(dk_p, dv_p), (1, dk_p)]
    if cfg["causal"]:
        o, den, _, _ = _drive(_fwd_chunk, cfg, tokens=[qp, kp, vp], consts=[],
                              token_outs=[(dv_p, cfg["out_dtype"]), (1, F32)], state_shapes=states)
        kv_state = ()
    else:
        s, z = _drive(_kv_state_chunk, cfg, tokens=[kp, vp], consts=[], token_outs=[],
                      state_shapes=states)
        o, den = _drive(_fwd_chunk, cfg, tokens=[qp, kp, vp], consts=[s, z],
                        token_outs=[(dv_p, cfg["out_dtype"]), (1, F32)], state_shapes=[])
        kv_state = (s, z)
    return o, den, kv_state


def _backward(cfg, q, k, v, o, den, kv_state, do_p):
    qp, kp, vp = _prepare(q, k, v, cfg)
    dk_p, dv_p = qp.shape[-1], vp.shape[-1]
    states = [(dk_p, dv_p), (1, dk_p)]
    if cfg["causal"]:
        (dq,) = _drive(_bwd_q_chunk, cfg, tokens=[qp, kp, vp, do_p, o, den], consts=[],
                       token_outs=[(dk_p, cfg["q_dtype"])], state_shapes=states)[:1]
        dk, dv = _drive(_bwd_kv_chunk, cfg, tokens=[qp, kp, vp, do_p, o, den], consts=[],
                        token_outs=[(dk_p, cfg["k_dtype"]), (dv_p, cfg["v_dtype"])],
                        state_shapes=states, reverse=True)[:2]
    else:
        dq, ds, dz = _drive(_bwd_q_chunk, cfg, tokens=[qp, do_p, o, den], consts=list(kv_state),
                            token_outs=[(dk_p, cfg["q_dtype"])], state_shapes=states)
        dk, dv = _drive(_bwd_kv_chunk, cfg, tokens=[qp, kp, vp, do_p, o, den], consts=[ds, dz],
                        token_outs=[(dk_p, cfg["k_dtype"]), (dv_p, cfg["v_dtype"])], state_shapes=[])
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_linear_attention(cfg_items, q, k, v):
    cfg = dict(cfg_items)
    o, _, _ = _forward(cfg, q, k, v)
    return _unflat(o, v.shape)


def _pallas_fwd(cfg_items, q, k, v):
    cfg = dict(cfg_items)
    o, den, kv_state = _forward(cfg, q, k, v)
    return _unflat(o, v.shape), (q, k, v, o, den, kv_state)


def _pallas_bwd(cfg_items, residuals, d_out):
    cfg = dict(cfg_items)
    q, k, v, o, den, kv_state = residuals
    b, h, n, _ = v.shape
    do_p = jnp.pad(d_out.reshape(b * h, n, -1).astype(o.dtype),
                   ((0, 0), (0, o.shape[1] - n), (0, o.shape[2] - d_out.shape[-1])))
    dq, dk, dv = _backward(cfg, q, k, v, o, den, kv_state, do_p)
    return _unflat(dq, q.shape), _unflat(dk, k.shape), _unflat(dv, v.shape)


_pallas_linear_attention.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas_call_for(variant: Variant, interpret: bool, q, k, v, *, causal, normalize, eps, chunk):
    if chunk is None:
        chunk = 64 if variant == "triton" else 128
    if variant == "triton" and (chunk < 16 or chunk & (chunk - 1)):
        raise ValueError(f"Triton chunk must be a power of two >= 16, got {chunk}")
    if variant == "mosaic_tpu" and chunk % 8:
        raise ValueError(f"TPU chunk must be a multiple of 8, got {chunk}")
    n = q.shape[-2]
    if not interpret or variant == "mosaic_tpu":
        chunk = min(chunk, max(8 if variant == "mosaic_tpu" else 16, _round_up(n, 8)))
    wide = max(q.shape[-1], v.shape[-1]) > 64
    cfg = dict(causal=causal, normalize=normalize, eps=float(eps), chunk=chunk, n_valid=n,
               variant=variant, interpret=interpret, out_dtype=q.dtype, q_dtype=q.dtype,
               k_dtype=k.dtype, v_dtype=v.dtype, num_warps=8 if wide else 4, num_stages=2)
    # dtypes are hashable; a sorted tuple makes the config a static custom_vjp argument.
    return _pallas_linear_attention(tuple(sorted(cfg.items(), key=lambda kv: kv[0])), q, k, v)


def _round_up(x, m):
    return -(-x // m) * m


# --------------------------------------------------------------------------- public function


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
                     normalize: Normalize = "denominator", eps: float = 1e-6, impl: Impl = "auto",
                     chunk: int | None = None, pallas_variant: Variant | None = None) -> jax.Array:
    """Linear attention ``o = phi_q S / (phi_q z + eps)`` over featurised q, k (see module doc).

    Args:
      q, k: (batch, heads, tokens, d_k), already through the feature map (non-negative
        for the usual kernels; DyDiLA's differential features may be signed).
      v: (batch, heads, tokens, d_v).
      causal: token n attends to tokens 0..n (chunked kernel with a carried state).
      normalize: "denominator" divides by ``q . z + eps``; "none" returns ``q S``.
      eps: added to the denominator.
      impl: "auto" (Pallas kernel when lowered for GPU/TPU, chunked jnp on CPU),
        "pallas" (kernel everywhere; interpret mode on CPU), "xla" (jnp path).
      chunk: tokens per kernel block (default 64 on GPU, 128 on TPU).
      pallas_variant: force the "triton" or "mosaic_tpu" kernel whatever the platform
        (testing both drivers on CPU in interpret mode, or lowering checks).
    Returns:
      (batch, heads, tokens, d_v) in q's dtype.
    """
    _check_args(q, k, v, normalize)
    if impl not in ("auto", "pallas", "xla"):
        raise ValueError(f"impl must be 'auto', 'pallas' or 'xla', got {impl!r}")
    xla = functools.partial(_linear_attention_xla, causal=causal, normalize=normalize, eps=eps)
    if impl == "xla":
        return xla(q, k, v)
    kernel = functools.partial(_pallas_call_for, causal=causal, normalize=normalize, eps=eps,
                               chunk=chunk)
    if pallas_variant is not None:
        return lax.platform_dependent(
            q, k, v,
            cpu=functools.partial(kernel, pallas_variant, True),
            default=functools.partial(kernel, pallas_variant, False))
    return lax.platform_dependent(
        q, k, v,
        cuda=functools.partial(kernel, "triton", False),
        rocm=functools.partial(kernel, "triton", False),
        tpu=functools.partial(kernel, "mosaic_tpu", False),
        default=functools.partial(kernel, "triton", True) if impl == "pallas" else xla)
