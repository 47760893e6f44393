"""Extraction options: precisions (fp16 falls back to fp32 on the CPU, bf16 runs there), compiled forward, padding."""

import numpy as np
import pytest
import torch

from reidcli.engine.extract import embed_images, resolve_precision
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


def test_cpu_precisions_fp32_by_default_bf16_on_request():
    model = _model()
    images = np.random.default_rng(2).integers(0, 256, (6, 32, 16, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    fp32 = embed_images(model, images, cpu, precision="fp32")
    for same in ("auto", "fp16"):  # CPUs have no fast float16 products: fp16 means fp32 there
        np.testing.assert_array_equal(embed_images(model, images, cpu, precision=same), fp32)
    bf16 = embed_images(model, images, cpu, precision="bf16")
    assert bf16.dtype == np.float32 and not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, atol=1e-5)
    assert (bf16 * fp32).sum(1).min() > 0.999
    cuda = torch.device("cuda")
    assert [resolve_precision(p, cuda) for p in ("auto", "fp16", "bf16", "fp32")] == ["fp16", "fp16", "bf16", "fp32"]
    assert [resolve_precision(p, cpu) for p in ("auto", "fp16", "bf16", "fp32")] == ["fp32", "fp32", "bf16", "fp32"]


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


def test_model_linear_layers_run_through_onednn_on_the_cpu_with_the_same_outputs_and_gradients():
    """Every Linear of the model is reidcli.onednn.Linear (an nn.Linear): on the CPU in float32 its products go
    through oneDNN, forward, input gradient and weight gradient (transposed operands read in place); outputs and every
    gradient equal torch's own F.linear's."""
    from reidcli.onednn import Linear, _transposed_operands_ok, cpu_gemm_way

    model = _model()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Linear for m in linears) and cpu_gemm_way() == "onednn"
    assert _transposed_operands_ok()
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((5, 3, 32, 16)).astype(np.float32))

    def run():
        model.zero_grad()
        out = model.forward_features(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fast, fast_grads = run()
    plain = torch.nn.functional.linear
    orig = Linear.forward
    Linear.forward = lambda self, inp: plain(inp, self.weight, self.bias)
    try:
        ref, ref_grads = run()
    finally:
        Linear.forward = orig
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    assert len(fast_grads) == len(ref_grads) >= 3 * len(linears)  # the linears' weights and biases among them
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        assert a.is_contiguous()  # the widening layers' weight gradients are computed transposed, then copied
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 16, 3), dtype=np.uint8)
    assert np.isfinite(embed_images(model, images, torch.device("cpu"), batch=2)).all()


def test_inference_fuses_fc1_and_gelu_with_the_same_features():
    """Without gradients each MLP's fc1 and exact GELU are one oneDNN operator on the CPU; the forward equals the
    unfused one (timm's Mlp.forward), and with gradients the unfused path (which keeps the pre-activation) runs."""
    from unittest import mock

    import reidcli.model.attention as attention
    import reidcli.onednn as onednn
    from reidcli.model.attention import Mlp

    model = _model().eval()
    assert onednn._gelu_post_op_ok()
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 3, 32, 16)).astype(np.float32))
    with mock.patch.object(attention, "linear_gelu", wraps=onednn.linear_gelu) as fused:
        with torch.no_grad():
            fast = model.forward_features(x)
        assert fused.call_count == model.cfg.depth
        with mock.patch.object(Mlp, "forward", lambda self, h: super(Mlp, self).forward(h)), torch.no_grad():
            plain = model.forward_features(x)
        fused.reset_mock()
        with_grad = model.forward_features(x)
        assert fused.call_count == 0 and with_grad.requires_grad
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(with_grad.detach(), plain, rtol=0, atol=1e-6)


def test_bf16_autocast_inference_fuses_fc1_and_gelu_on_bf16_operands():
    """Under the CPU's bf16 autocast the fused operator gets bf16 operands, cast as autocast would cast them: a bf16
    output within bf16 rounding of autocast's own F.linear + F.gelu."""
    from unittest import mock

    import reidcli.onednn as onednn
    from reidcli.model.attention import Mlp

    assert onednn._gelu_post_op_ok(torch.bfloat16)
    torch.manual_seed(0)
    mlp = Mlp(32, 128).eval()
    x = torch.randn(5, 7, 32)
    op = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with mock.patch.object(torch.ops.mkldnn, "_linear_pointwise", wraps=op) as fused:
            got = mlp(x)
        assert any(c.args[3] == "gelu" and c.args[0].dtype == torch.bfloat16 for c in fused.call_args_list)
        ref = super(Mlp, mlp).forward(x)
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_probes_first_made_inside_bf16_autocast_still_check_in_float32():
    """In a fresh process whose first oneDNN use is under bf16 autocast (``reid extract --precision bf16``), the
    once-per-process probes still compare against float32 products (they failed with a dtype error before)."""
    import subprocess
    import sys

    code = (
        "import torch\nfrom reidcli.model.attention import Mlp\nm = Mlp(32, 128).eval()\n"
        "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n    y = m(torch.randn(3, 5, 32))\n"
        "from reidcli.onednn import _gelu_post_op_ok, _transposed_operands_ok, cpu_gemm_way\n"
        "print(y.dtype, cpu_gemm_way(), _gelu_post_op_ok(), _gelu_post_op_ok(torch.bfloat16), "
        "_transposed_operands_ok())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["torch.bfloat16", "onednn", "True", "True", "True"]


def test_dataset_images_are_streamed_batch_by_batch(tiny_data, monkeypatch):
    """`reid extract` reads a split's images from the file a batch at a time (Market-size: peak 3.1 → 1.3 GB, and
    22.5 → 17.2 s, reading overlapping nothing before): the features equal those of the images read whole."""
    import h5py

    from reidcli.data.store import open_splits, read_dataset
    from reidcli.engine import extract

    torch.manual_seed(0)
    model = ViTReID(ModelConfig(pe="both", image_size=(64, 32), dim=32, depth=1, heads=2, drop_path=0.0))
    seen = []
    original = extract.embed_images
    monkeypatch.setattr(
        extract, "embed_images", lambda m, images, *a: seen.append(type(images)) or original(m, images, *a)
    )
    streamed = extract.embed_dataset(model, tiny_data, ("query", "gallery"), torch.device("cpu"), batch=7)
    assert seen == [h5py.Dataset, h5py.Dataset]
    _, whole = read_dataset(tiny_data, ("query", "gallery"))
    for split in ("query", "gallery"):
        np.testing.assert_array_equal(
            streamed[split].feats, original(model, whole[split].images, torch.device("cpu"), 7)
        )
        assert streamed[split].paths == whole[split].paths
    with open_splits(tiny_data, ("query",)) as (_, parts):
        assert isinstance(parts["query"].images, h5py.Dataset)
    assert not parts["query"].images  # the file is closed after the block
