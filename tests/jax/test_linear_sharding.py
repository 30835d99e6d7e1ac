"""fused_xent.jax.linear_cross_entropy under sharding, on 8 virtual CPU devices (in a fresh
process, tests/_support/linear_sharding_cases.py): hidden's rows over the batch, the weight's
classes over the vocabulary, both (the Megatron layout), a V x H weight, two-axis layouts,
every option, bfloat16, per-row upstream gradients, and class counts the class shards do
not divide (509 or 511 classes; 5 classes over 8 shards, 3 of them without any), split inside
the step. Values and gradients equal the one-device call's; no collective gathers logits-sized
data; a training step moves at most what the jax.numpy head moves plus the two label-check
scalars; the gradients keep their inputs' shardings; the temporaries beside the
weight-gradient buffers stay under 25% of a device's logits; an invalid label on one device
is an error, not a hang."""

import pytest

from tests._support.runners import run_fresh

jax = pytest.importorskip("jax")

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    source = "from tests._support.linear_sharding_cases import main; main()"
    return run_fresh(source, cwd=str(tmp_path_factory.getbasetemp().parent), timeout=400, JAX_PLATFORMS="cpu")


TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}
UNEVEN = "uneven classes", "5 classes over 8"


def test_runs_on_eight_devices(sharded):
    assert sharded["devices"] == 8 and len(sharded["cases"]) == 16


@pytest.mark.parametrize("quantity", ["value_error", "grad_error"])
def test_equal_to_one_device(sharded, quantity):
    for name, case in sharded["cases"].items():
        assert case[quantity] <= TOLERANCE[case["dtype"]], (name, case)


def test_no_logits_gathered(sharded):
    assert not {name for name, case in sharded["cases"].items() if case["gathers_logits"]}


def test_uneven_class_shards_run_on_each_devices_classes(sharded):
    """Each device's backward kernel (the vocabulary-parallel one) sees its own rows of a chunk
    and at most ceil(V / n) classes: the weight is not gathered."""
    uneven = {n: c for n, c in sharded["cases"].items() if n.startswith(UNEVEN) or " uneven " in n}
    assert len(uneven) == 7
    for name, case in uneven.items():
        calls = case["backward_calls"]
        assert calls, (name, case)
        for target, _, classes in calls:
            assert target.endswith("_shard") and classes <= case["shard_classes"], (name, case)
        assert any(classes == case["shard_classes"] for _, _, classes in calls), (name, case)


def test_gradients_keep_their_inputs_sharding(sharded):
    for name, case in sharded["cases"].items():
        assert all(case["same_shardings"]), (name, case)


def test_moves_no_more_than_the_jnp_head(sharded):
    compared = {n: c for n, c in sharded["cases"].items() if "reference_moved" in c}
    assert len(compared) == 10
    for name, case in compared.items():
        assert case["moved"] <= case["reference_moved"] + 2, (name, case["moved"], case["reference_moved"])


def test_the_step_counter_counts_loops_and_branches(sharded):
    """moved_per_step on a known program: 5 trips of 16 elements; the dear branch's 1000 more are
    not run where the cheap branch is taken."""
    assert sharded["counter"] == {"min": 80, "max": 1080}


def test_temporaries_beside_the_weight_gradient(sharded):
    """Rows sharded: dW accumulates per device, then its all-reduce writes a second W-sized buffer
    (the jax.numpy head has both too). Beside those, the chunks' logits and gradients."""
    memory = sharded["memory"]
    beside = memory["temp_bytes"] - 2 * memory["weight_bytes_per_device"]
    assert beside <= 0.25 * memory["logits_bytes_per_device"], memory
    assert memory["temp_bytes"] < memory["reference_temp_bytes"] / 4, memory


def test_temporaries_with_uneven_class_shards(sharded):
    """4095 classes over 2, the weight whole at the step's edges: beside the weight gradient's two
    shard-sized buffers and its gathered whole, the weight's masked copy and the chunks."""
    memory = sharded["memory_uneven"]
    beside = memory["temp_bytes"] - 3 * memory["weight_bytes_per_device"] - memory["whole_weight_bytes"]
    assert beside <= 0.25 * memory["logits_bytes_per_device"], memory
    assert memory["temp_bytes"] < memory["reference_temp_bytes"] / 4, memory


@pytest.mark.parametrize("layout", ["bad_label_error", "bad_label_error_uneven"])
def test_invalid_label_raises_on_every_device(sharded, layout):
    assert sharded[layout] is not None
    assert "outside the valid range" in sharded[layout]
