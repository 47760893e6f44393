"""Extraction options: precisions (CUDA-only ones fall back to fp32 on the CPU), compiled forward, padding."""

import numpy as np
import pytest
import torch

from reidcli.engine.extract import embed_images
from reidcli.errors import ConfigError
from reidcli.model.vit import ModelConfig, ViTReID


def _model():
    torch.manual_seed(0)
    return ViTReID(ModelConfig(pe="both", image_size=(32, 16), dim=32, depth=1, heads=2, drop_path=0.0))


def test_compiled_forward_pads_the_last_batch_and_matches_eager():
    model = _model()
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 16, 3), dtype=np.uint8)
    eager = embed_images(model, images, torch.device("cpu"), batch=4, flip=True)
    compiled = embed_images(model, images, torch.device("cpu"), batch=4, flip=True, compile_=True)
    assert compiled.shape == (10, 32)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(eager, axis=1), 1.0, atol=1e-5)


def test_flip_is_the_mean_of_image_and_mirror():
    model = _model().eval()
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 16, 3), dtype=np.uint8)
    both = embed_images(model, images, torch.device("cpu"), flip=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        f = model.forward_features(x)[:, 0] + model.forward_features(x.flip(3))[:, 0]
    np.testing.assert_allclose(both, torch.nn.functional.normalize(f, dim=1).numpy(), atol=1e-5)


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown precision"):
        embed_images(_model(), np.zeros((1, 32, 16, 3), np.uint8), torch.device("cpu"), precision="int8")


def test_staged_batches_keep_order_and_padding_with_a_helper_thread():
    """The GPU's staging (a helper thread preparing the next batch) yields what the plain loop yields."""
    from reidcli.engine.extract import _staged_batches

    images = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    plain = list(_staged_batches(images, 4, pad=True))
    threaded = list(_staged_batches(images, 4, pad=True, ahead=torch.Tensor.clone))
    assert [(i, n) for i, _, n in threaded] == [(0, 4), (4, 4), (8, 2)] == [(i, n) for i, _, n in plain]
    for (_, a, _), (_, b, _) in zip(plain, threaded, strict=True):
        assert a.shape == (4, 2, 2, 3) and torch.equal(a, b)
    assert torch.equal(threaded[-1][1][:2], torch.from_numpy(images[8:])) and not threaded[-1][1][2:].any()
    assert list(_staged_batches(images[:0], 4, pad=False, ahead=torch.Tensor.clone)) == []


def test_failed_graph_capture_warns_once_and_embeds_eagerly():
    """A graph that cannot be captured (here: no CUDA at all) costs a warning, never a feature: the same output as
    the eager forward, and no second attempt."""
    import warnings

    from reidcli.engine.extract import _Embed

    model = _model().eval()
    x = torch.rand(3, 3, 32, 16) * 2 - 1
    embed = _Embed(model.embed, autocast=False, graph=True)
    with pytest.warns(UserWarning, match="CUDA graph of the extraction forward failed"), torch.no_grad():
        first = embed(x, True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        again = embed(x, True)
        assert torch.equal(first, model.embed(x, flip=True)) and torch.equal(again, first)
    assert not embed.graph


def test_cuda_graph_option_is_silent_on_the_cpu():
    import warnings

    images = np.random.default_rng(2).integers(0, 256, (5, 32, 16, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = embed_images(_model(), images, torch.device("cpu"), batch=2, cuda_graph=True)
    np.testing.assert_array_equal(a, embed_images(_model(), images, torch.device("cpu"), batch=2, cuda_graph=False))


def test_cpu_extraction_runs_linear_layers_through_onednn_on_a_sharing_copy():
    """The CPU's inference copy swaps every Linear for oneDNN's operator, shares all weights, leaves the model
    itself untouched (it still trains), and embeds as the plain forward does."""
    from reidcli.engine.extract import _cpu_inference_model, _OneDnnLinear

    model = _model()
    fast = _cpu_inference_model(model)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    swapped = [m for m in fast.modules() if isinstance(m, _OneDnnLinear)]
    assert linears and len(swapped) == len(linears) and not any(type(m) is torch.nn.Linear for m in fast.modules())
    assert [p.data_ptr() for p in fast.parameters()] == [p.data_ptr() for p in model.parameters()]
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 16, 3), dtype=np.uint8)
    feats = embed_images(model, images, torch.device("cpu"), batch=2, flip=True)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    model.eval()
    with torch.no_grad():
        f = model.forward_features(x)[:, 0] + model.forward_features(x.flip(3))[:, 0]
    np.testing.assert_allclose(feats, torch.nn.functional.normalize(f, dim=1).numpy(), atol=1e-5)
    model.train()
    model.forward_features(x)[:, 0].sum().backward()  # the model's own layers keep autograd
    assert all(m.weight.grad is not None for m in linears)
