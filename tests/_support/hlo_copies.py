"""Finds copies of a buffer of a given shape in an optimized HLO module's text (what
`jax.jit(f).lower(...).compile().as_text()` returns): the instructions of that shape that
are a copy, an asynchronous copy, or a fusion named after one (a fused copy is listed
twice: the fusion and the copy at the root of its computation).
Used by tests/jax/test_no_logits_copy.py and tests/_support/keras_jax_train_step.py."""

import re


def copies_of_shape(hlo_text, shape):
    """The lines of `hlo_text` copying a buffer of `shape`, e.g. "f32[64,5000]"."""
    pattern = re.compile(r"^\s*(?:ROOT )?%(\S+) = " + re.escape(shape) + r"(?:\{[^}]*\})? (copy|copy-start|fusion)\(")
    found = []
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if match and (match.group(2) != "fusion" or "copy" in match.group(1)):
            found.append(line.strip())
    return found


def hlo_shape(dtype_name, shape):
    """XLA's spelling of an array shape: ("float32", (64, 5000)) -> "f32[64,5000]"."""
    short = {"float16": "f16", "bfloat16": "bf16", "float32": "f32", "float64": "f64"}[dtype_name]
    return f"{short}[{','.join(str(d) for d in shape)}]"
