"""The model zoo: `conf/model/<file>.yaml` -> `nn.Module`, one file per architecture.

Each model registers a schema dataclass under its YAML `name` in `MODELS`; its builder is called as
`build(input=<the task's InputSpec>, num_classes=..., **params)`, so it sizes itself from what the task declares
(tasks/__init__.py) without knowing the task. Capabilities declared per entry and read by the code:
`inputs` (the input kinds it accepts; `validate()` refuses a dataset whose input it cannot take) and
`batchnorm` (it has BatchNorm layers, which matters for multi-pass steps).
"""
from runner.config import ConfigError, Registry

MODELS = Registry("model")


def image_shape(input, model: str) -> tuple[int, int]:
    """(channels, size) of an image input; a ConfigError naming the model for any other input."""
    if getattr(input, "kind", None) != "image":
        raise ConfigError("model.name", message=f"model={model} needs image input; this dataset gives "
                                                f"{getattr(input, 'kind', input)} (use model=mlp)")
    return input.channels, input.size


from runner.models import cnn, mlp, resnet, timm_zoo, wrn  # noqa: E402,F401  (import registers the models)
