"""gpd_ds: Gap Preserving Distillation on DeepSpeed."""

__version__ = "0.3.0"
