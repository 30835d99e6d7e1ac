"""What the Keras 3 and tf_keras losses and metrics keep of their constructor arguments (the checks
themselves are in fused_xent._checks). No framework is imported here."""


class CrossentropyArguments:
    """What the Keras 3 and tf_keras losses and metrics keep of their arguments: the per-element
    functions' options and the config entries (attributes of the same names)."""

    _CONFIG_ARGUMENTS = ("from_logits", "label_smoothing", "axis", "z_loss", "softcap")

    def _argument_config(self):
        return {name: getattr(self, name) for name in self._CONFIG_ARGUMENTS}

    def _per_element_options(self, epsilon, loss_dtype):
        """The arguments of fused_xent._tf.keras_elementwise's per-element functions."""
        return dict(
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
            axis=self.axis,
            z_loss=self.z_loss,
            softcap=self.softcap,
            epsilon=epsilon,
            loss_dtype=loss_dtype,
            name=self.name,
        )

    def _keep_arguments_of(self, loss):
        """A metric's copies of its loss's (checked) arguments."""
        for name in self._CONFIG_ARGUMENTS:
            setattr(self, name, getattr(loss, name))
