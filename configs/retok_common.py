"""ReTok tokenizer configs, shared by configs/retok_ss.py (S-S, 136M) and configs/retok_sb.py (S-B, 232M).

Upstream zfu006/ReTok ``configs/vq/VQ_S{S,B}256.yaml`` (GigaTok hybrid tokenizer) and the paper's
training (the training code is not released; notes shared/methods/retok_*.md). Variants
(comma-separated): "" (the paper's recipe; needs the DINOv2-B/14 and LPIPS-VGG16 files), "demo" (the
embedded digits on a laptop CPU; add ``--config.model.hsr.teacher_path=...`` for HSR), "baseline"
(the same tokenizer without Redundant Token Padding and with uniform semantic weight: nested
dropout over the N tokens only, GigaTok's ``proj_loss``), "released" (import/evaluation of
``VQ_SB256_e250.pt``: no training files needed).

    python -m trainers.convert import retok VQ_SB256_e250.pt --config=configs/retok_sb.py:released --out=DIR
    python -m trainers.main --config=configs/retok_ss.py --workdir=DIR \\
        --config.model.hsr.teacher_path=dinov2_vitb14_pretrain.pth --config.model.loss.vgg_path=vgg16.pth

The demo comparison (quality against the number of kept tokens k, equal steps; HSR needs DINOv2 weights,
so on the digits it compares padding + nested dropout over N + M with nested dropout over N only):

    python -m trainers.main --config=configs/retok_ss.py:demo --workdir=RETOK
    python -m trainers.main --config=configs/retok_ss.py:demo,baseline --workdir=BASE
    python -m tokenizers.retok_cli evaluate --workdir=RETOK --workdir=BASE --ks=1,2,4,8,16,32,64,96,120 \
        --num_images=500 --out=OUT

Measured (320 steps each, 500 digits; PSNR dB ReTok / baseline): k=2 11.35 / 12.52, k=8 13.07 / 13.27,
k=16 13.52 / 13.42, k=64 13.72 / 13.37 (MNIST-rFID 780 / 963): the baseline packs more into the first
tokens, ReTok's later tokens carry more (+0.65 dB from k=8 to 64 against +0.10).
"""

from __future__ import annotations

import ml_collections

from configs import common

# (width, depth, heads): upstream blocks.py "small" / "base" (GigaTok: small has 6 layers)
VIT = {"S": (512, 6, 8), "B": (768, 12, 12)}
IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(encoder: str, decoder: str, arg: str | None) -> ml_collections.ConfigDict:
    variants = [a for a in (arg or "").split(",") if a]
    unknown = set(variants) - {"demo", "baseline", "released"}
    if unknown:
        raise ValueError(f"ReTok config variants: demo, baseline, released; got {arg!r}")
    vit = lambda s: ml_collections.ConfigDict(dict(zip(("width", "depth", "heads"), VIT[s])))  # noqa: E731
    c = common.base()
    m = c.model
    m.name = "retok"
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels = 128, (1, 1, 2, 2, 4), 2, 256
    m.encoder, m.decoder = vit(encoder), vit(decoder)
    m.num_latent_tokens = 256
    m.num_padding = 224  # Redundant Token Padding: copies of queries 32..255 (released code: N - 32)
    m.codebook_size, m.codebook_embed_dim, m.commitment_cost = 16384, 8, 0.25
    m.rot = True  # the rotation trick
    m.entropy_loss_ratio = 0.0  # LlamaGen/GigaTok VQ entropy loss (released configs: 0)
    m.adaptive_gn, m.d2s_up = True, True
    m.unbiased_style_var = True  # torch.var in AdaptiveGroupNorm (unbiased, as released)
    m.norm_groups = 32  # GroupNorm groups of the CNN encoder/decoder (upstream Normalize(): 32, hard-coded)
    m.pos_init_std = 0.0  # std of the ViT position tables at init; 0 = upstream's width^-0.5
    m.distill_depth = 3  # ViT-decoder layer whose states are aligned (HSR)
    m.out_inner_dim = 768  # DINOv2-B width
    # Nested dropout over the padded sequence: k ~ U{min_tokens .. N + M} (choice: uniform, per example).
    m.nested_dropout = True
    m.min_tokens = 32
    m.prefix_sampling = "example"  # "example" | "batch" (choice)
    # HSR: w(k) x -cos(distill_mlp(decoder layer 3), DINOv2 patch tokens); w_max 0.5 = upstream proj_weight.
    m.hsr = ml_collections.ConfigDict(dict(
        weight=0.5, schedule="linear", gamma=0.7,  # schedule: linear | level_geometric | const (choice)
        teacher_path="",  # dinov2_vitb14_pretrain.pth (dl.fbaipublicfiles.com/dinov2) or HF dinov2-base
        teacher_width=768, teacher_depth=12, teacher_heads=12))
    m.loss = ml_collections.ConfigDict(dict(
        l2_weight=1.0, perceptual_weight=1.0, vgg_path="", lpips_lin_path="",
        vq_weight=1.0, fea_rec_weight=1.0, aux_loss_end=15_000,
        disc_weight=0.5, disc_start=0, disc_ndf=64, disc_layers=3))
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.channels = 3
    c.data.num_classes = 1000
    c.batch_size = 128
    c.num_steps = 250 * IMAGENET_TRAIN_IMAGES // c.batch_size  # "e250"
    # Decoder-only fine-tuning for the last ~10% of steps (choice; upstream hook freeze_but_decoder_iter).
    m.decoder_finetune_start = int(0.9 * c.num_steps)
    o = c.optim
    o.lr, o.min_lr, o.weight_decay = 1e-4, 1e-5, 1e-4
    o.b1, o.b2 = 0.9, 0.95
    o.grad_clip = 10.0
    o.schedule = "cosine"
    o.warmup_steps = 0
    c.ema_rate = 0.9999
    c.sample_every = 5000
    c.checkpoint_every = 5000
    if "baseline" in variants:
        m.num_padding = 0
        m.hsr.schedule = "const"
    if "released" in variants:
        m.hsr.weight = 0.0
        m.loss.perceptual_weight = 0.0
    if "demo" in variants:
        # Minutes on a laptop CPU: 32x32 digits, f = 4 (an 8x8 ViT grid), N = 64 tokens + 56 padding.
        common.embedded_demo_data(c, image_size=32)
        m.ch, m.ch_mult, m.num_res_blocks, m.z_channels = 32, (1, 1, 1), 1, 32
        m.encoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4))
        m.decoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4))
        m.num_latent_tokens = 64
        m.num_padding = 0 if "baseline" in variants else 56  # N - min_tokens, as released (N - 32)
        m.min_tokens = 8
        m.codebook_size, m.codebook_embed_dim = 512, 8
        m.distill_depth = 1
        m.hsr.weight = 0.0  # DINOv2 weights cannot be downloaded here: set weight and teacher_path for HSR
        m.loss.perceptual_weight = 0.0
        # Implementation choices of the demo (the paper's defaults above stay), found with
        # ``python -m tokenizers.retok_cli probe --config=configs/retok_ss.py:demo --one_batch --steps=90``:
        # * norm_groups 8: at 32 channels upstream's GroupNorm(32) is an InstanceNorm, which removes the
        #   spatially constant part of every channel -- exactly the image information the Q-Former
        #   decoder emits early on (its g*g queries are one token repeated) -- so the pixel decoder put
        #   out the mean digit whatever the codes: with 32 groups (entropy loss off) even one batch of 16
        #   digits was not overfitted in 90 steps (MSE 0.223, the batch's mean image 0.221); on the
        #   stream the reconstructions' variance across images fell to 0.001 (0.005 with 8 groups).
        #   8 groups keep upstream's 4 channels per group of its first CNN level (128 / 32).
        # * pos_init_std 1: upstream's width^-0.5 position tables leave the decoder's queries (and so its
        #   cross-attention) nearly position-independent at width 64; with unit tables and 8 groups the
        #   one-batch probe reached MSE 0.194 at step 90 and kept falling (1 group alone: 0.215; unit
        #   tables alone, on the stream: the mean image).
        # * The GAN only in the decoder-only phase, at 0.1, and the feature reconstruction until then:
        #   the hinge G-loss at 0.5 from step 150 of 300 pulled the l2 loss from 0.24 back to 0.38 (and
        #   from step 240 of 320, with the feature loss ending there, from 0.19 to 0.32).
        # * The VQ entropy loss of LlamaGen/GigaTok's quantizer (0 in the released configs): a 512-code
        #   codebook on 64 + 56 tokens collapses to one or two codes within 100 steps without it.
        m.norm_groups = 8
        m.pos_init_std = 1.0
        m.entropy_loss_ratio = 0.1
        c.batch_size = 16
        c.num_steps = 320
        m.loss.aux_loss_end = 288
        m.loss.disc_start = 288
        m.loss.disc_weight = 0.1
        m.loss.disc_ndf = 16
        m.loss.disc_layers = 2
        m.decoder_finetune_start = 288
        o.lr, o.min_lr = 1e-3, 1e-4
        o.schedule = "warmup_cosine"
        o.warmup_steps = 50
        c.ema_rate = 0.99
        c.checkpoint_every = c.num_steps
        c.sample_every = 0
        c.num_grid_samples = 16
        c.eval.num_samples = 0
    return c
