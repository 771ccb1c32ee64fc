"""MAR's KL-16 VAE (LDM AutoencoderKL, f16, 16 channels) trained with LPIPS + PatchGAN.

    python -m trainers.main --config=configs/kl_vae_f16.py --workdir=DIR
    python -m trainers.main --config=configs/kl_vae_f16.py:demo --workdir=DIR   # laptop CPU, embedded MNIST

Architecture from LTH14/mar models/vae.py (AutoencoderKL(embed_dim=16,
ch_mult=(1,1,2,2,4))); the objective and its weights from LDM's
``configs/autoencoder/autoencoder_kl_*.yaml`` (LPIPSWithDiscriminator:
kl_weight 1e-6, disc_start 50001, disc_weight 0.5; Adam betas (0.5, 0.9),
lr = 4.5e-6 x global batch). Variants: "" (ImageNet 256) and "demo".

A generator uses a KL-VAE through ``config.tokenizer`` (trainers/decode.py): the published MAR
``kl16.ckpt`` (kind "kl16", this file's network) or a workdir of this config (kind "workdir"),
whose latents ``python -m trainers.cache_latents --tokenizer_workdir=DIR`` caches.
"""

from __future__ import annotations

import ml_collections

from configs import common


def vae_loss() -> ml_collections.ConfigDict:
    loss = ml_collections.ConfigDict()
    loss.rec_loss = "l1"  # "l1" | "l2"
    loss.perceptual_weight = 1.0  # LPIPS-VGG16; needs vgg_path
    loss.vgg_path = ""  # torchvision's vgg16-397923af.pth (https://download.pytorch.org/models/vgg16-397923af.pth)
    loss.lpips_lin_path = ""  # lpips' weights/v0.1/vgg.pth ("" = the copy inside the installed `lpips` wheel)
    loss.kl_weight = 1e-6
    loss.logvar_init = 0.0
    loss.disc_start = 50001  # discriminator and G-loss off before this step (taming adopt_weight)
    loss.disc_weight = 0.5
    loss.disc_factor = 1.0
    loss.disc_loss = "hinge"  # "hinge" | "non_saturating"
    loss.gen_loss = "hinge"  # "hinge" (-E[D]) | "non_saturating"
    loss.adaptive_weight = True  # LDM's gradient-norm ratio at the decoder's last layer
    loss.disc_ndf = 64
    loss.disc_layers = 3
    loss.lecam_weight = 0.0  # LDM uses none; MaskGIT/TiTok use 0.001
    loss.lecam_decay = 0.999
    return loss


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or ""
    if variant not in ("", "demo"):
        raise ValueError(f"configs/kl_vae_f16.py: unknown variant {variant!r}; use '' or 'demo'")
    c = common.base()
    m = c.model
    m.name = "kl_vae"
    m.embed_dim = 16
    m.ch = 128
    m.ch_mult = (1, 1, 2, 2, 4)
    m.num_res_blocks = 2
    m.enc_attn_resolutions = (16,)  # with resolution 256: attention at the 16x16 level of the encoder
    m.dec_attn_resolutions = ()
    m.resolution = 256  # nominal size that places the attention blocks (upstream constructor arg)
    m.norm_groups = 32
    m.use_variational = True
    m.scale_factor = 0.2325  # MAR/xAR: latents = posterior sample * 0.2325
    m.loss = vae_loss()

    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.batch_size = 96
    c.num_steps = 500_000
    c.optim.lr = 4.5e-6 * c.batch_size
    c.optim.b1, c.optim.b2 = 0.5, 0.9
    c.optim.grad_clip = 0.0
    c.optim.schedule = "constant"
    c.ema_rate = 0.9999
    c.sample_every = 5000  # reconstruction grids

    if variant == "demo":
        # Minutes on a laptop CPU: the embedded MNIST digits at 32x32, an f4 model, no LPIPS
        # (VGG16 weights cannot be downloaded here), the discriminator switched on halfway.
        c.data.name = "mnist_embedded"
        c.data.image_size = 32
        c.data.channels = 1
        c.data.num_classes = 10
        m.embed_dim = 4
        m.ch = 32
        m.ch_mult = (1, 2, 2)
        m.num_res_blocks = 1
        m.enc_attn_resolutions = ()
        m.resolution = 32
        m.scale_factor = 1.0
        m.loss.perceptual_weight = 0.0
        m.loss.disc_start = 300
        m.loss.disc_ndf = 16
        m.loss.disc_layers = 2
        c.batch_size = 16
        c.num_steps = 600
        c.optim.lr = 2e-4
        c.log_every = 50
        c.checkpoint_every = 300
        c.sample_every = 300
        # Reconstructions (grids, and a paired generator's decoding: trainers/decode.py) use the raw
        # generator params, as LDM's autoencoders have no EMA; 600 steps are too few for a 0.9999 EMA.
        c.sample.use_ema = False
    return c
