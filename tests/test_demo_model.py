"""The shipped demo weights: the digits DiT loads, samples recognisable digits, and is reproducible."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("diffusers")

from smoothcache_fx.demo.classifier import classify, load_digits_classifier  # noqa: E402
from smoothcache_fx.demo.model import NUM_CLASSES, demo_info, generate, load_demo_model  # noqa: E402

STEPS = 10  # few steps keep the module fast; demo_info()'s accuracies are for 50 steps


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batches of 16-token images are too small to gain from threads; on a shared CPU two threads
    spin against other work: its tests took 37 s instead of 2 s (measured under load 3-4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()


def test_model_loads_in_eval_mode_with_shipped_config(model):
    assert not model.training
    assert model.config.sample_size == 8 and model.config.in_channels == 1
    assert len(model.transformer_blocks) == demo_info()["dit_config"]["num_layers"]


def test_generate_shapes_range_and_recognisable_digits(model, classifier):
    labels = torch.arange(NUM_CLASSES).repeat(2)
    images = generate(model, labels, STEPS, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2 * NUM_CLASSES, 1, 8, 8)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert images.min() >= -1.0 and images.max() <= 1.0
    # The shipped weights score 20/20 here for seeds 0-4 (200 samples at 50 steps: 98.5%, see
    # demo_info()); 0.8 leaves room for platform numerics yet fails untrained or mis-loaded weights.
    accuracy = (classify(images, classifier) == labels).float().mean().item()
    assert accuracy >= 0.8, accuracy


def test_generate_is_reproducible_with_a_fixed_generator(model):
    labels = [3, 8]
    first = generate(model, labels, 4, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    second = generate(model, labels, 4, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    other = generate(model, labels, 4, guidance_scale=1.0, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_one_model_call_per_step_with_guidance(model):
    calls = []
    handle = model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(args[0].shape[0]), with_kwargs=True
    )
    try:
        generate(model, [0, 1, 2], 5, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert calls == [6] * 5  # cond and null-class halves in one batch, one call per DDIM step


def test_generate_rejects_out_of_range_labels(model):
    with pytest.raises(ValueError, match="class_labels must lie in"):
        generate(model, [10], 2)


def test_classifier_is_accurate_on_real_digits(classifier):
    pytest.importorskip("sklearn")
    from smoothcache_fx.demo.train import load_digits_tensors, test_mask

    images, labels = load_digits_tensors()
    held_out = test_mask(len(labels))
    accuracy = (classify(images[held_out], classifier) == labels[held_out]).float().mean().item()
    assert accuracy >= 0.97, accuracy


@pytest.mark.parametrize(("size", "header_read"), [(4, False), (200_000, True)])
def test_truncated_weights_name_the_file_and_the_fix(tmp_path, size, header_read):
    from smoothcache_fx.demo.classifier import CLASSIFIER_WEIGHTS, DigitsClassifier
    from smoothcache_fx.demo.weights import WEIGHTS_DIR, load_shipped_weights

    path = tmp_path / CLASSIFIER_WEIGHTS
    shutil.copyfile(WEIGHTS_DIR / CLASSIFIER_WEIGHTS, path)
    full = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size)  # 4 bytes cut the header's length short; 200 kB keep the header, not the data
    with pytest.raises(ValueError) as info:
        load_shipped_weights(DigitsClassifier(), CLASSIFIER_WEIGHTS, "classifier", directory=tmp_path)
    message = str(info.value)
    sizes = f"{size} bytes of the {full} its header names" if header_read else f"{size} bytes"
    assert message.startswith(
        f"classifier weights at {path} must be a complete safetensors file; got {sizes}, "
    ), message
    assert "The file is damaged" in message and "reinstall the package" in message
    assert type(info.value.__cause__).__name__ == "SafetensorError"
