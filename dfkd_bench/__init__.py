"""dfkd-bench: benchmark data-free knowledge distillation under one protocol."""

__version__ = "0.1.0"

# Registers the small-image zoo (wrn16_1, cifar_resnet34, ...) into timm, so that
# `import dfkd_bench` is enough for timm.create_model to build them.
from . import zoo  # noqa: E402,F401
