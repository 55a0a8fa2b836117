"""The training engine: one loop (``loop``), stages and their cache (``pipeline``, ``cache``), evaluation.

``run_pipeline`` is imported lazily: method modules import the engine's parts, and the pipeline imports
the methods.
"""


def __getattr__(name: str):
    if name == "run_pipeline":
        from rayuda.engine.pipeline import run_pipeline

        return run_pipeline
    raise AttributeError(name)


__all__ = ["run_pipeline"]
