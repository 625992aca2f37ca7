"""Property tests: random valid configurations build, run, agree across attention backends and save exactly; random
invalid ones raise `ValueError`.

Bounded for the suite: a fixed number of examples, a per-example deadline, and derandomised so that every run tries
the same examples (a failure found here reproduces).
"""

import copy
import tempfile
from datetime import timedelta

import torch
from conftest import out_of_the_memory_map
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomModel

BOUNDED = settings(max_examples=25, deadline=timedelta(seconds=10), derandomize=True, database=None)


@st.composite
def valid_configs(draw) -> dict:
    """Small but varied: rectangular patches and grids, 1-3 channels, both poolings, with and without qkv bias."""
    patch = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    grid = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    heads = draw(st.integers(1, 4))
    square = patch[0] == patch[1] and grid[0] == grid[1]
    image = patch[0] * grid[0] if square and draw(st.booleans()) else [patch[0] * grid[0], patch[1] * grid[1]]
    return {
        "image_size": image,
        "patch_size": patch[0] if square and isinstance(image, int) else list(patch),
        "num_channels": draw(st.integers(1, 3)),
        "hidden_size": heads * draw(st.sampled_from([2, 4, 8])),
        "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads,
        "intermediate_size": draw(st.integers(1, 32)),
        "hidden_act": draw(st.sampled_from(["gelu", "relu", "gelu_new"])),
        "qkv_bias": draw(st.booleans()),
        "pooling": draw(st.sampled_from(["cls", "mean"])),
        "num_labels": draw(st.integers(2, 4)),
        "layer_norm_eps": draw(st.sampled_from([1e-6, 1e-12])),
    }


def pixels(config: ViTCustomConfig, batch: int, seed: int) -> torch.Tensor:
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    return torch.randn(batch, config.num_channels, height, width, generator=torch.Generator().manual_seed(seed))


@BOUNDED
@given(values=valid_configs(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_valid_configs_run_with_the_right_shapes_and_backends_agree(values, batch, seed):
    torch.manual_seed(seed)
    config = ViTCustomConfig(**values)
    # A configuration of its own for each model: `_from_config` records the backend on the one it is given.
    eager = ViTCustomForImageClassification._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    sdpa = ViTCustomForImageClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    inputs = pixels(config, batch, seed)
    with torch.no_grad():
        eager_out = eager(inputs, output_hidden_states=True)
        sdpa_out = sdpa(inputs)
    grid_height, grid_width = config.grid_size
    assert eager_out.logits.shape == (batch, config.num_labels)
    assert eager_out.hidden_states[-1].shape == (batch, grid_height * grid_width + 1, config.hidden_size)
    assert len(eager_out.hidden_states) == config.num_hidden_layers + 1
    torch.testing.assert_close(sdpa_out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)


@BOUNDED
@given(values=valid_configs(), seed=st.integers(0, 2**16))
def test_save_and_load_is_exact(values, seed):
    torch.manual_seed(seed)
    model = ViTCustomForImageClassification(ViTCustomConfig(**values)).eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = ViTCustomForImageClassification.from_pretrained(folder).eval()
    saved_config, config = reloaded.config.to_dict(), model.config.to_dict()
    saved_config.pop("_name_or_path"), config.pop("_name_or_path")  # where it was loaded from
    assert saved_config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    inputs = pixels(model.config, 2, seed)
    with torch.no_grad():
        assert torch.equal(out_of_the_memory_map(reloaded)(inputs).logits, model(inputs).logits)


@BOUNDED
@given(values=valid_configs(), grid=st.tuples(st.integers(1, 5), st.integers(1, 5)))
def test_any_grid_runs_with_interpolated_position_embeddings(values, grid):
    config = ViTCustomConfig(**values)
    patch_height, patch_width = (config.patch_size,) * 2 if isinstance(config.patch_size, int) else config.patch_size
    inputs = torch.randn(1, config.num_channels, grid[0] * patch_height, grid[1] * patch_width)
    with torch.no_grad():
        output = ViTCustomModel(config).eval()(inputs, interpolate_pos_encoding=True)
    assert output.last_hidden_state.shape == (1, grid[0] * grid[1] + 1, config.hidden_size)
    assert torch.isfinite(output.last_hidden_state).all()


INVALID_CHANGES = st.one_of(
    st.builds(lambda heads: {"num_attention_heads": heads}, st.sampled_from([3, 5, 7])),  # hidden 32: no divisor
    st.builds(lambda size: {"hidden_size": size}, st.integers(-64, 0)),
    st.builds(lambda layers: {"num_hidden_layers": layers}, st.integers(-3, 0)),
    st.builds(lambda width: {"intermediate_size": width}, st.integers(-64, 0)),
    st.builds(lambda channels: {"num_channels": channels}, st.integers(-3, 0)),
    # A remainder past the last full patch is allowed (SigLIP's 384 px at patch 14); a patch larger than the image
    # is not.
    st.builds(lambda patch: {"patch_size": patch}, st.sampled_from([17, 32, 0, -4])),  # image 16
    st.builds(lambda image: {"image_size": image}, st.sampled_from([3, 1, 0, -16])),  # patch 4
    st.builds(
        lambda name, p: {name: p},
        st.sampled_from(["hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"]),
        st.one_of(st.floats(1.0, 10.0), st.floats(-10.0, -1e-6)),
    ),
    st.builds(lambda eps: {"layer_norm_eps": eps}, st.floats(-1.0, 0.0)),
    st.builds(lambda pooling: {"pooling": pooling}, st.text(min_size=1).filter(lambda t: t not in ("cls", "mean"))),
    st.builds(lambda act: {"hidden_act": act}, st.sampled_from(["swish2", "GELU", "tanhh", ""])),
)


@BOUNDED
@given(change=INVALID_CHANGES)
def test_invalid_configs_raise_value_error(change):
    values = {
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    try:
        ViTCustomConfig(**{**values, **change})
    except ValueError as error:
        assert any(f"`{name}`" in str(error) for name in [*change, "hidden_size", "image_size"]), error
    else:
        raise AssertionError(f"accepted {change}")
