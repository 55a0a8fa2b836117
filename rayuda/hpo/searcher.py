"""The searcher: Optuna's sampler (TPE or random) behind Ray Tune's ``Searcher`` interface, on public APIs only.

It asks an Optuna study for each trial's knobs (the paper defaults first), reports each evaluation at the
engine's iteration (ASHA's time axis) and tells Optuna the truth about how a trial ended: a trial that reached
the engine's final report (``last_report``) is ``COMPLETE`` with its last score, one ASHA stopped early is
``PRUNED`` (its intermediate values stay, and the searcher keeps its own record of them in :attr:`pruned`), one
that failed is ``FAIL``. Ray's own ``OptunaSearch`` would complete a stopped trial with its last score, which
TPE then trusts as a full-length result.

The study lives on disk, in an Optuna journal file in the search's work folder (``work/optuna.journal``), or
in the RDB of ``--optuna-storage`` (for optuna-dashboard): a resumed search continues the same study, and the
plots and the finished-trial count read it back from there.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from rayuda.config import ConfigError

SAMPLERS = ("tpe", "random")
JOURNAL = "optuna.journal"  # under STORAGE/NAME/work/: the search's Optuna study


def tpe_startup_trials(num_samples: int) -> int:
    """Trials TPE samples at random before it models the space. Optuna's default (10) would leave a search
    of 10 trials or fewer — rayuda's default is 6 — purely random: start modelling after half the trials
    (at least 2, at most Optuna's 10)."""
    return min(10, max(2, num_samples // 2))


def make_sampler(kind: str, seed: int, num_samples: int):
    """The Optuna sampler of ``--sampler``: seeded TPE (the default) or seeded random search."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(num_samples))
    raise ConfigError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {kind!r}")


def study_storage(where: str | Path):
    """The Optuna storage of a study: an RDB URL (``sqlite:///...``, ``postgresql://...``) or a journal file."""
    import optuna

    if "://" in str(where):
        return optuna.storages.RDBStorage(str(where))
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(where)))


def check_optuna_storage(url: str) -> None:
    """Open ``--optuna-storage`` once (it creates its tables) so a bad URL fails before Ray starts."""
    try:
        study_storage(url)
    except Exception as err:  # SQLAlchemy raises many types for bad URLs and unwritable files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--optuna-storage {url}: {first[:300]}") from None


def load_search_study(where: str | Path, name: str):
    """A search's study, read back from its storage (for the plots, the counts and the tests)."""
    import optuna

    return optuna.load_study(study_name=name, storage=study_storage(where))


def finished_trials(study) -> int:
    """Trials the searcher was told the end of (complete, pruned or failed); interrupted ones are not."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=done))


class StudySearcher(Searcher):
    """Ray Tune's searcher over an Optuna study on disk (see the module docstring).

    Args:
        space: the define-by-run space (:func:`rayuda.hpo.space.optuna_space`).
        metric: the result key to maximise.
        sampler: an Optuna sampler (:func:`make_sampler`).
        storage: where the study lives: a journal file path or an RDB URL (:func:`study_storage`).
        study_name: the study's name (the search's).
        first: knobs of the first trial (the paper defaults), enqueued when the study is new.
    """

    def __init__(self, space, *, metric: str, sampler, storage: str | Path, study_name: str,
                 first: dict[str, Any] | None = None):
        super().__init__(metric=metric, mode="max")
        self.space, self.sampler, self.first = space, sampler, dict(first or {})
        self.storage, self.study_name = str(storage), study_name
        self.numbers: dict[str, int] = {}  # Ray's trial id → the Optuna trial number
        self.params: dict[str, dict[str, Any]] = {}  # Ray's trial id → its knobs
        self.steps: dict[str, set[int]] = {}  # the iterations each trial reported to Optuna
        self.pruned: set[str] = set()  # trials stopped early (told to Optuna as PRUNED)
        self.finished: set[str] = set()  # trials told to Optuna (complete, pruned or failed)
        self._study = self._storage = None

    def __getstate__(self) -> dict[str, Any]:  # the study is reopened from its storage, never pickled
        return {**self.__dict__, "_study": None, "_storage": None}

    @property
    def study(self):
        """The study, opened (or created, with the first trial enqueued) on first use."""
        if self._study is None:
            import optuna

            self._storage = study_storage(self.storage)
            self._study = optuna.create_study(storage=self._storage, sampler=self.sampler,
                                              study_name=self.study_name, direction="maximize",
                                              load_if_exists=True)
            if self.first and not self._study.trials:
                self._study.enqueue_trial(self.first)
        return self._study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the space and the metric are fixed at construction

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if trial_id not in self.params:
            trial = self.study.ask()
            self.space(trial)
            self.numbers[trial_id], self.params[trial_id] = trial.number, dict(trial.params)
        return dict(self.params[trial_id])

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Report the score at the engine's iteration (ASHA's time axis), once per iteration."""
        if trial_id in self.finished or trial_id not in self.numbers or self.metric not in result \
                or result.get("failed"):
            return
        step = int(result.get("iteration", 0))
        if step in self.steps.setdefault(trial_id, set()):
            return
        self._report(trial_id, step, float(result[self.metric]))
        self.steps[trial_id].add(step)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tell Optuna how the trial ended: COMPLETE at its final report, PRUNED when stopped early, else FAIL."""
        import optuna

        if trial_id in self.finished or trial_id not in self.numbers:
            return
        failed = error or bool((result or {}).get("failed"))
        scored = result is not None and not failed and self.metric in result
        if scored:
            self.on_trial_result(trial_id, result)  # Tune hands the last result only to this hook
        number, state = self.numbers[trial_id], optuna.trial.TrialState
        if scored and result.get("last_report") and math.isfinite(result[self.metric]):
            self.study.tell(number, float(result[self.metric]), state=state.COMPLETE)
        elif failed or (scored and result.get("last_report")):  # an error, or a non-finite final score
            self.study.tell(number, state=state.FAIL)
        else:  # stopped early by ASHA (or by the user) before its final report
            self.study.tell(number, state=state.PRUNED)
            self.pruned.add(trial_id)
        self.finished.add(trial_id)

    def _report(self, trial_id: str, step: int, value: float) -> None:
        """An intermediate value through the storage's public interface (by the trial's storage id)."""
        self.study  # noqa: B018 — opens the study and its storage
        study_id = self._storage.get_study_id_from_name(self.study_name)
        storage_id = self._storage.get_trial_id_from_study_id_trial_number(study_id, self.numbers[trial_id])
        self._storage.set_trial_intermediate_value(storage_id, step, value)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__getstate__(), handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))
