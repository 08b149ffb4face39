"""explain.saliency against independent computations in plain torch autograd (no captum).

Each attribution method is recomputed by hand from its definition on small
randomly initialised networks and compared numerically:

* gradient: ``|∂ logit_t / ∂ x|``;
* integrated gradients from the all-zero baseline: captum's default rule is
  Gauss–Legendre quadrature with ``n_steps`` nodes, rebuilt here from numpy's
  nodes and weights (exact agreement); a plain Riemann midpoint sum with many
  steps must agree too (the two rules converge to the same integral), and the
  reference itself satisfies completeness (its sum is ``f(x) - f(0)``);
* SmoothGrad: the mean of ``|gradient|`` over Gaussian-noised copies
  (σ = ``noise_level``): our own noise, so the comparison is statistical,
  with a tolerance that a wrong σ or plain gradients exceed;
* Grad-CAM: activations and gradients of the last convolutional block read
  with a forward hook, weights = spatial mean of the gradients, ReLU of the
  weighted sum, bilinear upsampling to the image, the same map on every channel.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_omicsimage.explain import saliency
from napari_omicsimage.models import build_model

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _network(name="small", in_channels=2, n_classes=3, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, in_channels, n_classes).eval()
    with torch.no_grad():  # random but non-trivial BatchNorm statistics, so no layer is an identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _images(n=3, channels=2, size=16, seed=1):
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


def _gradient(model, x, target):
    """Signed ``∂ logit[target] / ∂ x`` for a batch ``x`` (float32 tensor), targets one per row."""
    x = x.detach().clone().requires_grad_(True)
    logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return grad


def _predicted(model, images):
    with torch.no_grad():
        return model(torch.as_tensor(images)).argmax(1)


def test_gradient_is_the_absolute_input_gradient():
    model, images = _network(), _images()
    target = _predicted(model, images)
    expected = _gradient(model, torch.as_tensor(images), target).abs().numpy()
    np.testing.assert_allclose(saliency(model, images, "gradient"), expected, rtol=1e-5, atol=1e-8)


def _integrated_gradients(model, images, target, alphas, weights):
    """Signed IG from the zero baseline: x · Σ_k w_k ∂f(α_k x)/∂x."""
    x = torch.as_tensor(images)
    total = torch.zeros_like(x)
    for alpha, weight in zip(alphas, weights):
        total += float(weight) * _gradient(model, float(alpha) * x, target)
    return (x * total).numpy()


#: relative distance allowed between our few-node quadrature and a 512-step Riemann sum
RIEMANN_TOLERANCE = {8: 0.2, 32: 0.05}


@pytest.mark.parametrize("n_steps", [8, 32])
def test_integrated_gradients_match_a_hand_quadrature(n_steps):
    model, images = _network(), _images()
    target = torch.tensor([2, 0, 1])
    nodes, node_weights = np.polynomial.legendre.leggauss(n_steps)  # on [-1, 1]
    gauss = _integrated_gradients(model, images, target, (nodes + 1) / 2, node_weights / 2)
    ours = saliency(model, images, "integrated-gradients", target=target.numpy(), n_steps=n_steps)
    np.testing.assert_allclose(ours, np.abs(gauss), rtol=1e-4, atol=1e-6 * np.abs(gauss).max())

    # a Riemann midpoint sum with many steps approaches the same integral ...
    m = 512
    riemann = _integrated_gradients(model, images, target, (np.arange(m) + 0.5) / m, np.full(m, 1 / m))
    error = np.linalg.norm(ours - np.abs(riemann)) / np.linalg.norm(riemann)
    assert error < RIEMANN_TOLERANCE[n_steps], error
    # ... and satisfies completeness: the signed attributions add up to f(x) - f(baseline), per image
    with torch.no_grad():
        x = torch.as_tensor(images)
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, target[:, None])[:, 0].numpy()
    assert riemann.reshape(3, -1).sum(axis=1) == pytest.approx(gap, rel=0.01, abs=1e-4)


def _smoothgrad(model, images, target, sigma, n, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(images)
    total = torch.zeros_like(x)
    for _ in range(n):
        noisy = x + sigma * torch.randn(x.shape, generator=generator)
        total += _gradient(model, noisy, target).abs()
    return (total / n).numpy()


def test_smoothgrad_is_the_mean_absolute_gradient_under_gaussian_noise():
    model, images = _network(), _images()
    target = _predicted(model, images)
    sigma = 0.15
    ours = saliency(model, images, "smoothgrad", n_samples=400, noise_level=sigma, seed=3)
    reference = _smoothgrad(model, images, target, sigma, 1600, seed=11)

    def distance(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # Monte-Carlo error of 400 + 1600 noisy samples: measured 0.037-0.040 over five seeds of ours
    assert distance(ours, reference) < 0.06
    # the tolerance separates the method from what it is not: no noise (plain gradient: 0.58 away), or
    # twice the σ (0.18 away; 0.8 σ is already 0.076 away)
    plain = _gradient(model, torch.as_tensor(images), target).abs().numpy()
    assert distance(plain, reference) > 0.15
    assert distance(_smoothgrad(model, images, target, 2 * sigma, 400, seed=5), reference) > 0.15
    # seeded: the same call gives the same map
    np.testing.assert_array_equal(ours, saliency(model, images, "smoothgrad", n_samples=400,
                                                 noise_level=sigma, seed=3))


def _gradcam(model, block, images, target):
    """Grad-CAM by hand: hook the block's output, weight it by its spatially averaged gradient."""
    captured = {}
    handle = block.register_forward_hook(lambda module, inputs, output: captured.__setitem__("a", output))
    try:
        x = torch.as_tensor(images)
        logits = model(x)
        activation = captured["a"]
        (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), activation)
    finally:
        handle.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=images.shape[2:], mode="bilinear", align_corners=False)
    return cam.expand(-1, images.shape[1], -1, -1).detach().numpy()


@pytest.mark.parametrize(("name", "size", "block", "target"), [
    ("small", 16, lambda m: m.features, [3, 1]),  # the three conv-BN-ReLU blocks; output of the last one
    ("small", 16, lambda m: m.features, None),  # None: each image's predicted class
    ("resnet18", 64, lambda m: m.layer4, [3, 1]),
    ("efficientnet_b0", 64, lambda m: m.features, [2, 3]),
], ids=["small", "small-predicted-class", "resnet18", "efficientnet_b0"])
def test_gradcam_matches_hooked_activations_and_gradients(name, size, block, target):
    # seed 1 and these targets: every image's map has a positive part (a random network's Grad-CAM
    # for some classes is zero everywhere after the ReLU, which would match anything clamped at zero)
    model = _network(name, in_channels=1, n_classes=4, seed=1)
    images = _images(n=2, channels=1, size=size)
    targets = _predicted(model, images) if target is None else torch.tensor(target)
    expected = _gradcam(model, block(model), images, targets)
    ours = saliency(model, images, "gradcam", target=target)
    assert (expected.reshape(2, -1).max(axis=1) > 0).all()
    assert ours.shape == images.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6 * expected.max())
