# Tests of one part of fused_xent; a package so that it cannot shadow a real module (tests/__init__.py).
