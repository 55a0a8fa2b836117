"""The search service: ``python -m rayuda.tune METHOD`` (:mod:`rayuda.hpo.cli`), one module per job.

- :mod:`~rayuda.hpo.space`: search spaces as data (``search_spaces/<method>.yaml``) → an Optuna define-by-run space.
- :mod:`~rayuda.hpo.prepare`: the command line → a checked :class:`~rayuda.hpo.prepare.SearchPlan`, before Ray.
- :mod:`~rayuda.hpo.places`: where a search's files go (:class:`~rayuda.hpo.places.Places`).
- :mod:`~rayuda.hpo.searcher`: Optuna's TPE behind Ray Tune's ``Searcher``, the study in a journal file.
- :mod:`~rayuda.hpo.tuner`: Ray, the ``Tuner`` with ASHA and the MLflow tracker, new or restored.
- :mod:`~rayuda.hpo.trainable`: one trial = one :func:`rayuda.engine.run_pipeline` call.
- :mod:`~rayuda.hpo.confirm`: the top configs and the defaults on fresh seeds → a verdict.
- :mod:`~rayuda.hpo.report`: the trials table, the plots, the chosen config (``best.yaml``).
- :mod:`~rayuda.hpo.tracking`: MLflow: the search's parent run, one child per trial (a Tune callback), the finish.
- :mod:`~rayuda.hpo.trial_summary`: what a trial's ``summary.json`` adds to its MLflow run.
- :mod:`~rayuda.hpo.registry`: the data as dataset inputs; the winner's G as a registered model (``champion``).
"""
