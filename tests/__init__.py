# The tests are packages (tests.kernels.test_numpy, tests.jax.test_jax, ...): with pytest's
# default "prepend" import mode, a test folder with an __init__.py puts the repository root on
# sys.path rather than the folder above the test file, so tests/jax, tests/torch, tests/keras and
# tests/tensorflow can never stand in for the real jax, torch, keras or tensorflow.
