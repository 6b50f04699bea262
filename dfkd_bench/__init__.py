"""dfkd-bench: benchmark data-free knowledge distillation under one protocol."""

__version__ = "0.1.0"
