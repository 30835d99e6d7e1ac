"""The fused JAX losses under sharding, on 8 virtual CPU devices (in a fresh process,
tests/_support/sharding_cases.py): rows sharded over one or two mesh axes, classes sharded
(vocabulary-parallel sparse and dense labels), both, class axis last or not, every option,
and class counts the class shards do not divide (2001 or 1999 classes, 5 and 9 classes over
8 shards: some shards hold no class). Values and gradients equal the one-device call's, no
collective gathers the logits, the step moves at most the jax.numpy reference's data plus
four values a row, its temporaries stay within twice the reference's plus 1 MiB, and the
gradient keeps the logits' sharding. An invalid label on one device is an error on all of
them, not a hang."""

import pytest

from tests._support.runners import run_fresh

jax = pytest.importorskip("jax")

from fused_xent import _core  # noqa: E402

if not _core.ffi_targets().get("cpu"):
    pytest.skip("this build has no XLA FFI handlers", allow_module_level=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    source = "from tests._support.sharding_cases import main; main()"
    return run_fresh(source, cwd=str(tmp_path_factory.getbasetemp().parent), timeout=300, JAX_PLATFORMS="cpu")


# Cases that keep the class axis whole: none.
GATHERED = set()


def test_runs_on_eight_devices(sharded):
    assert sharded["devices"] == 8
    assert len(sharded["cases"]) == 21


TOLERANCE = {"float32": 2e-5, "bfloat16": 1e-2}


@pytest.mark.parametrize("quantity", ["value_error", "grad_error"])
def test_equal_to_one_device(sharded, quantity):
    for name, case in sharded["cases"].items():
        assert case[quantity] <= TOLERANCE[case["dtype"]], (name, case)


def test_no_logits_gathered(sharded):
    gathered = {name for name, case in sharded["cases"].items() if case["gathers_logits"]}
    assert gathered == GATHERED


def test_gradient_keeps_the_logits_sharding(sharded):
    moved = {name: (case["grad_spec"], case["logits_spec"]) for name, case in sharded["cases"].items()}
    assert all(case["grad_same_sharding"] for case in sharded["cases"].values()), moved


def _compared(sharded):
    return {n: c for n, c in sharded["cases"].items() if "reference_moved" in c and n not in GATHERED}


def test_moves_no_more_than_the_jnp_reference(sharded):
    compared = _compared(sharded)
    assert len(compared) == 8
    for name, case in compared.items():
        assert case["moved"] <= case["reference_moved"] + 4 * case["rows"], (name, case)


def test_vocabulary_parallel_sparse_moves_less_than_the_jnp_reference(sharded):
    """Three row-sized all-reduces (max, sum of exponentials, loss) and the label check. (Dense
    labels add the label sums: within the allowance above, not below the reference.)"""
    for name, case in _compared(sharded).items():
        if "classes" in name and "sparse" in name:
            assert case["moved"] < case["reference_moved"], (name, case)


def test_row_sharding_moves_only_scalars(sharded):
    """Row-sharded steps need the mean's all-reduce and the label check, nothing row-sized."""
    rows_only = {n: c for n, c in sharded["cases"].items() if "classes" not in n}
    assert all(case["moved"] <= 3 for case in rows_only.values()), rows_only


def test_temporaries_within_twice_the_reference(sharded):
    for name, case in _compared(sharded).items():
        assert case["temp_bytes"] <= 2 * case["reference_temp_bytes"] + 2**20, (name, case)


# ---------------------------------------------------------------- uneven class shards
# (in a training step's head h @ W: sharded inside jit, tests/_support/sharding_cases.py)


def test_uneven_cases_ran(sharded):
    assert len(sharded["uneven_cases"]) == 20
    assert len(sharded["uneven_values"]) == 4


def test_a_shard_whose_logits_are_all_minus_infinity(sharded):
    for name, case in sharded["uneven_values"].items():
        assert "finite" not in case or case["finite"], (name, case)


@pytest.mark.parametrize("quantity", ["value_error", "grad_error"])
def test_uneven_class_shards_equal_to_one_device(sharded, quantity):
    cases = {**sharded["uneven_cases"], **sharded["uneven_values"]}
    for name, case in cases.items():
        assert case[quantity] <= TOLERANCE[case["dtype"]], (name, case)


def test_uneven_class_shards_gather_no_logits(sharded):
    assert not [name for name, case in sharded["uneven_cases"].items() if case["gathers_logits"]]


def test_uneven_class_shards_keep_the_gradient_sharded(sharded):
    """Each device's backward kernel writes its rows and at most its ceil(C / n) columns (fewer on
    the last shards; none where a shard holds no class), the full shard on the first."""
    for name, case in sharded["uneven_cases"].items():
        rows, columns = case["local_shape"]
        shapes = case["grad_shapes"]
        assert shapes and all(s[0] == rows and 1 <= s[1] <= columns for s in shapes), (name, case)
        assert [rows, columns] in shapes, (name, case)


def test_uneven_class_shards_move_no_more_than_the_jnp_reference(sharded):
    for name, case in sharded["uneven_cases"].items():
        assert case["moved"] <= case["reference_moved"] + 4 * case["rows"], (name, case)


def test_uneven_class_shards_temporaries_within_twice_the_reference(sharded):
    for name, case in sharded["uneven_cases"].items():
        assert case["temp_bytes"] <= 2 * case["reference_temp_bytes"] + 2**20, (name, case)


@pytest.mark.parametrize("layout", ["bad_label_error_uneven", "bad_label_error_uneven_empty_shards"])
def test_invalid_label_raises_with_uneven_class_shards(sharded, layout):
    message = sharded[layout] or ""
    assert "which is outside the valid range of [0, " in message, message
    classes = 2001 if layout == "bad_label_error_uneven" else 5
    assert f"label value of {classes + 5} which is outside the valid range of [0, {classes})" in message, message


@pytest.mark.parametrize("layout", ["bad_label_error", "bad_label_error_classes"])
def test_invalid_label_raises_on_every_device(sharded, layout):
    message = sharded[layout] or ""
    assert "label value of 325 which is outside the valid range of [0, 320)" in message, message
