"""Where a search's study lives: one Optuna storage that `sftlab tune` and `sftlab sweep` workers share.

    sqlite:///PATH            the default (OUT/study.db): workers on one machine
    postgresql://USER@HOST/DB any SQLAlchemy URL Optuna's RDBStorage takes: workers on any machines
    journal:PATH              Optuna's append-only journal file: workers on a shared filesystem, no server

A worker killed mid-trial (SIGKILL, a lost node) stops beating; after `3 x heartbeat` seconds any worker marks its
trial FAIL and enqueues the same parameters again (Optuna's RetryHeartbeatStaleTrialCallback), so a study never keeps a
stuck RUNNING trial and never loses a point. RDBStorage has the heartbeat built in. Optuna 5's JournalStorage has
none, so _JournalHeartbeat keeps it as a trial system attribute, one journal line
per beat, read against the local clock: the workers' clocks must agree to well within the grace period (NTP).
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from .errors import ConfigError

RETRIES = 2  # a trial whose workers were killed twice in a row is given up (FAIL) rather than retried forever


def open_storage(url: str, heartbeat: int = 20):
    """The Optuna storage of `url` with heartbeats every `heartbeat` s and failed-trial retries."""
    import optuna
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    if heartbeat < 1:
        raise ConfigError(f"--heartbeat must be >= 1 second, got {heartbeat}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)
        if url.startswith("journal:"):
            path = Path(url.removeprefix("journal:")).expanduser()
            if not path.parent.is_dir():
                raise ConfigError(f"--storage {url}: folder {path.parent} does not exist")

            class _JournalHeartbeat(JournalStorage, BaseHeartbeat):
                def record_heartbeat(self, trial_id: int) -> None:
                    self.set_trial_system_attr(trial_id, "sftlab_heartbeat", time.time())

                def _get_stale_trial_ids(self, study_id: int) -> list[int]:
                    now = time.time()
                    return [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False,
                                                                      states=(TrialState.RUNNING,))
                            if now - max(t.system_attrs.get("sftlab_heartbeat", 0.0), t.datetime_start.timestamp())
                            > 3 * heartbeat]  # a retry inherits its failed trial's last beat: start counts too

                def get_heartbeat_interval(self) -> int:
                    return heartbeat

                def get_heartbeat_stale_trial_callback(self):
                    return retry

            return _JournalHeartbeat(optuna.storages.journal.JournalFileBackend(str(path)))
        # sqlite: wait for the file lock rather than fail when workers write at once
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        if url.startswith("postgresql"):
            try:
                if url.split("://")[0] in ("postgresql", "postgresql+psycopg"):
                    import psycopg  # noqa: F401  (SQLAlchemy 2.1's default driver for postgresql://)
            except ImportError:
                raise ConfigError(f"--storage {url}: PostgreSQL needs the psycopg driver: pip install "
                                  "'sftlab[postgres]' (or psycopg[binary])") from None
            kwargs["pool_pre_ping"] = True  # a server restarted during a long trial: reconnect, not fail the trial
        return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                          heartbeat_stale_trial_callback=retry)


def fail_stale(study) -> None:
    """Mark the trials of killed workers failed (and enqueue their retries)."""
    import optuna

    with warnings.catch_warnings():  # experimental in optuna, stable in use since 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def open_study(url: str, name: str, direction: str, heartbeat: int = 20, **kwargs):
    """Create or load study `name` in `url`; one line naming the URL when it cannot be opened."""
    import optuna

    for attempt in range(5):  # workers starting together race to create the tables (sqlite) or the study
        try:
            return optuna.create_study(storage=open_storage(url, heartbeat), study_name=name, direction=direction,
                                       load_if_exists=True, **kwargs)
        except ConfigError:
            raise
        except Exception as e:  # sqlalchemy and journal errors; bad URLs end here too
            if attempt == 4 or url.startswith(("postgres", "mysql")) and "already exists" not in str(e):
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConfigError(f"--storage {url}: cannot open the study ({why})") from None
            time.sleep(0.5 + attempt)


def run_one_trial(study, objective, catch: tuple, heartbeat: int, number=lambda: "?") -> bool:
    """study.optimize(objective, n_trials=1); False when another worker failed this trial meanwhile (no heartbeat
    for 3 x `heartbeat` s: this worker was starved, not dead) and optuna refuses its report or tell. Its retry is
    queued, so the worker drops the result and goes on instead of exiting with optuna's traceback."""
    import optuna

    try:
        study.optimize(objective, n_trials=1, catch=catch)
        return True
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as e:
        if isinstance(e, ValueError) and not str(e).startswith("Cannot tell a FAIL trial"):
            raise
        print(f"trial {number()}: failed by another worker (no heartbeat for {3 * heartbeat}s); its retry is queued",
              file=sys.stderr, flush=True)
        return False
