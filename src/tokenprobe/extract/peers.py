"""How the ranks of one distributed run see each other: through the activation store they share.

Each rank runs its share of the plan's batches (``World.owns``) and writes every finished batch to
the same checkpoint folder, the store, as one process would. Beside the shards each rank keeps a
status file, ``ranks/rank<r>.json``: where it runs (host, pid, its log), how many batches it has
done, a heartbeat counter a background thread bumps every few seconds, and at the end ``done``
with its extraction figures, or ``failed`` with its error.

Rank 0 runs its own share, then waits for the others' shards, counting them into its progress bar
as they land, until every batch of the plan is on disk; it reads the union in plan order from there.
It stops with an error naming the rank when a rank reports a failure, when a rank on its own host
has died (its pid is gone), or when a rank's heartbeat has not moved for ``TOKENPROBE_RANK_TIMEOUT``
seconds (300 by default). Finished batches stay in the store, so the same command, with any number
of processes, resumes.

The store is the gather: ``positions x layers x width x bytes`` travel once, through the filesystem
every rank writes to (on several nodes, a shared one: rank 0 checks at the start that it can see
every rank's status file, and says so if not).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tokenprobe.distributed import World, rank_timeout
from tokenprobe.errors import TokenprobeError
from tokenprobe.extract.plan import RunPlan
from tokenprobe.extract.sinks import shard_name
from tokenprobe.files import write_json

STATUS_DIR = "ranks"
GRACE_S = 3.0  # a failing rank waits this long before exiting, so rank 0 names it before the launcher ends both
MISSING_S = 10.0  # every rank done but a batch still absent this long: an error naming it, not a wait forever


def node_id() -> str:
    """This machine, told apart from others of the same host name (containers): host name and boot id."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def clear_statuses(folder: Path) -> None:
    """Removes an earlier run's rank files (rank 0, before any rank of this run writes its own)."""
    status_dir = Path(folder) / STATUS_DIR
    if status_dir.is_dir():
        for path in status_dir.glob("rank*.json"):
            path.unlink(missing_ok=True)


class Peers:
    """This rank's status file and heartbeat, and (on rank 0) the watch over the others."""

    def __init__(self, folder: Path, world: World, plan: RunPlan, batch_size: int, log: Path | None = None):
        self.folder = Path(folder)
        self.world, self.plan, self.batch_size = world, plan, batch_size
        self.timeout = rank_timeout()
        self.interval = min(5.0, self.timeout / 4)
        self.status: dict[str, Any] = {"rank": world.rank, "host": socket.gethostname(), "node": node_id(),
                                       "pid": os.getpid(),
                                       "log": str(log) if log else None, "status": "running", "batches": 0,
                                       "beats": 0}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (beats, when rank 0 saw them change)
        self._last_check = 0.0
        self.final: dict[int, dict[str, Any]] = {}  # rank 0: every rank's last status, once all are done
        numbers = range((len(plan.chunks) + batch_size - 1) // batch_size)
        # Rank 0's view of the other ranks' batches still to land: first chunk -> tokens it runs.
        self.pending = {k * batch_size: plan.tokens_of(k * batch_size, batch_size) for k in numbers
                        if not world.owns(k)} if world.main else {}

    # ------------------------------------------------------------------------------ this rank

    def path(self, rank: int) -> Path:
        return self.folder / STATUS_DIR / f"rank{rank}.json"

    def _write(self, **fields: Any) -> None:
        with self._lock:
            self.status.update(fields)
            self.path(self.world.rank).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path(self.world.rank), self.status)

    def start(self) -> Peers:
        self._write()
        self._thread = threading.Thread(target=self._beat, name="tokenprobe-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write(beats=self.status["beats"] + 1)
            except OSError:
                pass  # a full or vanished disk shows in the main thread's own writes

    def batch_done(self, batches: int) -> None:
        self.status["batches"] = batches  # written with the next heartbeat

    def finish(self, extraction: dict[str, Any]) -> None:
        self.stop()
        self._write(status="done", extraction=extraction)

    def fail(self, message: str, resumable: bool = True, status: str = "failed") -> None:
        """Says why this rank stops (`status` "stopped": it was told to, by the launcher or Ctrl-C, so another
        rank's failure is likelier the cause); `resumable`: whether a rerun of the same command can help."""
        self.stop()
        try:
            self._write(status=status, error=message, resumable=resumable)
        except OSError:
            pass

    def stop(self) -> None:
        """Ends the heartbeat (and waits for its last write): rank 0 once every batch is in, every rank at its end."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def share_of(self, rank: int) -> dict[str, Any]:
        """A rank's batches and tokens as the plan gives them (for a rank lost after its last batch)."""
        firsts = range(0, len(self.plan.chunks), self.batch_size)
        mine = [first for k, first in enumerate(firsts) if k % self.world.size == rank]
        return {"batches": len(mine), "tokens": sum(self.plan.tokens_of(f, self.batch_size) for f in mine),
                "lost": True}

    # ---------------------------------------------------------------------------- the others

    def statuses(self) -> dict[int, dict[str, Any]]:
        """Every rank's last status, as rank 0 reads it (a rank whose file is missing or torn is absent)."""
        out = {}
        for rank in range(self.world.size):
            try:
                out[rank] = json.loads(self.path(rank).read_text())
            except (OSError, ValueError):
                continue
        return out

    def check_visible(self) -> None:
        """Rank 0, after the barrier every rank passes once its status file is written: each must be here."""
        missing = [rank for rank in range(self.world.size) if rank != self.world.rank and not self.path(rank).is_file()]
        if missing:
            raise TokenprobeError(
                f"rank {missing[0]}'s files are not in {self.folder} as rank 0 on {socket.gethostname()} sees it: the "
                "cache folder must be one every node shares (--cache-dir or TOKENPROBE_CACHE on a shared filesystem)")

    def trouble(self, statuses: dict[int, dict[str, Any]] | None = None) -> str | None:
        """What went wrong with another rank, in words, or None: a reported failure, a dead process on this
        node, a heartbeat that has not moved for the timeout, or (last, as the likely consequence of one of
        those) a rank that was stopped."""
        statuses = self.statuses() if statuses is None else statuses
        now = time.monotonic()
        here = node_id()
        found: dict[str, str] = {}
        for rank, status in sorted(statuses.items()):
            if rank == self.world.rank:
                continue
            where = f"rank {rank} (pid {status.get('pid')} on {status.get('host')})"
            log = f"; its log: {status['log']}" if status.get("log") else ""
            state = status.get("status")
            if state in ("failed", "stopped"):
                found.setdefault(state, f"{where} {'failed' if state == 'failed' else 'was stopped'}: "
                                        f"{status.get('error')}{log}")
                continue
            if state != "running":
                continue
            if status.get("node") == here and not _alive(int(status.get("pid", 0))):
                found.setdefault("dead", f"{where} died before finishing its batches (killed, or out of memory?){log}")
                continue
            beats = int(status.get("beats", 0))
            if rank not in self._seen or self._seen[rank][0] != beats:
                self._seen[rank] = (beats, now)
            elif now - self._seen[rank][1] > self.timeout:
                found.setdefault("silent", f"{where} has not been heard from for {self.timeout:g} s (killed, out of "
                                           f"memory, or its node lost? TOKENPROBE_RANK_TIMEOUT sets how long to wait){log}")
        if self.world.main:
            absent = [rank for rank in range(self.world.size) if rank != self.world.rank and rank not in statuses]
            if absent:
                found.setdefault("absent", f"rank {absent[0]}'s status file is gone from {self.folder / STATUS_DIR}")
        for kind in ("failed", "dead", "silent", "absent", "stopped"):
            if kind in found:
                return found[kind]
        return None

    def resumable(self, statuses: dict[int, dict[str, Any]] | None = None) -> bool:
        """False when a rank failed with an error a rerun of the same command would meet again (its own advice
        says what to change); True for deaths, silences, interruptions and unexpected errors."""
        statuses = self.statuses() if statuses is None else statuses
        return all(s.get("resumable", True) for r, s in statuses.items() if s.get("status") == "failed")

    def check(self, force: bool = False) -> None:
        """Between batches: stops this rank with an error when another has failed (at most once a second)."""
        now = time.monotonic()
        if not force and now - self._last_check < 1.0:
            return
        self._last_check = now
        statuses = self.statuses()
        problem = self.trouble(statuses)
        if problem is not None:
            raise TokenprobeError(self.stopped_because(problem, self.resumable(statuses)))

    def stopped_because(self, problem: str, resumable: bool = True) -> str:
        if not resumable:
            return problem
        return (f"{problem}; the batches finished so far are kept in {self.folder}: run the same command again "
                "(with any number of processes) to resume")

    def landed(self) -> int:
        """Rank 0: tokens of the other ranks' batches that have landed since the last call."""
        if not self.pending:
            return 0
        folder = self.folder / f"bs{self.batch_size}"
        try:
            names = {entry.name for entry in os.scandir(folder)}
        except OSError:
            return 0
        arrived = [first for first in self.pending if shard_name(first) in names]
        return sum(self.pending.pop(first) for first in arrived)

    def wait(self, on_tokens) -> dict[int, dict[str, Any]]:
        """Rank 0, after its own share: waits until every batch of the plan is on disk and every rank is done,
        calling `on_tokens(n)` as other ranks' batches land; returns every rank's final status."""
        all_done_since = None
        while True:
            landed = self.landed()
            if landed:
                on_tokens(landed)
            statuses = self.statuses()
            done = all(statuses.get(rank, {}).get("status") == "done" for rank in range(self.world.size)
                       if rank != self.world.rank)
            if done and not self.pending:
                return statuses
            problem = self.trouble(statuses)
            if problem is not None:
                failed = any(s.get("status") == "failed" for r, s in statuses.items() if r != self.world.rank)
                if not self.pending and not failed:
                    return statuses  # every batch is here: a rank lost after its last one costs nothing
                raise TokenprobeError(self.stopped_because(problem, self.resumable(statuses)))
            if done:  # every rank says it is done, yet batches are missing (removed by hand, or an unreadable folder)
                all_done_since = all_done_since or time.monotonic()
                if time.monotonic() - all_done_since > MISSING_S:
                    first = min(self.pending)
                    raise TokenprobeError(self.stopped_because(
                        f"every rank is done but {len(self.pending)} batches are missing from {self.folder} (the "
                        f"first: {shard_name(first)})"))
            time.sleep(0.2 if done else 0.5)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
