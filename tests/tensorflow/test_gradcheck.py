"""fused_xent.gradcheck: it passes on the op, and it catches wrong gradients."""

import subprocess
import sys

from tests._support.runners import tf_or_skip

tf = tf_or_skip()
from fused_xent import gradcheck  # noqa: E402

SPARSE = gradcheck.Case("sparse")
SPARSE_INDEX = gradcheck.CASES.index(SPARSE)


def test_full_run_passes(capsys):
    assert gradcheck.main([]) == 0
    out = capsys.readouterr().out
    assert "max abs error" in out and "FAIL" not in out
    assert " 0 failed" in out


def test_graph_mode_passes(capsys):
    assert gradcheck.main(["--quick", "--graph", "--only", "all options"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_module_entry_point_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fused_xent.gradcheck", "--quick", "--seed", "3"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout
    for option in ("label_smoothing", "ignore_index", "class_weights", "z_loss", "axis=0", "dense"):
        assert option in result.stdout


def test_cases_cover_every_option():
    cases = gradcheck.CASES
    assert any(c.dense for c in cases) and any(not c.dense for c in cases)
    assert any(c.label_smoothing > 0 for c in cases)
    assert any(c.ignore_index is not None for c in cases)
    assert any(c.class_weights for c in cases)
    assert any(c.z_loss > 0 for c in cases)
    assert any(c.axis % c.rank != c.rank - 1 for c in cases)


def _fused_loss_with_gradient(gradient_of):
    """The fused loss (sparse, class axis last) with its gradient replaced by
    gradient_of(labels, logits) -> d loss / d logits per row."""

    def loss(case, labels, logits, class_weights):
        @tf.custom_gradient
        def replaced(z):
            def grad(upstream):
                return upstream[..., None] * gradient_of(labels, z)

            return gradcheck.case_loss(case, labels, z, class_weights), grad

        return replaced(logits)

    return loss


def _diagonal_only(labels, z):
    """dE/do_j * do_j/dz_j with only the Jacobian's diagonal: -t_j (1 - p_j)."""
    p = tf.nn.softmax(z)
    t = tf.one_hot(labels, tf.shape(z)[-1], dtype=z.dtype)
    return -t * (1.0 - p)


def _right_values_frozen_softmax(labels, z):
    """p - t with p held constant: first order right, second order zero."""
    p = tf.stop_gradient(tf.nn.softmax(z))
    return p - tf.one_hot(labels, tf.shape(z)[-1], dtype=z.dtype)


def _outcomes(results):
    return {r.check: r.passed for r in results}


def _sigma_minus_t(labels, z):
    return tf.nn.softmax(z) - tf.one_hot(labels, tf.shape(z)[-1], dtype=z.dtype)


def test_control_with_the_same_hook_passes():
    results = gradcheck.check_case(SPARSE, seed=0, index=SPARSE_INDEX, loss=_fused_loss_with_gradient(_sigma_minus_t))
    assert all(r.passed for r in results), results


def test_diagonal_only_chain_rule_is_flagged():
    results = gradcheck.check_case(SPARSE, seed=0, index=SPARSE_INDEX, loss=_fused_loss_with_gradient(_diagonal_only))
    first_order = [r for r in results if r.order == 1]
    assert first_order and not any(r.passed for r in first_order)
    assert first_order[0].error > 0.01


def test_missing_second_derivative_is_flagged():
    frozen = _fused_loss_with_gradient(_right_values_frozen_softmax)
    results = _outcomes(gradcheck.check_case(SPARSE, seed=0, index=SPARSE_INDEX, loss=frozen))
    assert results["d f/d logits"]
    assert not results["d2 f/d logits2 (Hessian-vector)"]
    assert results["d(d f/d logits)/d upstream"]  # linear in the upstream gradient: still right


def test_main_returns_nonzero_on_failure(capsys):
    wrong = _fused_loss_with_gradient(_diagonal_only)
    assert gradcheck.main(["--quick", "--only", "sparse int32"], loss=wrong) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_case_filter_is_an_error():
    assert gradcheck.main(["--only", "no such case"]) == 2
