"""fused_xent.jax.linear_cross_entropy under sharding, on 8 virtual CPU devices (in a fresh
process, tests/_support/linear_sharding_cases.py): hidden's rows over the batch, the weight's
classes over the vocabulary, both (the Megatron layout), a V x H weight, two-axis layouts,
every option, bfloat16, per-row upstream gradients. Values and gradients equal the one-device
call's; no collective gathers logits-sized data (except classes the shards do not divide,
which stay whole); a training step moves at most what the jax.numpy head moves plus the two
label-check scalars; the gradients keep their inputs' shardings; the temporaries beside the
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
GATHERED = {"rows x uneven classes"}  # kept whole, exact


def test_runs_on_eight_devices(sharded):
    assert sharded["devices"] == 8 and len(sharded["cases"]) == 10


@pytest.mark.parametrize("quantity", ["value_error", "grad_error"])
def test_equal_to_one_device(sharded, quantity):
    for name, case in sharded["cases"].items():
        assert case[quantity] <= TOLERANCE[case["dtype"]], (name, case)


def test_no_logits_gathered(sharded):
    assert {name for name, case in sharded["cases"].items() if case["gathers_logits"]} == GATHERED


def test_gradients_keep_their_inputs_sharding(sharded):
    for name, case in sharded["cases"].items():
        assert all(case["same_shardings"]), (name, case)


def test_moves_no_more_than_the_jnp_head(sharded):
    compared = {n: c for n, c in sharded["cases"].items() if "reference_moved" in c and n not in GATHERED}
    assert len(compared) == 6
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


def test_invalid_label_raises_on_every_device(sharded):
    assert sharded["bad_label_error"] is not None
    assert "outside the valid range" in sharded["bad_label_error"]
