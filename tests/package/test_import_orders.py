"""Every import order a user may write registers everything: a first import of a public submodule
(`from fused_xent.losses import ...`, before any `import fused_xent`, and before Keras) registers
the losses and the metrics, so a saved model loads; and the NumPy and JAX front ends import neither
TensorFlow nor Keras."""

import numpy as np
import pytest

from tests._support.runners import run_fresh

FIRST_IMPORTS = [
    "from fused_xent.losses import SparseCategoricalCrossentropy",
    "from fused_xent.metrics import SparseCategoricalCrossentropy",
    "import fused_xent.losses",
    "import fused_xent.metrics",
    "from fused_xent import metrics",
    "from fused_xent.layers import LinearCrossEntropy",
    "import fused_xent.linear",
    "import fused_xent.tf_keras",
]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    pytest.importorskip("tensorflow")
    pytest.importorskip("keras")
    folder = tmp_path_factory.mktemp("import_orders")
    run_fresh(
        """
        import json
        import numpy as np
        import keras
        import fused_xent

        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(
            loss=fused_xent.losses.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
            metrics=[fused_xent.metrics.SparseCategoricalCrossentropy(from_logits=True)],
        )
        model.save("model.keras")
        print("RESULT " + json.dumps({}))
        """,
        folder,
    )
    return folder


@pytest.mark.parametrize("first_import", FIRST_IMPORTS)
def test_a_first_import_of_a_submodule_registers_everything(first_import, saved_model):
    if "tf_keras" in first_import:
        pytest.importorskip("tf_keras")
    result = run_fresh(
        f"""
        import json, warnings
        warnings.simplefilter("error")  # "fused_xent's ... not registered" must not happen
        {first_import}
        warnings.resetwarnings()
        import keras
        model = keras.models.load_model("model.keras")
        import numpy as np
        x, y = np.ones((2, 4), np.float32), np.array([0, 2])
        model.evaluate(x, y, verbose=0)  # builds the compiled metrics
        names = sorted(type(m).__module__ + "." + type(m).__name__ for m in model.metrics[-1].metrics)
        print("RESULT " + json.dumps({{
            "loss": type(model.loss).__module__ + "." + type(model.loss).__name__, "metrics": names,
        }}))
        """,
        saved_model,
    )
    assert result["loss"] == "fused_xent.losses.SparseCategoricalCrossentropy"
    assert result["metrics"] == ["fused_xent.metrics.SparseCategoricalCrossentropy"]


@pytest.mark.parametrize("statement", ["import fused_xent.jax", "from fused_xent import jax as fj"])
def test_jax_front_end_imports_no_tensorflow_or_keras(statement, tmp_path):
    pytest.importorskip("jax")
    result = run_fresh(
        f"""
        import json, sys
        import numpy as np
        {statement}
        import fused_xent.jax
        loss = fused_xent.jax.sparse_softmax_cross_entropy_with_logits(np.array([1]), np.array([[0.0, 1.0]], np.float32))
        print("RESULT " + json.dumps({{
            "imported": [m for m in ("tensorflow", "keras", "tf_keras", "torch") if m in sys.modules],
            "loss": float(loss[0]),
        }}))
        """,
        tmp_path,
    )
    assert result["imported"] == []
    np.testing.assert_allclose(result["loss"], np.log1p(np.exp(-1.0)), rtol=1e-6)
