"""The fused JAX losses under sharding, on 8 virtual CPU devices (in a fresh process,
tests/_support/sharding_cases.py): rows sharded over one or two mesh axes, class axis last
or not, every option. Each device runs the kernels on its own rows: values and gradients
equal the one-device call's, no collective gathers the logits, the step moves at most the
jax.numpy reference's data plus a few scalars, and the gradient keeps the logits' sharding.
An invalid label on one device is an error on all of them, not a hang."""

import pytest

from tests._support.runners import run_fresh

jax = pytest.importorskip("jax")

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)

# The label check every device joins (jax/_sharding.py): one all-reduce of two scalars.
LABEL_CHECK_ELEMENTS = 2


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    source = "from tests._support.sharding_cases import main; main()"
    return run_fresh(source, cwd=str(tmp_path_factory.getbasetemp().parent), timeout=300, JAX_PLATFORMS="cpu")


def test_runs_on_eight_devices(sharded):
    assert sharded["devices"] == 8
    assert len(sharded["cases"]) == 10


@pytest.mark.parametrize("quantity", ["value_error", "grad_error"])
def test_equal_to_one_device(sharded, quantity):
    errors = {name: case[quantity] for name, case in sharded["cases"].items()}
    assert max(errors.values()) <= 2e-5, errors


def test_no_logits_gathered(sharded):
    gathered = [name for name, case in sharded["cases"].items() if case["gathers_logits"]]
    assert not gathered


def test_gradient_keeps_the_logits_sharding(sharded):
    moved = {name: (case["grad_spec"], case["logits_spec"]) for name, case in sharded["cases"].items()}
    assert all(case["grad_same_sharding"] for case in sharded["cases"].values()), moved


def test_moves_no_more_than_the_jnp_reference(sharded):
    compared = {name: case for name, case in sharded["cases"].items() if "reference_moved" in case}
    assert len(compared) == 4
    for name, case in compared.items():
        allowance = LABEL_CHECK_ELEMENTS if "sparse" in name else 0
        assert case["moved"] <= case["reference_moved"] + allowance, (name, case)


def test_every_case_moves_only_scalars(sharded):
    """Row-sharded steps need the mean's all-reduce and the label check, nothing row-sized."""
    assert all(case["moved"] <= 3 for case in sharded["cases"].values()), sharded["cases"]


def test_invalid_label_raises_on_every_device(sharded):
    assert "label value of 305" in (sharded["bad_label_error"] or ""), sharded["bad_label_error"]
