"""xAR (Ren et al., "Beyond Next-Token: Next-X Prediction for Autoregressive Visual Generation").

An autoregressive model over *entities* X of an image (token, k x k cell,
subsample, scale, whole image) whose every step is a flow-matching regressor:
given the entities before it, a transformer predicts the velocity of the next
one. Network as upstream OliverRensu/xAR ``models/xar.py``: z_proj + learned
positions -> RMSNorm -> "encoder" blocks -> RMSNorm -> Linear + second learned
positions -> "decoder" blocks -> RMSNorm -> Linear; blocks are RMSNorm,
attention with 2-D RoPE (``models/rope.py``), a GELU-gated MLP and VAR-style
adaLN whose condition (class + time) is one vector per entity.

Noisy Context Learning (paper Sec. 3.3): every entity gets its own time
t ~ logit-normal(0, 1); z = (1 - t) x + t eps; the target is v = eps - x; all
entities are supervised in one pass under the entity-causal mask, so each
entity is predicted from *noisy* context rather than teacher-forced clean one.

Sampling (``models/sampler.py``): entity by entity from t = 1 (noise) to 0,
Euler-Maruyama (or an Euler/Heun ODE), classifier-free guidance on the drift
with a scale ramped linearly over entities; finished entities enter the
context at t = 0 and their keys/values are cached.

Layouts: images (batch, height, width, channels); a grid is (batch, G, G, token
channels) after patchify; a token sequence is (batch, tokens, channels) in the
layout's entity-major order (for upstream's 4 cells of 8x8: token 64c + 8p + q
is pixel (p, q) of cell c, cells row-major).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from trainers.method import Method, check_data_shape

ENTITIES = ("token", "cell", "subsample", "scale", "image")
SAMPLERS = ("euler_maruyama", "euler", "heun")
# Guidance over the entities: "linear" ramps 1 -> cfg (upstream sample_tokens: the first entity unguided),
# "constant" guides every entity at cfg (an implementation choice, config.sample.cfg_schedule).
CFG_SCHEDULES = ("linear", "constant")
# What the network's output is (config.model.prediction): "v" the velocity eps - x (upstream), or "x" the
# clean tokens, turned into the velocity (z - x) / max(t, PREDICTION_T_MIN) for the same loss and samplers
# (JiT, Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"; an implementation choice
# for pixel-space tokens, whose clean values lie on a low-dimensional manifold of the token space).
PREDICTIONS = ("v", "x")
PREDICTION_T_MIN = 0.05


# ----------------------------------------------------------------------------- the entity X
class Layout:
    """Which tokens form each entity X, and in which order they are generated.

    A layout is a list of *levels* (a resolution r dividing the grid G; the grid
    is area-averaged to r x r there) whose tokens are taken in a given order and
    labelled with entity ids. token / cell / subsample / image are one level
    (r = G) in different orders; scale has one level per resolution. Every
    variant is then the same thing: a token sequence, an entity id per token
    (non-decreasing), a 2-D position per token (for RoPE), and the mask
    "query entity >= key entity".
    """

    def __init__(self, grid: int, levels: list[tuple[int, np.ndarray, np.ndarray]]):
        if levels[-1][0] != grid:
            raise ValueError(f"the last level must be the full {grid}x{grid} grid (it is what is decoded)")
        self.grid = grid
        self.levels = [(r, np.asarray(order), np.asarray(ids)) for r, order, ids in levels]
        self.entity_of_token = np.concatenate([ids for _, _, ids in self.levels]).astype(np.int32)
        if np.any(np.diff(self.entity_of_token) < 0) or self.entity_of_token[0] != 0:
            raise ValueError("entity ids must start at 0 and be non-decreasing along the sequence")
        self.num_tokens = len(self.entity_of_token)
        self.num_entities = int(self.entity_of_token[-1]) + 1
        self.entity_sizes = np.bincount(self.entity_of_token, minlength=self.num_entities)
        self.entity_start = np.concatenate([[0], np.cumsum(self.entity_sizes)[:-1]]).astype(np.int32)
        positions = []
        for r, order, _ in self.levels:
            i, j = np.divmod(order, r)
            cell = grid / r  # centre of the pooled r x r cell, in full-grid units (= (i, j) at r = G)
            positions.append(np.stack([(i + 0.5) * cell - 0.5, (j + 0.5) * cell - 0.5], axis=-1))
        self.positions = np.concatenate(positions).astype(np.float32)
        self._inverse_last = np.argsort(self.levels[-1][1])
        self._rope: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """(first entity, number of entities, entity size) of each run of equal-size entities."""
        runs: list[list[int]] = []
        for e, size in enumerate(self.entity_sizes):
            if runs and runs[-1][2] == size:
                runs[-1][1] += 1
            else:
                runs.append([e, 1, int(size)])
        return [tuple(r) for r in runs]

    def rope(self, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(N, head_dim) cos and sin of the 2-D RoPE at this layout's token positions (cached)."""
        if head_dim not in self._rope:
            self._rope[head_dim] = rope_tables(self.positions, head_dim)
        return self._rope[head_dim]

    def mask(self) -> np.ndarray:
        """(N, N) bool: query token may attend key token (entity-causal, bidirectional inside an entity)."""
        e = self.entity_of_token
        return e[:, None] >= e[None, :]

    def encode(self, grid_tokens: jax.Array) -> jax.Array:
        """(B, G, G, C) -> (B, N, C) token sequence in generation order."""
        b, g, _, c = grid_tokens.shape
        out = []
        for r, order, _ in self.levels:
            pooled = grid_tokens.reshape(b, r, g // r, r, g // r, c).mean(axis=(2, 4)) if r != g else grid_tokens
            out.append(jnp.take(pooled.reshape(b, r * r, c), jnp.asarray(order), axis=1))
        return jnp.concatenate(out, axis=1)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """(B, N, C) -> (B, G, G, C) from the full-resolution (last) level."""
        b, _, c = tokens.shape
        last = tokens[:, self.num_tokens - self.grid ** 2:]
        return jnp.take(last, jnp.asarray(self._inverse_last), axis=1).reshape(b, self.grid, self.grid, c)


def _cells(grid: int, k: int):
    """Order and entity ids of k x k cells, cells row-major, tokens row-major inside a cell."""
    n = grid // k
    a, b, p, q = np.meshgrid(np.arange(n), np.arange(n), np.arange(k), np.arange(k), indexing="ij")
    order = ((a * k + p) * grid + b * k + q).reshape(-1)
    return order, (a * n + b).reshape(-1)


def _subsamples(grid: int, s: int):
    """Order and ids of the s*s subsamples: entity (a, b) holds tokens (p*s + a, q*s + b), i.e. every s-th."""
    n = grid // s
    a, b, p, q = np.meshgrid(np.arange(s), np.arange(s), np.arange(n), np.arange(n), indexing="ij")
    order = ((p * s + a) * grid + q * s + b).reshape(-1)
    return order, (a * s + b).reshape(-1)


def make_layout(entity: str, grid: int, *, cell_size: int = 8, subsample_stride: int = 2,
                scales: tuple[int, ...] = ()) -> Layout:
    """The layout of one prediction entity X of the paper on a G x G token grid."""
    if entity == "token":
        return Layout(grid, [(grid, *_cells(grid, 1))])
    if entity == "cell":
        if grid % cell_size:
            raise ValueError(f"cell_size={cell_size} does not divide the {grid}x{grid} token grid")
        return Layout(grid, [(grid, *_cells(grid, cell_size))])
    if entity == "subsample":
        if grid % subsample_stride:
            raise ValueError(f"subsample_stride={subsample_stride} does not divide the {grid}x{grid} token grid")
        return Layout(grid, [(grid, *_subsamples(grid, subsample_stride))])
    if entity == "scale":
        scales = tuple(scales)
        if not scales or scales[-1] != grid or any(grid % r for r in scales) or list(scales) != sorted(set(scales)):
            raise ValueError(f"scales={scales} must increase, divide the grid and end at the grid size {grid}")
        return Layout(grid, [(r, np.arange(r * r), np.full(r * r, i)) for i, r in enumerate(scales)])
    if entity == "image":
        return Layout(grid, [(grid, *_cells(grid, grid))])
    raise ValueError(f"entity={entity!r}: must be one of {ENTITIES}")


# ----------------------------------------------------------------------------- building blocks used only here
def rope_tables(positions: np.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """EVA-02 2-D RoPE (upstream models/rope.py): (N, head_dim) cos and sin for (N, 2) positions.

    Half of head_dim per axis (first half the row, second the column); each
    frequency 1/theta^(2i/(hd/2)) is repeated for an interleaved channel pair.
    """
    half = head_dim // 2
    freqs = 1.0 / theta ** (np.arange(0, half, 2)[: half // 2].astype(np.float32) / half)
    angles = [np.repeat(positions[:, axis, None] * freqs[None], 2, axis=-1) for axis in (0, 1)]
    angles = np.concatenate(angles, axis=-1).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin with the interleaved rotate_half (x0, x1) -> (-x1, x0)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


class GatedMlp(nnx.Module):
    """timm SwiGLU as upstream instantiates it: fc2(GELU(fc1_g(x)) * fc1_x(x)), exact-erf GELU."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype):
        self.fc1_g = layers.dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc1_x = layers.dense(dim, hidden, ("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.fc2 = layers.dense(hidden, dim, ("mlp", "embed"), rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, rate: float = 0.0, rng: jax.Array | None = None) -> jax.Array:
        """``rate``: dropout after the gate product (timm SwiGLU drop1); fc2's dropout is the caller's."""
        gate, value = layers.dense_group(x, self.fc1_g, self.fc1_x)
        return self.fc2(dropout(layers.gelu(gate, approximate=False) * value, rate, rng))


# RMSNorm with a learned weight (upstream z_proj_ln, encoder_norm, decoder_norm), eps 1e-6.
WeightedRMSNorm = layers.RMSNorm


dropout = layers.dropout  # inverted dropout; the identity without an rng (evaluation)


def rows_of_entities(values: jax.Array, row_entity) -> jax.Array:
    """values (B, e, ...) one row per entity -> (B, n, ...) with row i = values[:, row_entity[i]].

    A static non-decreasing ``row_entity`` (every training call, the sampler's cached calls) is a few
    broadcasts, one per run of consecutive equal-sized entities, instead of a gather (on XLA:CPU the gather
    of the adaLN rows and its scatter-add gradient took ~12% of an xAR train step); the values are the same.
    A traced or unsorted one is a gather.
    """
    if isinstance(row_entity, np.ndarray) and row_entity.ndim == 1 and row_entity.size:
        ids, sizes = np.unique(row_entity, return_counts=True)
        if np.all(np.diff(row_entity) >= 0) and np.all(np.diff(ids) == 1):
            starts = np.flatnonzero(np.diff(sizes, prepend=-1) != 0)  # runs of equal entity sizes
            if len(starts) <= 16:
                b, rest = values.shape[0], values.shape[2:]
                pieces = []
                for lo, hi in zip(starts, [*starts[1:], len(ids)]):
                    first, k, s = int(ids[lo]), int(hi - lo), int(sizes[lo])
                    run = jax.lax.slice_in_dim(values, first, first + k, axis=1)[:, :, None]
                    pieces.append(jnp.broadcast_to(run, (b, k, s, *rest)).reshape(b, k * s, *rest))
                return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    return jnp.take(values, jnp.asarray(row_entity), axis=1)


class Block(nnx.Module):
    """RMSNorm -> modulated attention / GELU-gated MLP, each scaled by its own gamma (upstream Block)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype,
                 attention_impl: str = "xla"):
        self.attn = layers.Attention(dim, num_heads, rngs=rngs, dtype=dtype, attention_impl=attention_impl)
        self.mlp = GatedMlp(dim, int(dim * mlp_ratio * 2 / 3), rngs=rngs, dtype=dtype)
        # VAR-style adaLN, not zero-initialised (upstream initialises every Linear xavier-uniform).
        self.ada_lin = layers.dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)

    def __call__(self, x, cond, row_entity, *, mask, rope, kv_cache=None, kv_valid=None, return_kv=False,
                 attn_dropout=0.0, proj_dropout=0.0, dropout_rng=None):
        """x (B, n, D); cond (B, e, D) one row per entity; row_entity (n,) which row each token uses.

        Dropout as upstream training (main_mar.py: attn_dropout = proj_dropout = 0.1): on the attention
        weights, after the attention projection, after the MLP's gate product and after its fc2.
        """
        rngs = [None] * 4 if dropout_rng is None else list(jax.random.split(dropout_rng, 4))
        ada = rows_of_entities(self.ada_lin(nnx.silu(cond)), row_entity)  # per entity, then broadcast
        gamma1, gamma2, scale1, scale2, shift1, shift2 = jnp.split(ada.astype(x.dtype), 6, axis=-1)
        attn = self.attn(layers.rms_norm(x) * (1 + scale1) + shift1, mask=mask, rope=rope, kv_cache=kv_cache,
                         kv_valid=kv_valid,
                         return_kv=return_kv, dropout_rate=attn_dropout, dropout_rng=rngs[0])
        attn, new_kv = attn if return_kv else (attn, None)
        x = x + dropout(attn, proj_dropout, rngs[1]) * gamma1
        mlp = self.mlp(layers.rms_norm(x) * (1 + scale2) + shift2, proj_dropout, rngs[2])
        x = x + dropout(mlp, proj_dropout, rngs[3]) * gamma2
        return x, new_kv


# ----------------------------------------------------------------------------- the network
class XARNet(nnx.Module):
    """(noisy tokens (B, n, C), entity times (B, e), labels (B,)) -> velocity (B, n, C)."""

    def __init__(self, *, layout: Layout, token_dim: int, hidden_size: int, encoder_depth: int,
                 decoder_depth: int, num_heads: int, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 class_dropout_prob: float = 0.1, attn_dropout: float = 0.0, proj_dropout: float = 0.0,
                 rngs: nnx.Rngs, dtype=jnp.float32, attention_impl: str = "xla", prediction: str = "v",
                 remat: bool = False):
        head_dim = hidden_size // num_heads
        if hidden_size % num_heads or head_dim % 4:
            raise ValueError(f"hidden_size={hidden_size} / num_heads={num_heads} must give a head dim divisible "
                             "by 4 (2-D RoPE rotates channel pairs on two axes)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r}: must be one of {PREDICTIONS}")
        self.prediction = prediction
        self.remat = remat  # training: recompute each block in the backward pass (memory: benchmarks/pod_plan.py)
        self.layout = layout
        self.token_dim = token_dim
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.attn_dropout, self.proj_dropout = attn_dropout, proj_dropout
        n = layout.num_tokens
        self.class_emb = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        self.time_embed = layers.TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)
        for lin in (self.time_embed.linear_1, self.time_embed.linear_2):  # upstream: xavier for every Linear
            lin.kernel.set_value(layers.xavier_uniform(rngs.params(), lin.kernel.shape))
        self.z_proj = layers.dense(token_dim, hidden_size, ("channels", "embed"), rngs=rngs, dtype=dtype)
        self.z_proj_ln = WeightedRMSNorm(hidden_size)
        pos_init = nnx.initializers.normal(0.02)
        self.encoder_pos_embed = nnx.Param(pos_init(rngs.params(), (n, hidden_size)),
                                           out_sharding=("position", "embed"))
        self.encoder_blocks = nnx.List([Block(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                                              attention_impl=attention_impl) for _ in range(encoder_depth)])
        self.encoder_norm = WeightedRMSNorm(hidden_size)
        self.decoder_embed = layers.dense(hidden_size, hidden_size, ("embed", "embed"), rngs=rngs, dtype=dtype)
        self.decoder_pos_embed = nnx.Param(pos_init(rngs.params(), (n, hidden_size)),
                                           out_sharding=("position", "embed"))
        self.decoder_blocks = nnx.List([Block(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype,
                                              attention_impl=attention_impl) for _ in range(decoder_depth)])
        self.decoder_norm = WeightedRMSNorm(hidden_size)
        self.pred = layers.dense(hidden_size, token_dim, ("embed", "channels"), rngs=rngs, dtype=dtype)
        self.head_dim = head_dim

    @property
    def blocks(self):
        return list(self.encoder_blocks) + list(self.decoder_blocks)

    def condition(self, t: jax.Array, labels: jax.Array) -> jax.Array:
        """(B, e, D): class embedding + embedding of the integer time floor(1000 t) (upstream's ``.long()``)."""
        b, e = t.shape
        time = self.time_embed(jnp.floor(t.astype(jnp.float32).reshape(-1) * 1000.0)).reshape(b, e, -1)
        return self.class_emb(labels)[:, None] + time

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array, *, token_index=None, row_entity=None,
                 kv_cache=None, kv_valid=None, return_kv: bool = False, dropout_rng=None):
        """Velocity for the tokens ``x`` at sequence positions ``token_index``.

        x (B, n, C); t (B, e): the time of each of the e entities present; labels (B,) int.
        token_index (n,): sequence positions of the rows (default: the whole sequence).
        row_entity (n,): index into t's e entities for each row (default: the layout's entity ids).
        kv_cache: one (k, v) of (B, H, m, head_dim) per block (encoder then decoder) of earlier tokens;
        kv_valid (m,) bool marks the cache slots that hold tokens (all when None).
        dropout_rng: training only; enables the model's dropout.
        Returns (B, n, C) and, with return_kv, the (k, v) of this call's tokens per block.
        """
        from trainers.sharding import constrain

        layout = self.layout
        if token_index is None:
            token_index = np.arange(layout.num_tokens)
            row_entity = layout.entity_of_token
        # The mask stays static (numpy) wherever it can, so a fused kernel (attention_impl="pallas") compiles
        # its block sparsity in; a KV cache's filled slots are the traced per-key ``kv_valid``.
        if isinstance(token_index, np.ndarray):
            entity = layout.entity_of_token[token_index]
        elif isinstance(row_entity, np.ndarray):  # a cached call: its rows' entities are ordered as row_entity
            entity = row_entity
        else:
            entity = jnp.take(jnp.asarray(layout.entity_of_token), jnp.asarray(token_index))
        mask = entity[:, None] >= entity[None, :]
        all_valid = None
        if kv_cache is not None:
            m = kv_cache[0][0].shape[2]
            xp = np if isinstance(mask, np.ndarray) else jnp
            mask = xp.concatenate([xp.ones((mask.shape[0], m), bool), mask], axis=1)
            if kv_valid is not None:
                all_valid = jnp.concatenate([jnp.asarray(kv_valid, bool), jnp.ones((mask.shape[0],), bool)])
        cos, sin = (jnp.take(jnp.asarray(table), jnp.asarray(token_index), axis=0)
                    for table in layout.rope(self.head_dim))

        def rope(q, k):
            return apply_rope(q, cos.astype(q.dtype), sin.astype(q.dtype)), apply_rope(k, cos.astype(k.dtype),
                                                                                       sin.astype(k.dtype))

        cond = self.condition(t, labels)
        if not isinstance(row_entity, np.ndarray):
            row_entity = jnp.asarray(row_entity)
        h = self.z_proj(x.astype(self.z_proj.dtype))
        h = h + jnp.take(self.encoder_pos_embed[...], jnp.asarray(token_index), axis=0).astype(h.dtype)
        h = constrain(self.z_proj_ln(h), ("act_batch", "act_len", "act_embed"))
        new_kv = []

        def run(block, h, cond, cache, rng):  # row_entity from the closure: a static one stays numpy
            return block(h, cond, row_entity, mask=mask, rope=rope, kv_cache=cache, kv_valid=all_valid,
                         return_kv=return_kv, attn_dropout=self.attn_dropout, proj_dropout=self.proj_dropout,
                         dropout_rng=rng)

        if self.remat and kv_cache is None and not return_kv:  # the training forward keeps no activations
            run = nnx.remat(run)
        for i, block in enumerate(self.blocks):
            if i == len(self.encoder_blocks):
                h = self.decoder_embed(self.encoder_norm(h))
                h = h + jnp.take(self.decoder_pos_embed[...], jnp.asarray(token_index), axis=0).astype(h.dtype)
            h, kv = run(block, h, cond, None if kv_cache is None else kv_cache[i],
                        None if dropout_rng is None else jax.random.fold_in(dropout_rng, i))
            h = constrain(h, ("act_batch", "act_len", "act_embed"))
            new_kv.append(kv)
        out = self.pred(self.decoder_norm(h)).astype(jnp.float32)
        if self.prediction == "x":  # clean tokens -> velocity of the linear path z = (1 - t) x + t eps
            t_row = rows_of_entities(t.astype(jnp.float32), row_entity)[..., None]
            out = (x.astype(jnp.float32) - out) / jnp.maximum(t_row, PREDICTION_T_MIN)
        return (out, new_kv) if return_kv else out


# ----------------------------------------------------------------------------- the objective
def sample_logit_normal(rng: jax.Array, shape, mu: float = 0.0, sigma: float = 1.0) -> jax.Array:
    """t = sigmoid(N(mu, sigma)) (upstream xAR.sample_logit_normal, mu 0, sigma 1)."""
    return jax.nn.sigmoid(mu + sigma * jax.random.normal(rng, shape))


def noisy_context_terms(model: XARNet, x: jax.Array, labels: jax.Array, t: jax.Array, noise: jax.Array,
                        dropout_rng: jax.Array | None = None):
    """Noisy Context Learning for clean tokens x (B, N, C), per-entity t (B, E), noise (B, N, C).

    Every entity is noised at its own time and all are predicted at once under the
    entity-causal mask. Returns (z, target, v, loss).
    """
    t_tok = rows_of_entities(t, model.layout.entity_of_token)[..., None]
    z = (1 - t_tok) * x + t_tok * noise  # linear path: alpha_t = 1 - t, sigma_t = t
    target = noise - x  # d alpha_t / dt * x + d sigma_t / dt * eps
    v = model(z, t, labels, dropout_rng=dropout_rng)
    loss = jnp.mean(jnp.square(v - target))
    return z, target, v, loss


# ----------------------------------------------------------------------------- the sampler
def cfg_ramp(cfg_scale: float, entity: jax.Array, num_entities: int, schedule: str = "linear") -> jax.Array:
    """Guidance scale of entity e: 1 -> cfg linearly over entities (upstream xAR.sample_tokens), or cfg for
    every entity with ``schedule="constant"``."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg schedule {schedule!r}: must be one of {CFG_SCHEDULES}")
    if num_entities == 1 or schedule == "constant":
        return jnp.asarray(cfg_scale, jnp.float32)
    return (cfg_scale - 1.0) * entity / (num_entities - 1.0) + 1.0


def time_grid(method: str, num_steps: int) -> np.ndarray:
    """Solver times from noise (t=1) to data (t=0).

    Euler-Maruyama: linspace(1, 0.04, num_steps) then 0 (upstream models/sampler.py), the last step
    deterministic; ODE: linspace(1, 0, num_steps + 1) (upstream euler_sampler).
    """
    if method == "euler_maruyama":
        grid = np.concatenate([np.linspace(1.0, 0.04, num_steps), [0.0]])
    else:
        grid = np.linspace(1.0, 0.0, num_steps + 1)
    return grid.astype(np.float32)


def em_drift(v: jax.Array, x: jax.Array, t: jax.Array) -> jax.Array:
    """Reverse-SDE drift v - (1/2) g^2 score with g^2 = 2t, score from the velocity for the linear path.

    (upstream get_score_from_velocity: score = (-(1 - t) v - x) / t.)
    """
    score = (-(1 - t) * v - x) / t
    return v - t * score


class XAR(Method):
    """xAR: next-X prediction with flow matching and Noisy Context Learning."""

    def layout(self) -> Layout:
        m = self.config.model
        return make_layout(m.entity, m.input_size // m.patch_size, cell_size=m.cell_size,
                           subsample_stride=m.subsample_stride, scales=tuple(m.scales))

    def validate_config(self, config) -> None:
        m, s = config.model, config.sample
        if m.entity not in ENTITIES:
            raise ValueError(f"config.model.entity={m.entity!r}: must be one of {ENTITIES}")
        if m.input_size % m.patch_size:
            raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        grid = m.input_size // m.patch_size
        if m.entity == "cell" and grid % m.cell_size:
            raise ValueError(f"config.model.cell_size={m.cell_size} does not divide the {grid}x{grid} token grid")
        if m.entity == "subsample" and grid % m.subsample_stride:
            raise ValueError(f"config.model.subsample_stride={m.subsample_stride} does not divide the "
                             f"{grid}x{grid} token grid")
        if m.entity == "scale":
            try:
                self.layout()
            except ValueError as e:
                raise ValueError(f"config.model.scales: {e}") from None
        if m.hidden_size % m.num_heads or (m.hidden_size // m.num_heads) % 4:
            raise ValueError(f"config.model.hidden_size={m.hidden_size} / config.model.num_heads={m.num_heads} "
                             "must give a head dim divisible by 4 (2-D RoPE)")
        if m.get("attention_impl", "xla") not in layers.ATTENTION_IMPLS:
            raise ValueError(f"config.model.attention_impl={m.attention_impl!r}: must be one of "
                             f"{layers.ATTENTION_IMPLS}")
        if m.get("prediction", "v") not in PREDICTIONS:
            raise ValueError(f"config.model.prediction={m.prediction!r}: must be one of {PREDICTIONS}")
        if m.get("time_logit_std", 1.0) <= 0:
            raise ValueError(f"config.model.time_logit_std={m.time_logit_std}: must be > 0")
        for field in ("attn_dropout", "proj_dropout", "class_dropout_prob"):
            if not 0.0 <= m[field] < 1.0:
                raise ValueError(f"config.model.{field}={m[field]}: must be in [0, 1)")
        if s.method not in SAMPLERS:
            raise ValueError(f"config.sample.method={s.method!r}: must be one of {SAMPLERS}")
        if s.num_steps < 1:
            raise ValueError(f"config.sample.num_steps={s.num_steps}: must be >= 1")
        if not 0.0 <= s.get("guidance_low", 0.0) <= s.get("guidance_high", 1.0) <= 1.0:
            raise ValueError(f"config.sample.guidance_low={s.guidance_low} / guidance_high={s.guidance_high}: need "
                             "0 <= low <= high <= 1 (the times t at which guidance applies)")
        if s.get("cfg_schedule", "linear") not in CFG_SCHEDULES:
            raise ValueError(f"config.sample.cfg_schedule={s.cfg_schedule!r}: must be one of {CFG_SCHEDULES}")
        check_data_shape(config)

    def create_model(self, rngs: nnx.Rngs) -> XARNet:
        m = self.config.model
        return XARNet(layout=self.layout(), token_dim=m.in_channels * m.patch_size ** 2, hidden_size=m.hidden_size,
                      encoder_depth=m.encoder_depth, decoder_depth=m.decoder_depth, num_heads=m.num_heads,
                      mlp_ratio=m.mlp_ratio, num_classes=m.num_classes, class_dropout_prob=m.class_dropout_prob,
                      attn_dropout=m.attn_dropout, proj_dropout=m.proj_dropout, rngs=rngs,
                      dtype=jnp.dtype(self.config.compute_dtype), attention_impl=m.get("attention_impl", "xla"),
                      prediction=m.get("prediction", "v"), remat=m.get("remat", False))

    def to_tokens(self, model: XARNet, x: jax.Array) -> jax.Array:
        """(B, H, W, C) image or latent -> (B, N, p*p*C) token sequence."""
        p = self.config.model.patch_size
        g = model.layout.grid
        return model.layout.encode(layers.patchify(x, p).reshape(x.shape[0], g, g, -1))

    def from_tokens(self, model: XARNet, tokens: jax.Array) -> jax.Array:
        grid = model.layout.decode(tokens)
        return layers.unpatchify(grid.reshape(grid.shape[0], -1, grid.shape[-1]), self.config.model.patch_size,
                                 self.config.model.in_channels)

    def loss(self, model: XARNet, batch, rng):
        x_data = batch["latent"] if "latent" in batch else batch["image"]
        rng_t, rng_noise, rng_drop, rng_dropout = jax.random.split(rng, 4)
        x = self.to_tokens(model, x_data.astype(jnp.float32))
        m = self.config.model
        t = sample_logit_normal(rng_t, (x.shape[0], model.layout.num_entities), m.get("time_logit_mean", 0.0),
                                m.get("time_logit_std", 1.0))
        noise = jax.random.normal(rng_noise, x.shape)
        labels = model.class_emb.drop_labels(batch["label"], rng_drop)
        _, _, _, loss = noisy_context_terms(model, x, labels, t, noise, dropout_rng=rng_dropout)
        return loss, {"loss": loss}

    def sample(self, model: XARNet, rng: jax.Array, labels: jax.Array, *, num_steps: int | None = None,
               cfg_scale: float | None = None, method: str | None = None, use_cache: bool | None = None,
               cfg_schedule: str | None = None, guidance_interval: tuple[float, float] | None = None
               ) -> jax.Array:
        """Entity-by-entity generation; returns (B, H, W, C) in the data's space."""
        s = self.config.sample
        tokens = sample_tokens(
            model, rng, labels, num_steps=num_steps or s.num_steps,
            cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale, method=method or s.method,
            use_cache=s.use_cache if use_cache is None else use_cache,
            cfg_schedule=cfg_schedule or s.get("cfg_schedule", "linear"),
            guidance_interval=guidance_interval or (s.get("guidance_low", 0.0), s.get("guidance_high", 1.0)))
        return self.from_tokens(model, tokens)


def sample_tokens(model: XARNet, rng: jax.Array, labels: jax.Array, *, num_steps: int, cfg_scale: float,
                  method: str = "euler_maruyama", use_cache: bool = True, guided: bool | None = None,
                  cfg_schedule: str = "linear", guidance_interval: tuple[float, float] = (0.0, 1.0)) -> jax.Array:
    """(B, N, C) tokens generated entity by entity.

    ``guided`` runs the [cond; uncond] doubled batch (default: cfg_scale != 1); as upstream, an entity whose
    ramped scale is <= 1 takes the conditional drift, and so does a solver step at a time t outside
    ``guidance_interval`` (upstream sampler.py guidance_low <= t <= guidance_high, default always). With ``use_cache`` each finished entity is run once at
    t = 0 and its keys/values stored; without it, every solver step runs the whole sequence (finished
    entities at t = 0; later ones, which the entity-causal mask hides, as zeros at t = 1).
    """
    if method not in SAMPLERS:
        raise ValueError(f"sample method {method!r}: must be one of {SAMPLERS}")
    layout = model.layout
    guided = (cfg_scale != 1.0) if guided is None else guided
    b = labels.shape[0]
    y = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if guided else labels
    bc = y.shape[0]
    n_tok, n_ent, c = layout.num_tokens, layout.num_entities, model.token_dim
    ts = jnp.asarray(time_grid(method, num_steps))
    head_dim = model.head_dim
    double = (lambda a: jnp.concatenate([a, a])) if guided else (lambda a: a)

    low, high = guidance_interval

    def guide(d, scale, t):
        if not guided:
            return d
        cond, uncond = jnp.split(d, 2)
        return jnp.where((scale > 1.0) & (t >= low) & (t <= high), uncond + scale * (cond - uncond), cond)

    tokens = jnp.zeros((b, n_tok, c), jnp.float32)
    caches = None
    if use_cache:
        empty = jnp.zeros((bc, model.num_heads, n_tok, head_dim), jnp.dtype(model.z_proj.dtype))
        caches = [(empty, empty) for _ in model.blocks]

    for first, count, size in layout.runs:
        row_entity = np.zeros(size, np.int32)

        def body(carry, j, first=first, size=size, row_entity=row_entity):
            tokens, caches = carry
            e = first + j
            start = jnp.asarray(layout.entity_start)[e]
            token_index = start + jnp.arange(size)
            scale = cfg_ramp(cfg_scale, e, n_ent, cfg_schedule)
            key = jax.random.fold_in(rng, e)

            def velocity(x, t):
                if use_cache:
                    return model(double(x), jnp.full((bc, 1), t), y, token_index=token_index, row_entity=row_entity,
                                 kv_cache=caches, kv_valid=jnp.arange(n_tok) < start)
                seq = jax.lax.dynamic_update_slice(tokens, x, (0, start, 0))
                ids = jnp.arange(n_ent)
                t_all = jnp.where(ids < e, 0.0, jnp.where(ids == e, t, 1.0))
                v = model(double(seq), jnp.broadcast_to(t_all, (bc, n_ent)), y)
                return jax.lax.dynamic_slice(v, (0, start, 0), (bc, size, c))

            x = jax.random.normal(jax.random.fold_in(key, 0), (b, size, c))
            x = solve(method, velocity, guide, scale, x, ts, key, double)
            tokens = jax.lax.dynamic_update_slice(tokens, x, (0, start, 0))
            if use_cache:  # the finished entity enters the context at t = 0 (upstream: prepended to the next)
                _, new_kv = model(double(x), jnp.zeros((bc, 1)), y, token_index=token_index, row_entity=row_entity,
                                  kv_cache=caches, kv_valid=jnp.arange(n_tok) < start, return_kv=True)
                caches = [tuple(jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, 0, start, 0))
                                for buf, new in zip(cache, kv)) for cache, kv in zip(caches, new_kv)]
            return (tokens, caches), None

        (tokens, caches), _ = jax.lax.scan(body, (tokens, caches), jnp.arange(count))
    return tokens


def solve(method, velocity, guide, scale, x, ts, key, double):
    """Integrate one entity from ts[0] = 1 to ts[-1] = 0. ``velocity(x, t)`` runs the (doubled) batch."""
    num = ts.shape[0] - 1
    if method == "euler_maruyama":
        def em_step(x, i):
            t, dt = ts[i], ts[i + 1] - ts[i]
            d = guide(em_drift(velocity(x, t), double(x), t), scale, t)
            eps = jax.random.normal(jax.random.fold_in(key, i + 1), x.shape)
            # dW = eps sqrt|dt|, diffusion g = sqrt(2t) (upstream compute_diffusion)
            return x + d * dt + jnp.sqrt(2 * t) * jnp.sqrt(jnp.abs(dt)) * eps, None

        x, _ = jax.lax.scan(em_step, x, jnp.arange(num - 1))
        t, dt = ts[num - 1], ts[num] - ts[num - 1]
        return x + dt * guide(em_drift(velocity(x, t), double(x), t), scale, t)  # last step without noise

    def ode_step(x, i):
        t, t_next = ts[i], ts[i + 1]
        d0 = guide(velocity(x, t), scale, t)
        x_euler = x + (t_next - t) * d0
        if method == "euler":
            return x_euler, None
        d1 = guide(velocity(x_euler, t_next), scale, t_next)  # Heun: trapezoid on the two slopes
        return x + (t_next - t) * 0.5 * (d0 + d1), None

    x, _ = jax.lax.scan(ode_step, x, jnp.arange(num))
    return x


# ----------------------------------------------------------------------------- conversion
# Upstream layout (OliverRensu/xAR xar_base/large/huge .pth, key "model" or "model_ema"): torch state_dict,
# Linear (out, in); positions (1, 256, D) in upstream's 4-cell order, which is our "cell" layout with
# cell_size 8 on the 16x16 grid; buffers (mask, RoPE tables) are constants we recompute and compare.

def _linear(sd, prefix):
    return {"kernel": np.asarray(sd[prefix + ".weight"]).T, "bias": np.asarray(sd[prefix + ".bias"])}


def _block_params(sd, p):
    return {"attn": {"qkv": _linear(sd, p + ".attn.qkv"), "proj": _linear(sd, p + ".attn.proj")},
            "mlp": {"fc1_g": _linear(sd, p + ".mlp.fc1_g"), "fc1_x": _linear(sd, p + ".mlp.fc1_x"),
                    "fc2": _linear(sd, p + ".mlp.fc2")},
            "ada_lin": _linear(sd, p + ".ada_lin.1")}


def _depth_of(sd, prefix) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix + "."))


def params_from_torch(sd: dict[str, np.ndarray], model: XARNet) -> dict:
    """Pure-dict params of :class:`XARNet` from an upstream xAR state_dict; checks the constant buffers."""
    n = model.layout.num_tokens
    for name, ours in (("encoder", model.encoder_blocks), ("decoder", model.decoder_blocks)):
        depth = _depth_of(sd, f"{name}_blocks")
        if depth != len(ours):
            raise ValueError(f"checkpoint has {depth} {name} blocks but the model has {len(ours)}")
    emb = np.asarray(sd["class_emb.weight"])
    if emb.shape[0] != model.num_classes + 1:
        raise ValueError(f"checkpoint class_emb has {emb.shape[0]} rows; the model has num_classes="
                         f"{model.num_classes} (+1 null row)")
    pos = np.asarray(sd["encoder_pos_embed_learned"]).reshape(-1, emb.shape[1])
    if pos.shape[0] != n:
        raise ValueError(f"checkpoint has {pos.shape[0]} positions but the layout has {n} tokens")
    if "mask" in sd:  # upstream's additive 0/-inf mask must be our entity-causal mask
        theirs = np.asarray(sd["mask"]).reshape(n, n) == 0
        if not np.array_equal(theirs, model.layout.mask()):
            raise ValueError("checkpoint attention mask differs from the layout's entity-causal mask: "
                             "upstream checkpoints need config.model.entity='cell' with cell_size 8 on 16x16")
    cos, sin = model.layout.rope(model.head_dim)
    for key in (k for k in sd if k.endswith("attn.rope.freqs_cos") or k.endswith("attn.rope.freqs_sin")):
        ours = cos if key.endswith("cos") else sin
        if sd[key].shape != ours.shape or not np.allclose(sd[key], ours, atol=1e-5):
            raise ValueError(f"checkpoint buffer {key} differs from our 2-D RoPE table at the layout's positions")
    return {
        "class_emb": {"embedding": {"embedding": emb}},
        "time_embed": {"linear_1": _linear(sd, "time_embed.mlp.0"), "linear_2": _linear(sd, "time_embed.mlp.2")},
        "z_proj": _linear(sd, "z_proj"),
        "z_proj_ln": {"weight": np.asarray(sd["z_proj_ln.weight"])},
        "encoder_pos_embed": pos,
        "encoder_blocks": {i: _block_params(sd, f"encoder_blocks.{i}") for i in range(len(model.encoder_blocks))},
        "encoder_norm": {"weight": np.asarray(sd["encoder_norm.weight"])},
        "decoder_embed": _linear(sd, "decoder_embed"),
        "decoder_pos_embed": np.asarray(sd["decoder_pos_embed_learned"]).reshape(n, -1),
        "decoder_blocks": {i: _block_params(sd, f"decoder_blocks.{i}") for i in range(len(model.decoder_blocks))},
        "decoder_norm": {"weight": np.asarray(sd["decoder_norm.weight"])},
        "pred": _linear(sd, "pred"),
    }


def load_into(model: XARNet, sd: dict[str, np.ndarray]) -> XARNet:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_torch(sd, model)))
    nnx.update(model, state)
    return model


def import_xar(state_dict: dict[str, np.ndarray], config) -> dict:
    """IMPORTERS entry: an upstream xAR checkpoint (its "model_ema" entry if present) -> params."""
    for wrapper in ("model_ema", "model"):  # upstream saves {"model", "model_ema", ...}; EMA is what it samples
        if any(k.startswith(wrapper + ".") for k in state_dict):
            state_dict = {k[len(wrapper) + 1:]: v for k, v in state_dict.items() if k.startswith(wrapper + ".")}
            break
    method = XAR(config)
    abstract = layers.abstract_module(method.create_model)  # shapes only: no init of 1B params
    params = params_from_torch(state_dict, abstract)
    expected = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise ValueError("checkpoint parameters do not match the model's parameter tree")
    for path, ours, theirs in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(expected),
                                  jax.tree.leaves(params)):
        if tuple(ours.shape) != tuple(np.shape(theirs)):
            raise ValueError(f"{jax.tree_util.keystr(path[0])}: checkpoint shape {np.shape(theirs)} != model "
                             f"shape {tuple(ours.shape)} (check config.model sizes)")
    return jax.tree.map(jnp.asarray, params)


def _fixture_model(meta) -> XARNet:
    """The network of a fixture, from its recorded upstream constructor arguments."""
    c = meta["constructor"]
    if c["encoder_embed_dim"] != c["decoder_embed_dim"] or c["encoder_num_heads"] != c["decoder_num_heads"]:
        raise ValueError("xAR feeds one condition to both halves: encoder and decoder widths/heads must match")
    grid = c["img_size"] // c["vae_stride"] // c["patch_size"]
    cells_per_side = int(round(math.sqrt(c["clusters"])))
    return XARNet(layout=make_layout("cell", grid, cell_size=grid // cells_per_side),
                  token_dim=c["vae_embed_dim"] * c["patch_size"] ** 2, hidden_size=c["encoder_embed_dim"],
                  encoder_depth=c["encoder_depth"], decoder_depth=c["decoder_depth"],
                  num_heads=c["encoder_num_heads"], mlp_ratio=c["mlp_ratio"], num_classes=c["class_num"],
                  class_dropout_prob=c["label_drop_prob"], rngs=nnx.Rngs(0))


def check_net_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``xar_net``: the training forward and the Noisy Context Learning terms."""
    model = load_into(_fixture_model(meta), {**params, **buffers})
    labels = jnp.asarray(inputs["y"], jnp.int32)
    t = jnp.asarray(inputs["t"])
    out = {"v": np.asarray(model(jnp.asarray(inputs["x_t"]), t, labels))}
    if "x0" in inputs:
        x0 = model.layout.encode(jnp.transpose(jnp.asarray(inputs["x0"]), (0, 2, 3, 1)))
        z, target, v, loss = noisy_context_terms(model, x0, labels, t, jnp.asarray(inputs["noise"]))
        out.update(x_t=np.asarray(z), target=np.asarray(target), loss=np.asarray(loss))
    return out


def check_kvcache_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``xar_kvcache_step``: upstream's sample_inference call sequence.

    A first step of cell k runs [clean cell k-1 at t=0; noisy cell k] on top of the cache of cells < k-1 and
    caches cell k-1; a later step runs the noisy cell alone on the cache of cells < k.
    """
    model = load_into(_fixture_model(meta), {**params, **buffers})
    layout = model.layout
    labels = jnp.asarray(inputs["y"], jnp.int32)
    cache = None
    out = {}
    for name in meta["call_order"]:
        cell, first = int(name[1]), name.endswith("s0")
        x, t = jnp.asarray(inputs[f"{name}_x"]), jnp.asarray(inputs[f"{name}_t"])
        size = int(layout.entity_sizes[cell])
        cells = x.shape[1] // size  # 2 when the previous clean cell is prepended
        start = int(layout.entity_start[cell]) - (cells - 1) * size
        t = t.reshape(cells, x.shape[0]).T  # upstream's rows are cell-major
        v, new_kv = model(x, t, labels, token_index=np.arange(start, start + x.shape[1]),
                          row_entity=np.repeat(np.arange(cells), size), kv_cache=cache, return_kv=True)
        if first:  # cache every key/value but the noisy cell's
            old = cache or [(kv[0][:, :, :0], kv[1][:, :, :0]) for kv in new_kv]
            cache = [tuple(jnp.concatenate([o, n[:, :, : x.shape[1] - size]], axis=2) for o, n in zip(oc, nc))
                     for oc, nc in zip(old, new_kv)]
        out[f"{name}_v"] = np.asarray(v[:, -size:])
    return out


FIXTURE_CHECKS = {"xar_net": check_net_fixture, "xar_kvcache_step": check_kvcache_fixture}
IMPORTERS = {"xar": import_xar}
