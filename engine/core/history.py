"""Job history in SQLite: every job, its resolved parameters, outcome and image files.

The database lives in the data folder (``<data_dir>/history.sqlite3``) and survives restarts, so
``GET /v1/jobs`` can list yesterday's work. :meth:`JobHistory.attach` hooks into an
:class:`~engine.core.jobs.Engine` and records each job as its events arrive; when the history is given
an output folder it also writes each finished image there (dated folders, as Fooocus does) and
prunes old images when a size or age limit is set.

Threading: listener callbacks run on the submitting thread (the insert) and on the GPU worker
thread (everything else), so each one does a single short INSERT/UPDATE on its own write
connection (WAL, ``synchronous=NORMAL``: a commit is a write to the log, no fsync). Queries use a
second, read-only connection with its own lock, so a slow listing never holds up the worker.
Progress and preview events are not stored (the live engine has the latest progress).

Crash recovery: opening the history marks every job a previous process left ``queued`` or
``running`` as ``failed`` with error code ``interrupted`` (their ids are in
:attr:`JobHistory.interrupted_job_ids`). One server process per data folder: a second process
opening the same database would mark the first one's live jobs interrupted.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from engine.core.errors import HooocusError, InvalidRequest
from engine.core.events import Cancelled, Done, Event, Failed, ImageReady, Started
from engine.core.jobs import Engine, Job
from engine.core.outputs import prune_outputs, write_image
from engine.core.settings import Settings

log = logging.getLogger("hooocus.history")

HISTORY_FILE_NAME = "history.sqlite3"
MAX_LIST_LIMIT = 500
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

#: _MIGRATIONS[i] takes the schema from version i to i + 1. Append, never edit a released one.
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE jobs (
            job_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            state TEXT NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            request_json TEXT NOT NULL,
            resolved_json TEXT,
            seeds_json TEXT,
            error_json TEXT
        )""",
        "CREATE INDEX jobs_by_time ON jobs (created_at DESC, job_id DESC)",
        "CREATE INDEX jobs_by_owner_time ON jobs (owner, created_at DESC, job_id DESC)",
        "CREATE INDEX jobs_by_state ON jobs (state)",
        """CREATE TABLE images (
            job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            seed TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            mime TEXT NOT NULL,
            width INTEGER NOT NULL,
            height INTEGER NOT NULL,
            size_bytes INTEGER NOT NULL,
            path TEXT,
            created_at REAL NOT NULL,
            PRIMARY KEY (job_id, idx)
        )""",
        "CREATE INDEX images_by_sha256 ON images (sha256)",
        "CREATE INDEX images_by_path ON images (path)",
    ),
    # A finished job keeps its last progress (GET /v1/jobs/{id} used to show null once it was done).
    ("ALTER TABLE jobs ADD COLUMN progress_json TEXT",),
)
SCHEMA_VERSION = len(_MIGRATIONS)

_JOB_COLUMNS = ("job_id, owner, state, created_at, started_at, finished_at, request_json, resolved_json, "
                "seeds_json, error_json, progress_json")
_IMAGE_COLUMNS = "job_id, idx, seed, sha256, mime, width, height, size_bytes, path"


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text)


class JobHistory:
    """SQLite-backed record of jobs. Open once per process; :meth:`close` when done."""

    def __init__(self, db_path: Path, *, output_dir: Path | None = None, output_max_bytes: int | None = None,
                 output_max_age_days: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.db_path = Path(db_path)
        #: Where finished images are written (dated folders); None = do not write files.
        self.output_dir = None if output_dir is None else Path(output_dir).absolute()
        self.output_max_bytes = output_max_bytes
        self.output_max_age_days = output_max_age_days
        self._clock = clock
        self._closed = False
        self._engines: list[Engine] = []  # attached to (a process has one or two: tests)
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write = self._connect(self.db_path)
            self._migrate()
            #: Jobs a previous process left queued/running, now marked failed/interrupted.
            self.interrupted_job_ids: tuple[str, ...] = self._mark_interrupted()
            self._read = self._connect(self.db_path, read_only=True)
        except sqlite3.Error as exc:
            raise HooocusError(f"cannot open job history {self.db_path}: {exc}") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> JobHistory:
        """The history of a server: ``<data_dir>/history.sqlite3``, images into the output folder."""
        return cls(settings.data_dir / HISTORY_FILE_NAME, output_dir=settings.resolved_output_dir,
                   output_max_bytes=settings.output_max_bytes, output_max_age_days=settings.output_max_age_days)

    # -- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
        if read_only:
            conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        else:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.row_factory = sqlite3.Row
        return conn

    def _migrate(self) -> None:
        conn = self._write
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = 0 if row is None else int(row[0])
        if version > SCHEMA_VERSION:
            raise HooocusError(f"job history {self.db_path} has schema version {version}; this hooocus "
                               f"knows up to {SCHEMA_VERSION} (written by a newer release?)")
        for target in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (target + 1,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _mark_interrupted(self) -> tuple[str, ...]:
        rows = self._write.execute("SELECT job_id FROM jobs WHERE state IN ('queued', 'running')").fetchall()
        if rows:
            error = _dumps({"code": "interrupted",
                            "message": "the server stopped before this job finished (crash or kill)"})
            self._write.execute("UPDATE jobs SET state = 'failed', error_json = ?, finished_at = ? "
                                "WHERE state IN ('queued', 'running')", (error, self._clock()))
            log.warning("marked %d unfinished job(s) from a previous run as interrupted", len(rows))
        return tuple(row[0] for row in rows)

    def close(self) -> None:
        """Close the database. Events that still arrive afterwards are ignored. Idempotent."""
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._write.close()
            self._read.close()

    def __enter__(self) -> JobHistory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording ---------------------------------------------------------------------------

    def attach(self, engine: Engine) -> None:
        """Record every job submitted to ``engine`` from now on. Call before the first submit.
        Attaching to the same engine again changes nothing: a job is recorded (and its images
        written) once, whichever of runtime and app attached it first."""
        if any(attached is engine for attached in self._engines):
            return
        self._engines.append(engine)
        engine.add_job_listener(self.record_job)

    def record_job(self, job: Job) -> None:
        """Insert ``job`` and follow its events (replaying any that already happened)."""
        self._execute("INSERT OR IGNORE INTO jobs (job_id, owner, state, created_at, request_json) "
                      "VALUES (?, ?, 'queued', ?, ?)",
                      (job.job_id, job.owner, job.created_at, _dumps(job.request.model_dump(mode="json"))),
                      job_id=job.job_id)
        job.subscribe(partial(self._on_event, job), after_seq=0)

    def _on_event(self, job: Job, event: Event) -> None:
        # Runs under the job's lock on the emitting thread: one statement, no waiting.
        if isinstance(event, Started):
            self._execute("UPDATE jobs SET state = 'running', started_at = ?, resolved_json = ?, seeds_json = ? "
                          "WHERE job_id = ?",
                          (job.started_at or self._clock(), _dumps(event.params),
                           _dumps([str(s) for s in event.seeds]), job.job_id), job_id=job.job_id)
        elif isinstance(event, ImageReady):
            self._record_image(job, event)
        elif isinstance(event, (Done, Cancelled, Failed)):
            if isinstance(event, Done):
                state, error = "done", None
            elif isinstance(event, Cancelled):
                state, error = "cancelled", {"code": "cancelled", "reason": event.reason,
                                             "message": f"job cancelled ({event.reason})"}
            else:
                state, error = "failed", {"code": event.code, "message": event.message, "error_id": event.error_id}
            progress = job.last_progress
            progress_json = None if progress is None else _dumps({
                "step": progress.step, "total_steps": progress.total_steps, "stage": progress.stage,
                "image_index": progress.image_index, "image_count": progress.image_count})
            self._execute("UPDATE jobs SET state = ?, finished_at = ?, error_json = ?, progress_json = ? "
                          "WHERE job_id = ?",
                          (state, job.finished_at or self._clock(), None if error is None else _dumps(error),
                           progress_json, job.job_id), job_id=job.job_id)
        # Queued, Progress, Preview and JobWarning events are not stored.

    def _record_image(self, job: Job, image: ImageReady) -> None:
        path: Path | None = None
        if self.output_dir is not None:
            try:
                path = write_image(self.output_dir, image, now=dt.datetime.fromtimestamp(self._clock()))
            except OSError:
                log.exception("could not write image %d of job %s", image.index, job.job_id,
                              extra={"job_id": job.job_id})
        self._execute(f"INSERT OR REPLACE INTO images ({_IMAGE_COLUMNS}, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (job.job_id, image.index, str(image.seed), image.sha256, image.mime, image.width,
                       image.height, len(image.data), None if path is None else str(path), self._clock()),
                      job_id=job.job_id)
        if path is not None and (self.output_max_bytes is not None or self.output_max_age_days is not None):
            self.prune()

    def prune(self) -> list[Path]:
        """Apply the output limits now; rows of deleted files keep their metadata, path becomes NULL."""
        if self.output_dir is None:
            return []
        deleted = prune_outputs(self.output_dir, max_bytes=self.output_max_bytes,
                                max_age_days=self.output_max_age_days,
                                now=dt.datetime.fromtimestamp(self._clock()))
        if deleted:
            self._execute_many("UPDATE images SET path = NULL WHERE path = ?", [(str(p),) for p in deleted])
            log.info("pruned %d old image(s) from %s", len(deleted), self.output_dir)
        return deleted

    def _execute(self, sql: str, params: Sequence[Any], *, job_id: str | None = None) -> None:
        # A history failure must never fail a job: log it and go on.
        with self._write_lock:
            if self._closed:
                return
            try:
                self._write.execute(sql, params)
            except sqlite3.Error:
                log.exception("job history write failed", extra={"job_id": job_id})

    def _execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._write_lock:
            if self._closed:
                return
            try:
                self._write.execute("BEGIN")
                self._write.executemany(sql, rows)
                self._write.execute("COMMIT")
            except sqlite3.Error:
                log.exception("job history write failed")
                if self._write.in_transaction:
                    self._write.execute("ROLLBACK")

    # -- queries -----------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            if self._closed:
                raise HooocusError("the job history is closed")
            return self._read.execute(sql, params).fetchall()

    def list_jobs(self, owner: str | None = None, *, limit: int = 50, before: str | None = None
                  ) -> list[dict[str, Any]]:
        """Jobs, newest first (``owner`` None = everyone's). ``before`` is a job id cursor: the
        page continues with the jobs submitted before that one. Each entry as :meth:`get_job`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}", loc=("limit",))
        where: list[str] = []
        params: list[Any] = []
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        if before is not None:
            cursor = self._query("SELECT created_at FROM jobs WHERE job_id = ?" +
                                 (" AND owner = ?" if owner is not None else ""),
                                 (before, owner) if owner is not None else (before,))
            if not cursor:  # same answer whether the job is someone else's or does not exist
                raise InvalidRequest(f"unknown cursor {before!r}", loc=("before",))
            where.append("(created_at < ? OR (created_at = ? AND job_id < ?))")
            params += [cursor[0][0], cursor[0][0], before]
        sql = f"SELECT {_JOB_COLUMNS} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY created_at DESC, job_id DESC LIMIT ?", (*params, limit))
        return self._with_images(rows)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        """One job in the shape of :meth:`engine.core.jobs.Job.info` (``progress``: the last one seen) plus
        ``request`` (as submitted) and a ``path`` per image (None when not written or pruned).
        A cancelled job's ``error`` is ``{"code": "cancelled", "reason": ...}``."""
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,))
        jobs = self._with_images(rows)
        return jobs[0] if jobs else None

    def image_path(self, sha256: str) -> Path | None:
        """The file of an image we wrote with this content hash, if it is still on disk."""
        sha256 = sha256.lower()
        if not _SHA256_RE.match(sha256):
            return None
        rows = self._query("SELECT path FROM images WHERE sha256 = ? AND path IS NOT NULL "
                           "ORDER BY created_at DESC", (sha256,))
        for row in rows:
            path = Path(row["path"])
            if path.is_file():
                return path
        return None

    def image_owners(self, sha256: str) -> frozenset[str]:
        """The principals whose recorded jobs produced an image with this content hash."""
        sha256 = sha256.lower()
        if not _SHA256_RE.match(sha256):
            return frozenset()
        rows = self._query("SELECT DISTINCT jobs.owner FROM images JOIN jobs ON jobs.job_id = images.job_id "
                           "WHERE images.sha256 = ?", (sha256,))
        return frozenset(row[0] for row in rows)

    def _with_images(self, rows: list[sqlite3.Row]) -> list[dict[str, Any]]:
        if not rows:
            return []
        ids = [row["job_id"] for row in rows]
        images: dict[str, list[dict[str, Any]]] = {job_id: [] for job_id in ids}
        placeholders = ", ".join("?" * len(ids))
        for img in self._query(f"SELECT {_IMAGE_COLUMNS} FROM images WHERE job_id IN ({placeholders}) "
                               "ORDER BY job_id, idx", ids):
            images[img["job_id"]].append({
                "type": "image", "job_id": img["job_id"], "index": img["idx"], "seed": img["seed"],
                "mime": img["mime"], "width": img["width"], "height": img["height"], "sha256": img["sha256"],
                "size_bytes": img["size_bytes"], "path": img["path"]})
        return [{
            "job_id": row["job_id"],
            "state": row["state"],
            "owner": row["owner"],
            "created_at": row["created_at"],
            "started_at": row["started_at"],
            "finished_at": row["finished_at"],
            "seeds": _loads(row["seeds_json"]) or [],
            "params": _loads(row["resolved_json"]) or {},
            "progress": _loads(row["progress_json"]),
            "images": images[row["job_id"]],
            "error": _loads(row["error_json"]),
            "request": _loads(row["request_json"]),
        } for row in rows]
