"""Everything of fused_xent that imports TensorFlow (the Python side of cc/tf/).

``loader`` loads the op library (refusing a TensorFlow it was not built for), ``ops``
holds the ``tf.nn``-style functions, ``gradients`` their registered gradients,
``buffer_cache`` the CPU gradient buffer cache's controls, ``keras_elementwise`` the
per-element losses the Keras 3 and tf_keras classes share, and ``linear`` the fused
linear head. The public modules (``fused_xent``, ``fused_xent.linear``,
``fused_xent.losses``, ...) re-export what users call.
"""
