"""The training engine: one loop, stages with a cache, atomic checkpoints, one entry point."""

from rayuda.engine.pipeline import run_pipeline

__all__ = ["run_pipeline"]
