"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") trained by flow matching (SiT).

Network as facebookresearch/DiT ``models.py``: patch embedding, fixed 2-D sin-cos
positions, timestep + label embedders (label row ``num_classes`` is the null
class), adaLN-Zero blocks, final adaLN layer. Objective as SiT (Ma et al.):
linear interpolant x_t = t * x_data + (1 - t) * noise, the network predicts the
velocity x_data - noise, labels dropped to the null class with probability 0.1.
Sampler: Euler or Heun ODE from t = 0 (noise) to t = 1 (data) with
classifier-free guidance on the velocity.

Layout: images (batch, height, width, channels); tokens row-major over the patch grid.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import layers
from trainers.method import Method


class DiTBlock(nnx.Module):
    """adaLN-Zero block: attention and MLP, each modulated (shift, scale) and gated by the condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, dtype):
        self.attn = layers.Attention(hidden_size, num_heads, rngs=rngs, dtype=dtype)
        self.mlp = layers.Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs, dtype=dtype)
        # adaLN-Zero: the modulation starts at zero so each block starts as the identity.
        self.adaLN_modulation = layers.dense(hidden_size, 6 * hidden_size, ("embed", "mlp"),
                                             kernel_init=layers.zeros, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.adaLN_modulation(nnx.silu(c)), 6, axis=-1)
        x = x + gate_msa[:, None] * self.attn(layers.modulate(layers.layer_norm(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(layers.modulate(layers.layer_norm(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then a linear map to p*p*out_channels per token; zero-initialised."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs, dtype):
        self.adaLN_modulation = layers.dense(hidden_size, 2 * hidden_size, ("embed", "mlp"),
                                             kernel_init=layers.zeros, rngs=rngs, dtype=dtype)
        self.linear = layers.dense(hidden_size, patch_size * patch_size * out_channels, ("embed", None),
                                   kernel_init=layers.zeros, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(nnx.silu(c)), 2, axis=-1)
        return self.linear(layers.modulate(layers.layer_norm(x), shift, scale))


class DiT(nnx.Module):
    """The DiT network: (x (B, H, W, C), t (B,), y (B,)) -> (B, H, W, out_channels)."""

    def __init__(self, *, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1,
                 num_classes: int = 1000, learn_sigma: bool = True, remat: bool = False, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.patch_size = patch_size
        self.remat = remat  # recompute each block in the backward pass (memory; see benchmarks/train_step.py)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.x_embedder = layers.conv(in_channels, hidden_size, patch_size, strides=patch_size, padding="VALID",
                                      out_name="embed", kernel_init=layers.xavier_uniform, rngs=rngs, dtype=dtype)
        self.t_embedder = layers.TimestepEmbedder(hidden_size, rngs=rngs, dtype=dtype)
        self.y_embedder = layers.LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        grid = input_size // patch_size
        # Fixed, not trained (upstream: nn.Parameter with requires_grad=False).
        self.pos_embed = nnx.Variable(jnp.asarray(layers.get_2d_sincos_pos_embed(hidden_size, grid))[None])
        self.blocks = nnx.List([DiTBlock(hidden_size, num_heads, mlp_ratio, rngs=rngs, dtype=dtype)
                                for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, cond: jax.Array | None = None) -> jax.Array:
        """``cond``: optional extra (B, hidden) conditioning added to t_emb + y_emb (MeanFlow's h embedding)."""
        from trainers.sharding import constrain

        h = self.x_embedder(x.astype(self.x_embedder.dtype))
        b, gh, gw, d = h.shape
        h = h.reshape(b, gh * gw, d) + self.pos_embed[...].astype(h.dtype)
        h = constrain(h, ("act_batch", "act_len", "act_embed"))
        c = self.t_embedder(t) + self.y_embedder(y)
        if cond is not None:
            c = c + cond
        apply = nnx.remat(lambda block, h, c: block(h, c)) if self.remat else (lambda block, h, c: block(h, c))
        for block in self.blocks:
            h = apply(block, h, c)
        h = self.final_layer(h, c)
        return layers.unpatchify(h, self.patch_size, self.out_channels).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: float) -> jax.Array:
        """Upstream's guided forward, kept for parity: the batch is [cond; uncond] with x[:B/2] used
        for both halves, and (as upstream) only the first 3 channels are guided."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        eps, rest = out[..., :3], out[..., 3:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=-1)


def build_network(model_config, rngs: nnx.Rngs, dtype=jnp.float32) -> DiT:
    return DiT(input_size=model_config.input_size, patch_size=model_config.patch_size,
               in_channels=model_config.in_channels, hidden_size=model_config.hidden_size,
               depth=model_config.depth, num_heads=model_config.num_heads, mlp_ratio=model_config.mlp_ratio,
               class_dropout_prob=model_config.class_dropout_prob, num_classes=model_config.num_classes,
               learn_sigma=model_config.learn_sigma, remat=model_config.get("remat", False), rngs=rngs,
               dtype=dtype)


class DiTFlowMatching(Method):
    """DiT + SiT's linear-interpolant velocity objective and ODE sampler."""

    def validate_config(self, config) -> None:
        m = config.model
        if m.input_size % m.patch_size:
            raise ValueError(f"config.model.input_size={m.input_size} is not divisible by "
                             f"config.model.patch_size={m.patch_size}")
        if m.hidden_size % m.num_heads:
            raise ValueError(f"config.model.hidden_size={m.hidden_size} is not divisible by "
                             f"config.model.num_heads={m.num_heads}")
        if config.sample.method not in ("euler", "heun"):
            raise ValueError(f"config.sample.method={config.sample.method!r}: must be 'euler' or 'heun'")

    def create_model(self, rngs: nnx.Rngs) -> DiT:
        return build_network(self.config.model, rngs, jnp.dtype(self.config.compute_dtype))

    def velocity(self, model: DiT, x_t: jax.Array, t: jax.Array, labels: jax.Array) -> jax.Array:
        """v(x_t, t, y): the first ``in_channels`` output channels (SiT drops the sigma half)."""
        return model(x_t, t, labels)[..., : model.in_channels]

    def loss(self, model: DiT, batch, rng):
        x_data = batch["latent"] if "latent" in batch else batch["image"]
        rng_t, rng_noise, rng_drop = jax.random.split(rng, 3)
        t = jax.random.uniform(rng_t, (x_data.shape[0],))
        noise = jax.random.normal(rng_noise, x_data.shape)
        t_ = t[:, None, None, None]
        x_t = t_ * x_data + (1 - t_) * noise  # SiT linear path: alpha_t = t, sigma_t = 1 - t
        target = x_data - noise  # d/dt x_t
        labels = model.y_embedder.drop_labels(batch["label"], rng_drop)
        v = self.velocity(model, x_t, t, labels)
        loss = jnp.mean(jnp.square(v - target))
        return loss, {"loss": loss}

    def sample(self, model: DiT, rng: jax.Array, labels: jax.Array, *, num_steps: int | None = None,
               cfg_scale: float | None = None, method: str | None = None) -> jax.Array:
        """ODE sampling from noise at t=0 to data at t=1; returns (B, H, W, C) in the data's range."""
        s = self.config.sample
        num_steps = num_steps or s.num_steps
        cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        method = method or s.method
        m = self.config.model
        shape = (labels.shape[0], m.input_size, m.input_size, m.in_channels)
        x = jax.random.normal(rng, shape)
        null = jnp.full_like(labels, m.num_classes)

        def drift(x, t):
            tb = jnp.full((x.shape[0],), t)
            if cfg_scale == 1.0:
                return self.velocity(model, x, tb, labels)
            both = self.velocity(model, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]),
                                 jnp.concatenate([labels, null]))
            cond, uncond = jnp.split(both, 2)
            return uncond + cfg_scale * (cond - uncond)

        ts = jnp.linspace(0.0, 1.0, num_steps + 1)

        def step(x, i):
            t0, t1 = ts[i], ts[i + 1]
            d0 = drift(x, t0)
            x_euler = x + (t1 - t0) * d0
            if method == "euler":
                return x_euler, None
            d1 = drift(x_euler, t1)  # Heun: trapezoid on the two slopes
            return x + (t1 - t0) * 0.5 * (d0 + d1), None

        x, _ = jax.lax.scan(step, x, jnp.arange(num_steps))
        return x


# ----------------------------------------------------------------------------- conversion
# Upstream layout (DiT-XL-2-256x256.pt, SiT-XL-2-256x256.pt): torch state_dict, Linear (out, in),
# Conv (out, in, kh, kw).

def _linear(sd, prefix):
    return {"kernel": np.asarray(sd[prefix + ".weight"]).T, "bias": np.asarray(sd[prefix + ".bias"])}


def params_from_torch(sd: dict[str, np.ndarray], depth: int) -> dict:
    """Pure-dict params of :class:`DiT` from an upstream DiT/SiT state_dict."""
    params = {
        "x_embedder": {"kernel": np.asarray(sd["x_embedder.proj.weight"]).transpose(2, 3, 1, 0),
                       "bias": np.asarray(sd["x_embedder.proj.bias"])},
        "t_embedder": {"linear_1": _linear(sd, "t_embedder.mlp.0"), "linear_2": _linear(sd, "t_embedder.mlp.2")},
        "y_embedder": {"embedding": {"embedding": np.asarray(sd["y_embedder.embedding_table.weight"])}},
        "blocks": {},
        "final_layer": {"adaLN_modulation": _linear(sd, "final_layer.adaLN_modulation.1"),
                        "linear": _linear(sd, "final_layer.linear")},
    }
    for i in range(depth):
        p = f"blocks.{i}"
        params["blocks"][i] = {
            "attn": {"qkv": _linear(sd, p + ".attn.qkv"), "proj": _linear(sd, p + ".attn.proj")},
            "mlp": {"fc1": _linear(sd, p + ".mlp.fc1"), "fc2": _linear(sd, p + ".mlp.fc2")},
            "adaLN_modulation": _linear(sd, p + ".adaLN_modulation.1"),
        }
    return params


def _depth_of(sd) -> int:
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def _check_pos_embed(sd, model: DiT):
    if "pos_embed" in sd:
        ours = np.asarray(model.pos_embed[...])
        if ours.shape != sd["pos_embed"].shape or not np.allclose(ours, sd["pos_embed"], atol=1e-5):
            raise ValueError("checkpoint pos_embed differs from the fixed 2-D sin-cos embedding: "
                             f"shape {sd['pos_embed'].shape} vs ours {ours.shape}")


def load_into(model: DiT, sd: dict[str, np.ndarray]) -> DiT:
    _check_pos_embed(sd, model)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params_from_torch(sd, len(model.blocks))))
    nnx.update(model, state)
    return model


def import_dit(state_dict: dict[str, np.ndarray], config) -> dict:
    """IMPORTERS entry: upstream DiT/SiT checkpoint -> params for ``config.model``."""
    depth = _depth_of(state_dict)
    if depth != config.model.depth:
        raise ValueError(f"checkpoint has {depth} blocks but config.model.depth={config.model.depth}")
    model = build_network(config.model, nnx.Rngs(0))
    load_into(model, state_dict)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_dit_fixture(meta, params, buffers, inputs):
    """FIXTURE_CHECKS entry for kind ``dit``: forward and forward_with_cfg, NCHW in and out."""
    c = meta["constructor"]
    model = DiT(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
                hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"],
                mlp_ratio=c["mlp_ratio"], class_dropout_prob=c["class_dropout_prob"],
                num_classes=c["num_classes"], learn_sigma=c["learn_sigma"], rngs=nnx.Rngs(0))
    load_into(model, {**params, **buffers})
    nhwc = functools.partial(jnp.transpose, axes=(0, 2, 3, 1))
    nchw = functools.partial(np.transpose, axes=(0, 3, 1, 2))
    out = {"forward": nchw(np.asarray(model(nhwc(inputs["x"]), jnp.asarray(inputs["t"]),
                                            jnp.asarray(inputs["y"], jnp.int32))))}
    if "cfg_x" in inputs:
        out["forward_with_cfg"] = nchw(np.asarray(model.forward_with_cfg(
            nhwc(inputs["cfg_x"]), jnp.asarray(inputs["cfg_t"]), jnp.asarray(inputs["cfg_y"], jnp.int32),
            float(inputs["cfg_scale"]))))
    return out


FIXTURE_CHECKS = {"dit": check_dit_fixture}
IMPORTERS = {"dit": import_dit, "sit": import_dit}
