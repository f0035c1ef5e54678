"""gendd-deploy: Generative Distribution Distillation from teacher to compiled student."""

__version__ = "0.1.0"
