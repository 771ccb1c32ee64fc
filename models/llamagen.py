"""LlamaGen's class-conditional GPT over the codes of a VQ tokenizer (ReTok's ``gpt_1d.Transformer``).

A decoder-only Llama over ``[class token; code_1 .. code_{N-1}]`` predicting ``code_1 .. code_N``
(Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation", 2024;
ReTok's scripts use the 1-D variant with a learned absolute position table instead of 2-D RoPE):

* embeddings: class table (``num_classes + 1`` rows, the last the null class for guidance) for
  position 0, code table for positions 1..; a learned ``positional_embedding[cls + N, D]`` is added
  to both; token dropout;
* blocks: pre-norm RMSNorm (eps 1e-5, float32) -> causal attention (fused ``wqkv`` without bias,
  ``wo`` without bias, residual dropout) -> RMSNorm -> SwiGLU ``w2(silu(w1 x) * w3 x)`` with hidden
  ``find_multiple(int(2 * 4 D / 3), 256)`` (FFN dropout); final RMSNorm; ``output`` Linear;
* objective: cross entropy over every position (mean), class label dropped to the null class with
  probability ``class_dropout_prob``;
* sampler (``generate``): a KV cache of static size (``find_multiple(N + 1, 8)`` slots, as
  gpt-fast's ``setup_caches``), classifier-free guidance on a doubled batch with the schedules of
  upstream's ``generate.py`` (constant, linear, linear_re, triangular, rectangular, step, cosine),
  ``cfg_interval`` (guidance off, sticky, after that many decode steps), temperature, top-k and
  top-p filtering; the first token always uses the base scale.

The generator lives in a tokenizer's discrete space: a batch carries the cached codes
(``batch["latent"]``, (B, N) or any shape with N codes per example, integer), ``sample`` returns
(B, N) int32 codes and ``config.tokenizer`` decodes them to images.

Sizes (``configs/llamagen_gpt.py``): B 111M (12 x 768), L 343M (24 x 1024), XL 775M (36 x 1280).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from trainers.method import Method

CFG_SCHEDULES = ("constant", "linear", "linear_re", "triangular", "rectangular", "step", "cosine")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


class FeedForward(nnx.Module):
    """SwiGLU without biases: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, init):
        self.w1 = layers.dense(dim, hidden, ("embed", "mlp"), use_bias=False, kernel_init=init, rngs=rngs, dtype=dtype)
        self.w3 = layers.dense(dim, hidden, ("embed", "mlp"), use_bias=False, kernel_init=init, rngs=rngs, dtype=dtype)
        self.w2 = layers.dense(hidden, dim, ("mlp", "embed"), use_bias=False, kernel_init=init, rngs=rngs, dtype=dtype)

    def __call__(self, x):
        gate, value = layers.dense_group(x, self.w1, self.w3)
        return self.w2(nnx.silu(gate) * value)


class TransformerBlock(nnx.Module):
    def __init__(self, dim: int, n_head: int, hidden: int, norm_eps: float, *, rngs: nnx.Rngs, dtype, init):
        self.attention_norm = layers.RMSNorm(dim, eps=norm_eps)
        self.attention = layers.Attention(dim, n_head, qkv_bias=False, proj_bias=False, rngs=rngs, dtype=dtype)
        for lin in (self.attention.qkv, self.attention.proj):
            lin.kernel.set_value(init(rngs.params(), lin.kernel[...].shape))
        self.ffn_norm = layers.RMSNorm(dim, eps=norm_eps)
        self.feed_forward = FeedForward(dim, hidden, rngs=rngs, dtype=dtype, init=init)

    def __call__(self, x, *, mask=None, kv_cache=None, cache_index=None, resid_dropout=0.0,
                 ffn_dropout=0.0, rng=None):
        r = [None, None] if rng is None else list(jax.random.split(rng))
        attn = self.attention(self.attention_norm(x), mask=mask, kv_cache=kv_cache, cache_index=cache_index,
                              return_kv=kv_cache is not None)
        attn, new_kv = attn if kv_cache is not None else (attn, None)
        h = x + layers.dropout(attn, resid_dropout, r[0])
        out = h + layers.dropout(self.feed_forward(self.ffn_norm(h)), ffn_dropout, r[1])
        return out, new_kv


class GPT(nnx.Module):
    """(codes (B, T), labels (B,)) -> logits (B, 1 + T, V): position 0 is the class token."""

    def __init__(self, *, vocab_size: int, dim: int, n_layer: int, n_head: int, block_size: int,
                 num_classes: int, cls_token_num: int = 1, class_dropout_prob: float = 0.1,
                 multiple_of: int = 256, ffn_dim_multiplier: float | None = None, norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, token_dropout: float = 0.0, resid_dropout: float = 0.0,
                 ffn_dropout: float = 0.0, rngs: nnx.Rngs, dtype=jnp.float32):
        if cls_token_num != 1:
            raise ValueError(f"cls_token_num={cls_token_num}: the class-conditional GPT has one class token (upstream asserts it)")
        self.vocab_size, self.block_size, self.num_classes = vocab_size, block_size, num_classes
        self.n_head, self.dim = n_head, dim
        self.token_dropout, self.resid_dropout, self.ffn_dropout = token_dropout, resid_dropout, ffn_dropout
        init = nnx.initializers.normal(initializer_range)
        self.cls_embedding = layers.LabelEmbedder(num_classes, dim, class_dropout_prob, rngs=rngs)
        self.cls_embedding.embedding.embedding.set_value(
            init(rngs.params(), self.cls_embedding.embedding.embedding[...].shape))
        self.tok_embeddings = nnx.Embed(vocab_size, dim, embedding_init=nnx.with_partitioning(init, ("vocab", "embed")),
                                        rngs=rngs)
        hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.layers = nnx.List([TransformerBlock(dim, n_head, hidden, norm_eps, rngs=rngs, dtype=dtype, init=init)
                                for _ in range(n_layer)])
        self.norm = layers.RMSNorm(dim, eps=norm_eps)
        # Upstream zero-initialises the output layer.
        self.output = layers.dense(dim, vocab_size, ("embed", "vocab"), use_bias=False, kernel_init=layers.zeros,
                                   rngs=rngs, dtype=dtype)
        self.positional_embedding = nnx.Param(
            dim ** -0.5 * jax.random.normal(rngs.params(), (cls_token_num + block_size, dim)),
            out_sharding=("position", "embed"))

    def _head(self, h):
        return self.output(self.norm(h)).astype(jnp.float32)

    def __call__(self, idx: jax.Array, labels: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        """Training / teacher-forced forward over the whole sequence (causal)."""
        r = [None] * (len(self.layers) + 1) if rng is None else list(jax.random.split(rng, len(self.layers) + 1))
        h = jnp.concatenate([self.cls_embedding(labels)[:, None], self.tok_embeddings(idx)], axis=1)
        h = h + self.positional_embedding[: h.shape[1]].astype(h.dtype)
        h = layers.dropout(h, self.token_dropout, r[-1])
        t = h.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        for block, key in zip(self.layers, r[:-1]):
            h, _ = block(h, mask=mask, resid_dropout=self.resid_dropout, ffn_dropout=self.ffn_dropout, rng=key)
        return self._head(h)

    def init_cache(self, batch: int, dtype=jnp.float32):
        """Zero KV buffers (B, H, L, d) per block, L = find_multiple(block_size + 1, 8) as upstream."""
        length = find_multiple(self.block_size + 1, 8)
        shape = (batch, self.n_head, length, self.dim // self.n_head)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

    def step(self, tokens: jax.Array | None, labels: jax.Array | None, pos: jax.Array, cache):
        """One cached position: the class token (``tokens is None``, pos 0) or a code at ``pos``.

        Returns (logits (B, V), new cache)."""
        if tokens is None:
            h = self.cls_embedding(labels)[:, None] + self.positional_embedding[:1]
        else:
            h = self.tok_embeddings(tokens[:, None]) + jax.lax.dynamic_slice_in_dim(
                self.positional_embedding[...], pos, 1)[None]
        length = cache[0][0].shape[2]
        mask = (jnp.arange(length) <= pos)[None, None, None]
        new_cache = []
        for block, kv in zip(self.layers, cache):
            h, kv = block(h, mask=mask, kv_cache=kv, cache_index=pos)
            new_cache.append(kv)
        return self._head(h)[:, 0], new_cache


# ----------------------------------------------------------------------------- sampling
def cfg_schedule_value(schedule: str, ratio: float, cfg_scale: float, **kwargs) -> float:
    """Upstream's per-step guidance scale (``generate.py``), including its +1e-4 offsets."""
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return 1.0 + (cfg_scale - 1.0) * ratio + 1e-4
    if schedule == "linear_re":
        return 1.0 + (cfg_scale - 1.0) * (1.0 - ratio) + 1e-4
    if schedule == "triangular":
        peak = kwargs.get("peak", 0.5)
        if ratio < peak:
            return 1.0 + (cfg_scale - 1.0) * (ratio / peak) + 1e-4
        return 1.0 + (cfg_scale - 1.0) * ((1.0 - ratio) / (1.0 - peak)) + 1e-4
    if schedule == "rectangular":
        lo, hi = kwargs.get("window_start", 0.05), kwargs.get("window_end", 1.0)
        return cfg_scale if lo <= ratio <= hi else 1.0 + 1e-4
    if schedule == "step":
        if cfg_scale == 1.0:
            return cfg_scale
        return cfg_scale if kwargs["window_start"] <= ratio else 1.0 + 1e-4
    if schedule == "cosine":
        # Upstream's formula (its module forgets to import math, so the path never ran there).
        return 1.0 + (cfg_scale - 1.0) * (0.5 * (1 + math.cos(math.pi * ratio)))
    raise ValueError(f"cfg_schedule={schedule!r}; known: {CFG_SCHEDULES}")


def guidance_plan(num_tokens: int, cfg_scale: float, cfg_interval: int = -1, cfg_schedule: str = "constant",
                  **schedule_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(scale, flag) per generated token: token 0 (the prefill) takes the base scale; decode iteration
    i = s - 1 takes the schedule at ratio (i + 1) / (num_tokens - 1); the flag turns off for good
    once i > cfg_interval (cfg_interval > -1)."""
    scales, flags, flag = [float(cfg_scale)], [True], True
    for i in range(num_tokens - 1):
        scales.append(cfg_schedule_value(cfg_schedule, (i + 1) / (num_tokens - 1), cfg_scale, **schedule_kwargs))
        if cfg_interval > -1 and i > cfg_interval:
            flag = False
        flags.append(flag)
    return np.asarray(scales, np.float64), np.asarray(flags, bool)


def top_k_top_p_filtering(logits: jax.Array, top_k: int = 0, top_p: float | jax.Array = 1.0,
                          use_top_p: bool | None = None) -> jax.Array:
    """Hugging Face's filter as upstream: top-k keeps logits >= the k-th largest (ties kept); top-p
    drops tokens whose sorted cumulative probability exceeds ``top_p``, shifted right by one so the
    first token crossing it stays; dropped entries become -inf. ``use_top_p`` (static) says whether
    the top-p filter runs (default: ``top_p < 1`` for a Python float)."""
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if use_top_p is None:
        use_top_p = float(top_p) < 1.0
    if use_top_p:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative > top_p
        remove_sorted = jnp.concatenate([jnp.zeros_like(remove_sorted[..., :1]), remove_sorted[..., :-1]], axis=-1)
        rows = jnp.arange(logits.shape[0])[:, None]
        remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
        logits = jnp.where(remove, neg_inf, logits)
    return logits


def generate(model: GPT, rng: jax.Array, labels: jax.Array, *, cfg_scale: float = 1.0, cfg_interval: int = -1,
             cfg_schedule: str = "constant", cfg_schedule_kwargs: dict | None = None, temperature=1.0,
             top_k: int = 0, top_p=1.0, use_top_p: bool | None = None, sample_logits: bool = True,
             forced_tokens: jax.Array | None = None, return_trace: bool = False):
    """Class-conditional codes (B, block_size) int32, as upstream's ``generate``.

    ``forced_tokens`` (B, block_size): use these instead of drawing (parity with upstream's recorded
    multinomial draws); ``return_trace``: also return per-step raw model logits, guided logits and
    the sampling probabilities (each stacked over steps)."""
    n, b = model.block_size, labels.shape[0]
    guided = cfg_scale > 1.0  # upstream: the doubled batch runs only when the base scale exceeds 1
    scales, flags = guidance_plan(n, cfg_scale, cfg_interval, cfg_schedule, **(cfg_schedule_kwargs or {}))
    cond = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)]) if guided else labels
    if use_top_p is None:
        use_top_p = not isinstance(top_p, (int, float)) or top_p < 1.0

    def choose(raw, scale, flag, key, forced):
        if guided:
            c, u = raw[:b], raw[b:]
            logits = jnp.where(flag, u + (c - u) * scale, c)
        else:
            logits = raw
        filtered = logits / jnp.maximum(temperature, 1e-5)
        if top_k > 0 or use_top_p:
            filtered = top_k_top_p_filtering(filtered, top_k, top_p, use_top_p)
        probs = jax.nn.softmax(filtered, axis=-1)
        if forced is not None:
            tok = forced
        elif sample_logits:
            tok = jax.random.categorical(key, filtered, axis=-1)
        else:
            tok = jnp.argmax(probs, axis=-1)
        return tok.astype(jnp.int32), logits, probs

    keys = jax.random.split(rng, n)
    forced = None if forced_tokens is None else jnp.asarray(forced_tokens, jnp.int32)
    cache = model.init_cache(cond.shape[0])
    raw, cache = model.step(None, cond, jnp.int32(0), cache)
    tok, logits, probs = choose(raw, scales[0], flags[0], keys[0], None if forced is None else forced[:, 0])

    graphdef, state = nnx.split(model)

    def body(carry, xs):
        tok, cache = carry
        pos, scale, flag, key, forced_s = xs
        m = nnx.merge(graphdef, state)
        raw, cache = m.step(jnp.concatenate([tok, tok]) if guided else tok, None, pos, cache)
        new_tok, logits, probs = choose(raw, scale, flag, key, forced_s)
        return (new_tok, cache), (new_tok, raw, logits, probs)

    xs = (jnp.arange(1, n, dtype=jnp.int32), jnp.asarray(scales[1:], jnp.float32), jnp.asarray(flags[1:]), keys[1:],
          None if forced is None else forced[:, 1:].T)
    _, (toks, raws, logitss, probss) = jax.lax.scan(body, (tok, cache), xs)
    seq = jnp.concatenate([tok[:, None], toks.T], axis=1)
    if not return_trace:
        return seq
    trace = dict(model_logits=jnp.concatenate([raw[None], raws]), logits=jnp.concatenate([logits[None], logitss]),
                 probs=jnp.concatenate([probs[None], probss]), cfg_per_step=scales, cfg_flag_per_step=flags)
    return seq, trace


# ----------------------------------------------------------------------------- the method
class LlamaGenGPT(Method):
    """Next-code prediction over a VQ tokenizer's cached codes, class-conditional."""

    def validate_config(self, config) -> None:
        m = config.model
        if m.dim % m.n_head:
            raise ValueError(f"config.model.dim={m.dim} is not divisible by config.model.n_head={m.n_head}")
        if config.sample.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"config.sample.cfg_schedule={config.sample.cfg_schedule!r}; known: {CFG_SCHEDULES}")
        if config.sample.cfg_schedule == "step" and "window_start" not in config.sample.cfg_schedule_kwargs:
            raise ValueError("config.sample.cfg_schedule='step' needs config.sample.cfg_schedule_kwargs.window_start")
        if not 0.0 < config.sample.top_p <= 1.0:
            raise ValueError(f"config.sample.top_p={config.sample.top_p} must be in (0, 1]")
        if config.sample.top_k < 0:
            raise ValueError(f"config.sample.top_k={config.sample.top_k} must be >= 0 (0 = off)")

    def create_model(self, rngs: nnx.Rngs) -> GPT:
        m, c = self.config.model, self.config
        return GPT(vocab_size=m.vocab_size, dim=m.dim, n_layer=m.n_layer, n_head=m.n_head, block_size=m.block_size,
                   num_classes=c.data.num_classes, class_dropout_prob=m.class_dropout_prob,
                   token_dropout=m.token_dropout, resid_dropout=m.resid_dropout, ffn_dropout=m.ffn_dropout,
                   rngs=rngs, dtype=jnp.dtype(c.compute_dtype))

    def codes(self, batch) -> jax.Array:
        z = batch["latent"]
        return z.reshape(z.shape[0], -1).astype(jnp.int32)

    def loss(self, model: GPT, batch, rng):
        z = self.codes(batch)
        if z.shape[1] != model.block_size:
            raise ValueError(f"batch has {z.shape[1]} codes per example; config.model.block_size={model.block_size}")
        drop_rng, rng = jax.random.split(rng)
        labels = batch["label"]
        if model.cls_embedding.dropout_prob > 0:
            labels = model.cls_embedding.drop_labels(labels, drop_rng)
        logits = model(z[:, :-1], labels, rng=rng)
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), z[..., None], axis=-1)[..., 0]
        loss = ce.mean()
        return loss, {"loss": loss}

    def sample(self, model: GPT, rng, labels, **overrides):
        s = dict(self.config.sample)
        s.update(overrides)
        return generate(model, rng, labels, cfg_scale=float(s["cfg_scale"]), cfg_interval=int(s["cfg_interval"]),
                        cfg_schedule=s["cfg_schedule"], cfg_schedule_kwargs=dict(s["cfg_schedule_kwargs"]),
                        temperature=float(s["temperature"]), top_k=int(s["top_k"]), top_p=float(s["top_p"]))


# ----------------------------------------------------------------------------- conversion
def params_from_torch(sd: dict[str, np.ndarray], n_layer: int) -> dict:
    """Upstream ``state_dict`` -> the pure param dict of :class:`GPT`."""
    t = lambda k: np.asarray(sd[k], np.float32).T  # noqa: E731  torch Linear (out, in) -> kernel (in, out)
    blocks = {}
    for i in range(n_layer):
        p = f"layers.{i}."
        blocks[i] = {
            "attention_norm": {"weight": np.asarray(sd[p + "attention_norm.weight"], np.float32)},
            "attention": {"qkv": {"kernel": t(p + "attention.wqkv.weight")},
                          "proj": {"kernel": t(p + "attention.wo.weight")}},
            "ffn_norm": {"weight": np.asarray(sd[p + "ffn_norm.weight"], np.float32)},
            "feed_forward": {k: {"kernel": t(p + f"feed_forward.{k}.weight")} for k in ("w1", "w2", "w3")},
        }
    return {
        "cls_embedding": {"embedding": {"embedding": np.asarray(sd["cls_embedding.embedding_table.weight"], np.float32)}},
        "tok_embeddings": {"embedding": np.asarray(sd["tok_embeddings.weight"], np.float32)},
        "layers": blocks,
        "norm": {"weight": np.asarray(sd["norm.weight"], np.float32)},
        "output": {"kernel": t("output.weight")},
        "positional_embedding": np.asarray(sd["positional_embedding"], np.float32),
    }


def _n_layer(sd) -> int:
    idx = {int(k.split(".")[1]) for k in sd if k.startswith("layers.")}
    if not idx or "tok_embeddings.weight" not in sd:
        raise ValueError("not a LlamaGen GPT state_dict: no 'layers.N.*' / 'tok_embeddings.weight' entries")
    return max(idx) + 1


def load_into(model: GPT, sd: dict[str, np.ndarray]) -> GPT:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    ours = params_from_torch(sd, len(model.layers))
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(params))
    got = jax.tree.map(lambda v: v.shape, ours)
    if shapes != got:
        raise ValueError(f"checkpoint shapes do not match the configured GPT: {got} vs {shapes}")
    nnx.replace_by_pure_dict(params, ours)
    return nnx.merge(nnx.graphdef(model), params, rest)


def import_gpt(state_dict: dict[str, np.ndarray], config) -> dict:
    """Released GPT checkpoints (``GPT_XL256_e300_VQ_SB.pt``: ``model`` entry, or a bare state_dict)."""
    sd = state_dict
    for key in ("ema", "model"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    model = layers.abstract_module(lambda rngs: LlamaGenGPT(config).create_model(rngs))
    if _n_layer(sd) != len(model.layers):
        raise ValueError(f"checkpoint has {_n_layer(sd)} layers; config.model.n_layer={len(model.layers)}")
    ours = params_from_torch(sd, len(model.layers))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    want = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(params))
    got = jax.tree.map(lambda v: v.shape, ours)
    if want != got:
        raise ValueError(f"checkpoint shapes do not match config.model: {got} vs {want}")
    return ours


def _fixture_model(meta) -> GPT:
    a = meta["constructor"]["args"]
    return GPT(vocab_size=a["vocab_size"], dim=a["dim"], n_layer=a["n_layer"], n_head=a["n_head"],
               block_size=a["block_size"], num_classes=a["num_classes"], cls_token_num=a["cls_token_num"],
               class_dropout_prob=a["class_dropout_prob"], multiple_of=a.get("multiple_of", 256),
               ffn_dim_multiplier=a.get("ffn_dim_multiplier"), norm_eps=a.get("norm_eps", 1e-5), rngs=nnx.Rngs(0))


def check_gpt_fixture(meta, params, buffers, inputs):
    model = load_into(_fixture_model(meta), params)
    i = lambda k: jnp.asarray(inputs[k])  # noqa: E731
    out = {}
    logits = model(i("idx").astype(jnp.int32), i("cond_idx").astype(jnp.int32))
    targets = i("targets").astype(jnp.int32)
    out["logits"] = logits
    out["loss"] = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1).mean()
    cond = i("cond_idx").astype(jnp.int32)
    cache = model.init_cache(cond.shape[0])
    raw, cache = model.step(None, cond, jnp.int32(0), cache)
    out["kv_prefill_logits"] = raw[:, None]
    for s in range(inputs["kv_tokens"].shape[1]):
        raw, cache = model.step(i("kv_tokens")[:, s].astype(jnp.int32), None, jnp.int32(1 + s), cache)
        out[f"kv_decode{s}_logits"] = raw[:, None]
    for call in meta["calls"]:
        run = call.get("run")
        if run is None:
            continue
        kw = call["generate_kwargs"]
        seq, trace = generate(
            model, jax.random.PRNGKey(0), i(f"{run}_cond").astype(jnp.int32), cfg_scale=float(inputs[f"{run}_cfg_scale"]),
            cfg_interval=kw["cfg_interval"], cfg_schedule=kw["cfg_schedule"], cfg_schedule_kwargs=kw["cfg_schedule_kwargs"],
            temperature=float(inputs[f"{run}_temperature"]), top_k=kw["top_k"], top_p=float(inputs[f"{run}_top_p"]),
            sample_logits=kw["sample_logits"], forced_tokens=i(f"{run}_tokens"), return_trace=True)
        out[f"{run}_seq"] = seq
        for k, v in trace.items():
            out[f"{run}_{k}"] = v
    return out


FIXTURE_CHECKS = {"llamagen_gpt": check_gpt_fixture}
IMPORTERS = {"llamagen_gpt": import_gpt}
