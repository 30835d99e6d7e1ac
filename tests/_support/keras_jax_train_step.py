"""Run by tests/jax/test_no_logits_copy.py in a fresh interpreter with KERAS_BACKEND=jax:
compiles Keras's JAX train step (what model.fit runs: model.train_step under jax.jit with
the state donated) for Input(16) -> Dense(C) with fused_xent's Keras losses and with
Keras's own, and prints, as JSON after "RESULT ", how many copies of the logits' buffer
each optimized HLO module holds and its temporary bytes. Run with
FUSED_XENT_JAX_ALIAS_GRADIENT=1 it shows the copy that aliasing the gradient to the logits
costs (the test's planted failure).

Usage: python keras_jax_train_step.py MODE PATH (both ignored: the runner's convention)
"""

import json

import keras
import numpy as np
from hlo_copies import copies_of_shape, hlo_shape

from fused_xent import losses as fl

N, H, C = 64, 16, 5000


def compiled_train_step(loss, labels, metrics):
    import jax

    model = keras.Sequential([keras.Input((H,)), keras.layers.Dense(C)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, metrics=metrics)
    x = np.random.default_rng(0).normal(size=(N, H)).astype("float32")
    model.train_on_batch(x, labels)  # builds the model, the optimizer and the metrics
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    return jax.jit(model.train_step, donate_argnums=0).lower(state, (x, labels, None)).compile()


def main():
    assert keras.backend.backend() == "jax", keras.backend.backend()
    y = np.random.default_rng(1).integers(0, C, N)
    onehot = np.eye(C, dtype="float32")[y]
    cases = {
        "ours sparse": (fl.SparseCategoricalCrossentropy(from_logits=True), y, None),
        "ours sparse, accuracy": (fl.SparseCategoricalCrossentropy(from_logits=True), y, ["accuracy"]),
        "ours dense": (fl.CategoricalCrossentropy(from_logits=True), onehot, None),
        "keras sparse": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), y, None),
    }
    # Under mixed precision the logits are bfloat16: ours must read them as they are (Keras's own
    # loss makes a float32 copy; a float32 copy of ours would double the step's temporaries).
    cases["ours sparse, mixed_bfloat16"] = (fl.SparseCategoricalCrossentropy(from_logits=True), y, None)
    cases["keras sparse, mixed_bfloat16"] = (keras.losses.SparseCategoricalCrossentropy(from_logits=True), y, None)
    result = {}
    for name, (loss, labels, metrics) in cases.items():
        keras.mixed_precision.set_global_policy("mixed_bfloat16" if "mixed" in name else "float32")
        compiled = compiled_train_step(loss, labels, metrics)
        text = compiled.as_text()
        memory = compiled.memory_analysis()
        result[name] = dict(
            copies=copies_of_shape(text, hlo_shape("float32", (N, C))),
            custom_calls=text.count('custom_call_target="fused_xent_'),
            # our calls that read the logits as bfloat16 (the mixed-precision cases)
            bfloat16_calls=sum(
                'custom_call_target="fused_xent_' in line and hlo_shape("bfloat16", (N, C)) in line
                for line in text.splitlines()
            ),
            temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
