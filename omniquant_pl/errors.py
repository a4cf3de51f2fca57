"""User-facing errors: one line that says what was received, what is allowed and what to do."""


class OmniQuantError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class ConfigError(OmniQuantError, ValueError):
    """An invalid configuration value (bits out of range, bad group size, unknown source...)."""


class UnsupportedArchitectureError(OmniQuantError):
    """The model's `config.model_type` has no architecture adapter."""


class NonFiniteLossError(OmniQuantError):
    """Calibration of a block produced a NaN/inf loss that retries could not recover from."""


class AttentionNotQuantizedError(OmniQuantError):
    """Activation quantization was asked for, but the model's attention never ran the q/k/v
    quantizer (its attention is not routed through the quantized attention function)."""
