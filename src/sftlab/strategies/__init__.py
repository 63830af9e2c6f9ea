"""Strategies: which parameters train. Each is `apply(model, cfg) -> model`, registered by name."""
from . import basic, lora  # noqa: F401  (registers)
from .basic import head_parameter_names  # noqa: F401
