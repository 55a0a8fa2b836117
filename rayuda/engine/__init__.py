"""The training engine: runs any method's stage plan (``pipeline``) through one loop (``loop``) and one
pseudo-label pass (``passes``), caching every stage under a key derived from what it reads (``plan``,
``cache``). It stands above ``rayuda.methods``: methods declare, the engine runs."""

from rayuda.engine.pipeline import run_pipeline

__all__ = ["run_pipeline"]
