"""Backends, chosen by name from a model's config and imported only when a model uses them,
so a machine without TensorRT never imports it."""

from __future__ import annotations

import importlib

from tensorgate.server.backends.base import AnyBackendInstance, BackendInstance, GpuBackendInstance
from tensorgate.server.config import ConfigError
from tensorgate.server.model_config import BACKENDS, ModelConfig

# name -> module that defines `load(config: ModelConfig, instance_index: int)`, returning a
# BackendInstance (CPU) or a GpuBackendInstance.
BACKEND_MODULES = {name: f"tensorgate.server.backends.{name}" for name in BACKENDS}


def load_instance(config: ModelConfig, instance_index: int) -> AnyBackendInstance:
    """Loads one instance of the model with the backend its config names."""
    module_name = BACKEND_MODULES.get(config.backend)
    if module_name is None:
        known = ", ".join(sorted(BACKEND_MODULES))
        raise ConfigError(
            f"model '{config.name}': unknown backend '{config.backend}'; known: {known}"
        )
    module = importlib.import_module(module_name)
    instance: AnyBackendInstance = module.load(config, instance_index)
    if config.sequence is not None:
        if instance.placement != "cpu":
            instance.close()
            raise ConfigError(
                f"model '{config.name}': stateful models ([sequence]) run on CPU instances in "
                'this release; set device = "cpu" or serve it with onnxruntime'
            )
        from tensorgate.server.backends.stateful import StatefulBackend

        instance = StatefulBackend(instance, config)
    return instance


__all__ = [
    "BACKEND_MODULES",
    "AnyBackendInstance",
    "BackendInstance",
    "GpuBackendInstance",
    "load_instance",
]
