"""The ledger: which CPUs, memory, low-memory slots, consoles and devices slices hold.

One SQLite file (stdlib sqlite3), one row per launch.  Rows carry the host's boot id
(/proc/sys/kernel/random/boot_id): only rows of the running host boot can hold anything; rows
of earlier boots are history, so a host reboot starts with everything free.

A launch reserves in one ``BEGIN IMMEDIATE`` transaction: it checks the rows that hold
resources and inserts its own, or refuses.  SQLite lets one such transaction run at a time, so
of two launches that want the same CPUs, the second sees the first's row and is refused.

Life of a row (``state``)::

    reserved ──► launching ──► running
        │            └───────► failed          (holds until the host reboots, or a relaunch/stop)
        └─► (deleted)   the launch gave up before the first write to the machine

``reserved`` holds only while its process lives (it has not touched the machine yet);
``launching`` holds even if its process died: the CPUs may be running.  A relaunch with exactly
the resources of a running, failed or crashed slice replaces it (``replaced``) once it starts
writing; ``coreslice stop`` INITs a slice's CPUs and marks it ``stopped``.

The low-memory slot records (boot/lowmem.py) stay the physical truth when this file is lost;
the ledger adds names, history and the lock between processes.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from coreslice.errors import UsageError
from coreslice.host.sysfs import format_cpu_list
from coreslice.units import format_size

DEFAULT_PATH = Path("/var/lib/coreslice/ledger.sqlite3")
# Where the ledger goes when /var/lib is read-only (e.g. a host whose root is shared read-only):
# /run is a tmpfs, emptied at reboot, which the boot id rule makes harmless.
FALLBACK_PATH = Path("/run/coreslice/ledger.sqlite3")
ENV = "CORESLICE_LEDGER"

HOLDING = ("reserved", "launching", "running", "failed")
REPLACEABLE = ("running", "failed")
# The steps of a launch, in order, as recorded in ``phase`` before each begins: a launcher killed
# in one leaves the row saying how far it got (`coreslice list` shows it, `stop` recovers it).
PHASES = ("reserved", "devices", "parking", "writing", "waking", "woken")
# Columns added after version 1, with the SQL that adds each to an older file.
_ADDED_COLUMNS = {"request": "TEXT", "on_crash": "TEXT", "phase": "TEXT", "efi_status": "INTEGER"}
BUSY_TIMEOUT = 30.0  # seconds a launch waits for another one's transaction

# SQLite's messages for a file it cannot open, lock or write (anything else is a damaged file).
_ACCESS_PROBLEM = re.compile(r"locked|readonly|read-only|unable to open|permission|disk I/O", re.I)

# 2: the namespaces table (image install); 3: slices.request, on_crash and phase (lifecycle);
# 4: slices.efi_status (status reads the EFI stubs' record).
# An older file gains what it lacks on the next write (_upgrade); reads of it see NULLs.
SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS slices (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    boot_id     TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    cpus        TEXT    NOT NULL,           -- JSON list of host logical CPU numbers
    apic_ids    TEXT    NOT NULL,           -- JSON list, same order
    mem_base    INTEGER NOT NULL,
    mem_size    INTEGER NOT NULL,
    low_slot    INTEGER,                    -- base of the low-memory slot (trampoline)
    console     TEXT,                       -- "io:0x2f8" or a PCI address
    devices     TEXT    NOT NULL DEFAULT '[]',  -- JSON list of PCI addresses
    kernel      TEXT,
    initrd      TEXT,
    cmdline     TEXT,
    pid         INTEGER,                    -- the coreslice process that launched it
    error       TEXT,
    replaces    TEXT    NOT NULL DEFAULT '[]',  -- JSON list of row ids this launch relaunches
    request     TEXT,                       -- JSON list: the `coreslice boot` arguments (restart)
    on_crash    TEXT,                       -- "restart" or "none": what `coreslice watch` does
    phase       TEXT,                       -- the launch's last step begun (PHASES), for crash recovery
    efi_status  INTEGER,                    -- physical address of the EFI stubs' status record (boot/efi.py)
    reserved_at REAL    NOT NULL,           -- Unix times
    launched_at REAL,
    running_at  REAL,
    ended_at    REAL
);
CREATE INDEX IF NOT EXISTS slices_by_boot ON slices (boot_id, state);
-- Which NVMe namespace holds which VF's disk (coreslice image install).  Not per host boot: a
-- namespace stays attached to its secondary controller across reboots.
CREATE TABLE IF NOT EXISTS namespaces (
    pf           TEXT    NOT NULL,          -- the PF's PCI address
    subsysnqn    TEXT    NOT NULL,
    nsid         INTEGER NOT NULL,
    vf_index     INTEGER NOT NULL,
    cntlid       INTEGER NOT NULL,          -- the VF's secondary controller
    created      INTEGER NOT NULL,          -- 1: image install created the namespace
    image        TEXT,                      -- the image out-dir (image.json)
    installed_at REAL    NOT NULL,
    PRIMARY KEY (subsysnqn, nsid)
);
"""


class LedgerError(UsageError):
    """The ledger file cannot be opened or written (found before the first write: exit 2)."""


class LedgerConflict(UsageError):
    """Another slice of this host boot holds some of the resources (nothing was touched)."""


@dataclass(frozen=True)
class SliceRecord:
    """What a launch records, and what the ledger gives back (``id`` and ``state`` set)."""

    name: str
    cpus: tuple[int, ...]
    apic_ids: tuple[int, ...]
    mem_base: int
    mem_size: int
    low_slot: int | None = None
    console: str | None = None
    devices: tuple[str, ...] = ()
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    # Filled in by the ledger:
    id: int | None = None
    boot_id: str | None = None
    state: str | None = None
    pid: int | None = None
    error: str | None = None
    replaces: tuple[int, ...] = ()
    request: tuple[str, ...] | None = None   # the boot arguments, as `restart` replays them
    on_crash: str | None = None
    phase: str | None = None
    efi_status: int | None = None            # where the slice's EFI ResetSystem stub records its call
    times: dict = field(default_factory=dict, compare=False)

    @property
    def mem_end(self) -> int:
        return self.mem_base + self.mem_size

    def resources(self) -> str:
        return (f"CPUs {format_cpu_list(list(self.cpus))}, {format_size(self.mem_size)}@0x{self.mem_base:x}"
                + (f", console {self.console}" if self.console else ""))

    def same_resources(self, other: "SliceRecord") -> bool:
        return (set(self.apic_ids) == set(other.apic_ids) and self.mem_base == other.mem_base
                and self.mem_size == other.mem_size)

    def conflict_with(self, other: "SliceRecord") -> str | None:
        """What of ``other``'s resources this record also wants, or None."""
        cpus = sorted(set(self.cpus) & set(other.cpus))
        if cpus:
            return f"CPU{'s' if len(cpus) > 1 else ''} {format_cpu_list(cpus)}"
        if self.mem_base < other.mem_end and other.mem_base < self.mem_end:
            lo, hi = max(self.mem_base, other.mem_base), min(self.mem_end, other.mem_end)
            return f"memory 0x{lo:x}-0x{hi - 1:x}"
        if self.low_slot is not None and self.low_slot == other.low_slot:
            return f"low-memory slot 0x{self.low_slot:x}"
        if self.console and self.console == other.console:
            return f"console {self.console}"
        devices = sorted(self.pci_functions() & other.pci_functions())
        if devices:
            return f"PCI function{'s' if len(devices) > 1 else ''} {', '.join(devices)}"
        return None

    def pci_functions(self) -> set[str]:
        """Assigned devices and a PCI console: one function cannot serve two slices either way."""
        console = {self.console} if self.console and not self.console.startswith("io:") else set()
        return set(self.devices) | console

    def to_json(self) -> dict:
        return {
            "id": self.id, "name": self.name, "state": self.state, "boot_id": self.boot_id,
            "cpus": list(self.cpus), "apic_ids": list(self.apic_ids),
            "memory": {"base": self.mem_base, "size": self.mem_size},
            "low_slot": self.low_slot, "console": self.console, "devices": list(self.devices),
            "kernel": self.kernel, "initrd": self.initrd, "cmdline": self.cmdline,
            "pid": self.pid, "error": self.error, "replaces": list(self.replaces), "times": self.times,
            "request": list(self.request) if self.request is not None else None,
            "on_crash": self.on_crash, "phase": self.phase, "efi_status": self.efi_status,
        }


def resolve_path(arg: Path | str | None = None) -> Path:
    """--ledger, else $CORESLICE_LEDGER, else /var/lib/coreslice when writable, else /run/coreslice."""
    if arg:
        return Path(arg)
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    for d in (DEFAULT_PATH.parent, DEFAULT_PATH.parent.parent):
        if d.is_dir():
            if os.access(d, os.W_OK):
                return DEFAULT_PATH
            break
    return FALLBACK_PATH


def pid_alive(pid: int | None) -> bool:
    if not pid or pid < 0:  # kill(-N, 0) would ask about a process group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid_t that large
        return False
    except PermissionError:
        return True
    return True


_COLUMNS = ("id", "boot_id", "name", "state", "cpus", "apic_ids", "mem_base", "mem_size", "low_slot",
            "console", "devices", "kernel", "initrd", "cmdline", "pid", "error", "replaces",
            "reserved_at", "launched_at", "running_at", "ended_at", *_ADDED_COLUMNS)


class _DamagedRow(Exception):
    """A row whose columns do not hold what the schema says (turned into a LedgerError)."""


def _json_list(row: sqlite3.Row, col: str, kind: type) -> tuple:
    try:
        value = json.loads(row[col])
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise _DamagedRow(f"row {row['id']}: column {col} is not a JSON list of {kind.__name__}")
    return tuple(value)


def _typed(row: sqlite3.Row, col: str, kind, nullable: bool = True):
    value = row[col]
    if (value is None and not nullable) or (value is not None and not isinstance(value, kind)):
        raise _DamagedRow(f"row {row['id']}: column {col} holds {type(value).__name__}, not what coreslice wrote")
    return value


def _record(row: sqlite3.Row) -> SliceRecord:
    """A row as a record.  SQLite keeps any value in any column, so a hand-edited or damaged file
    can hold anything: check each column here, where every reader passes, instead of failing
    later in whatever formats it."""
    t = {k: _typed(row, k, (int, float)) for k in ("reserved_at", "launched_at", "running_at", "ended_at")}
    return SliceRecord(
        id=_typed(row, "id", int, False), boot_id=_typed(row, "boot_id", str, False),
        name=_typed(row, "name", str, False), state=_typed(row, "state", str, False),
        cpus=_json_list(row, "cpus", int), apic_ids=_json_list(row, "apic_ids", int),
        mem_base=_typed(row, "mem_base", int, False), mem_size=_typed(row, "mem_size", int, False),
        low_slot=_typed(row, "low_slot", int), console=_typed(row, "console", str),
        devices=_json_list(row, "devices", str), kernel=_typed(row, "kernel", str),
        initrd=_typed(row, "initrd", str), cmdline=_typed(row, "cmdline", str), pid=_typed(row, "pid", int),
        error=_typed(row, "error", str), replaces=_json_list(row, "replaces", int), times=t,
        request=_json_list(row, "request", str) if row["request"] is not None else None,
        on_crash=_typed(row, "on_crash", str), phase=_typed(row, "phase", str),
        efi_status=_typed(row, "efi_status", int),
    )


class Ledger:
    """The ledger file at ``path`` as seen from host boot ``boot_id``.

    Each call opens its own short connection, so no lock outlives the call.  ``readonly`` (for
    dry runs, ``plan`` and ``list``) never creates the file: a missing ledger is an empty one.
    """

    def __init__(self, path: Path | str, boot_id: str, *, readonly: bool = False):
        self.path = Path(path)
        self.boot_id = boot_id
        self.readonly = readonly
        if not boot_id and not readonly:
            raise LedgerError("the host boot id is unknown (/proc/sys/kernel/random/boot_id); "
                              "cannot tell this boot's slices from earlier ones")

    # -- connections ----------------------------------------------------------------------------
    def _damaged(self, what: str) -> LedgerError:
        return LedgerError(f"ledger {self.path} is damaged ({what}); move it aside (mv {self.path} "
                           f"{self.path}.damaged) to start an empty one, or use another with --ledger PATH "
                           f"(e.g. coreslice list --ledger PATH)")

    def _check_file(self) -> bool:
        """Whether the file exists; LedgerError when it is something SQLite must not open: a
        FIFO would block the open, a device or directory is no ledger."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        except OSError as e:  # a symlink loop, a file under a non-directory, no permission
            raise LedgerError(f"cannot open the ledger {self.path}: {e.strerror}; pass --ledger PATH "
                              f"(or set {ENV}) to a readable file") from None
        if not stat.S_ISREG(st.st_mode):
            raise LedgerError(f"ledger {self.path} is not a regular file; pass --ledger PATH (or set {ENV}) "
                              "to an SQLite file coreslice wrote, or to a new path")
        return True

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection | None]:
        # A read-only ledger never creates the file: a missing ledger is an empty one.
        if not self._check_file() and self.readonly:
            yield None
            return
        try:
            if self.readonly:
                con = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                                      timeout=BUSY_TIMEOUT, isolation_level=None)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                con = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise LedgerError(f"cannot open the ledger {self.path}: {e}; pass --ledger PATH "
                              f"(or set {ENV}) to a writable location") from e
        con.row_factory = sqlite3.Row
        try:
            # Create the schema once: running it on every connection would rewrite the file's
            # header, so that even a refused launch changed the ledger.
            if not self.readonly and con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                # Under the write lock, checked again: of two first writers, one upgrades.
                con.execute("BEGIN IMMEDIATE")
                try:
                    if con.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                        for statement in SCHEMA.split(";"):
                            if statement.strip():
                                con.execute(statement)
                        _upgrade(con)
                        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    con.execute("COMMIT")
                except BaseException:
                    with suppress(sqlite3.Error):
                        con.execute("ROLLBACK")
                    raise
            yield con
        except _DamagedRow as e:
            raise self._damaged(str(e)) from None
        except sqlite3.OperationalError as e:
            if not _ACCESS_PROBLEM.search(str(e)):  # e.g. "no such column": not a ledger we wrote
                raise self._damaged(str(e)) from None
            raise LedgerError(f"ledger {self.path}: {e}; check that the file is writable and not "
                              f"locked by a hung coreslice process") from e
        except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
            raise self._damaged(str(e)) from None
        finally:
            con.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: the write lock first, so check-then-insert is atomic across processes."""
        with self._connect() as con:
            assert con is not None
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                with suppress(sqlite3.Error):  # a damaged file may refuse this too: keep the first error
                    con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _select(self, con: sqlite3.Connection | None, where: str, args: Sequence) -> list[SliceRecord]:
        if con is None:
            return []
        try:
            have = {r[1] for r in con.execute("PRAGMA table_info(slices)")}
            # An older file read without upgrading it (read-only) lacks the newer columns.
            cols = [c if c in have or c not in _ADDED_COLUMNS else f"NULL AS {c}" for c in _COLUMNS]
            rows = con.execute(f"SELECT {', '.join(cols)} FROM slices WHERE {where} ORDER BY id", args)
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        return [_record(r) for r in rows]

    def _holding(self, con: sqlite3.Connection | None) -> list[SliceRecord]:
        marks = ",".join("?" * len(HOLDING))
        rows = self._select(con, f"boot_id = ? AND state IN ({marks})", (self.boot_id, *HOLDING))
        # A reservation whose process died before detaching devices never touched the machine:
        # it holds nothing.  One that died while detaching holds until `stop` gives them back.
        return [r for r in rows if r.state != "reserved" or pid_alive(r.pid) or not untouched(r)]

    # -- reading ----------------------------------------------------------------------------------
    def holding(self) -> list[SliceRecord]:
        """Slices of this host boot that hold resources, oldest first."""
        with self._connect() as con:
            return self._holding(con)

    def slices(self, history: bool = False) -> list[SliceRecord]:
        """This boot's holding slices, or with ``history`` every row of every boot."""
        if not history:
            return self.holding()
        with self._connect() as con:
            return self._select(con, "1", ())

    def get(self, row_id: int) -> SliceRecord | None:
        with self._connect() as con:
            rows = self._select(con, "id = ?", (row_id,))
        return rows[0] if rows else None

    # -- changing -------------------------------------------------------------------------------
    def reserve(self, rec: SliceRecord, *, relaunch: bool = True) -> SliceRecord:
        """Check ``rec`` against every holding slice and record it as ``reserved``, atomically.

        Raises LedgerConflict naming the slice in the way.  A slice with exactly the same CPUs
        and memory that is running, failed, or whose launcher died is relaunched: the new row
        notes it in ``replaces`` and takes over when it starts writing (begin_launch).
        """
        if self.readonly:
            raise LedgerError("internal: reserve() on a read-only ledger")
        now = time.time()
        with self._transaction() as con:
            for dead in self._select(con, "boot_id = ? AND state = 'reserved'", (self.boot_id,)):
                if not pid_alive(dead.pid) and untouched(dead):  # gave up (or died) before touching the machine
                    con.execute("DELETE FROM slices WHERE id = ?", (dead.id,))
            replaces = _check(rec, self._holding(con), relaunch)
            cur = con.execute(
                "INSERT INTO slices (boot_id, name, state, cpus, apic_ids, mem_base, mem_size, low_slot, "
                "console, devices, kernel, initrd, cmdline, pid, replaces, reserved_at, request, on_crash, phase, "
                "efi_status) VALUES (?, ?, 'reserved', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?)",
                (self.boot_id, rec.name, json.dumps(list(rec.cpus)), json.dumps(list(rec.apic_ids)),
                 rec.mem_base, rec.mem_size, rec.low_slot, rec.console, json.dumps(list(rec.devices)),
                 rec.kernel, rec.initrd, rec.cmdline, os.getpid(), json.dumps(replaces), now,
                 json.dumps(list(rec.request)) if rec.request is not None else None, rec.on_crash,
                 rec.efi_status))
            row_id = cur.lastrowid
        got = self.get(row_id)
        assert got is not None
        return got

    def check(self, rec: SliceRecord, *, relaunch: bool = True) -> None:
        """reserve()'s conflict check alone, to refuse early with the same message (a record
        without slot and console checks CPUs, memory and name only)."""
        with self._connect() as con:
            _check(rec, self._holding(con), relaunch)

    def begin_launch(self, row_id: int) -> None:
        """The machine is about to change: from now on the slice holds until reboot or stop,
        and the slices it relaunches are gone."""
        now = time.time()
        with self._transaction() as con:
            (replaces,) = con.execute("SELECT replaces FROM slices WHERE id = ?", (row_id,)).fetchone()
            con.execute("UPDATE slices SET state = 'launching', launched_at = ? WHERE id = ?", (now, row_id))
            for old in json.loads(replaces):
                con.execute("UPDATE slices SET state = 'replaced', ended_at = ?, error = ? WHERE id = ? "
                            "AND state IN ({})".format(",".join("?" * len(HOLDING))),
                            (now, f"relaunched as row {row_id}", old, *HOLDING))

    def finish(self, row_id: int, error: str | None = None) -> None:
        """running, or failed with ``error`` (still holding: its CPUs may run)."""
        now = time.time()
        with self._transaction() as con:
            if error is None:
                con.execute("UPDATE slices SET state = 'running', running_at = ? WHERE id = ?", (now, row_id))
            else:
                con.execute("UPDATE slices SET state = 'failed', ended_at = ?, error = ? WHERE id = ?",
                            (now, error, row_id))

    def release(self, row_id: int) -> None:
        """Forget a reservation whose launch stopped before the first write to the machine."""
        with self._transaction() as con:
            con.execute("DELETE FROM slices WHERE id = ? AND state = 'reserved'", (row_id,))

    def record_namespace(self, *, pf: str, subsysnqn: str, nsid: int, vf_index: int, cntlid: int,
                         created: bool, image: str | None) -> None:
        """The namespace now holds VF ``vf_index``'s disk (replacing an older record of it)."""
        with self._transaction() as con:
            con.execute("INSERT OR REPLACE INTO namespaces (pf, subsysnqn, nsid, vf_index, cntlid, created, image, "
                        "installed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (pf, subsysnqn, nsid, vf_index, cntlid, int(created), image, time.time()))

    def namespaces(self) -> list[dict]:
        """Every recorded namespace -> VF assignment ([] for a ledger from before them)."""
        with self._connect() as con:
            if con is None:
                return []
            try:
                rows = con.execute("SELECT * FROM namespaces ORDER BY pf, nsid").fetchall()
            except sqlite3.OperationalError:  # a version-1 file opened read-only: no such table
                return []
            return [dict(r) for r in rows]

    def set_phase(self, row_id: int, phase: str) -> None:
        """Record the launch step about to begin (one of PHASES)."""
        if phase not in PHASES:
            raise ValueError(f"unknown launch phase {phase!r}")
        with self._transaction() as con:
            con.execute("UPDATE slices SET phase = ? WHERE id = ?", (phase, row_id))

    def mark_stopped(self, row_id: int) -> None:
        with self._transaction() as con:
            con.execute("UPDATE slices SET state = 'stopped', ended_at = ? WHERE id = ?", (time.time(), row_id))


def untouched(rec: SliceRecord) -> bool:
    """A ``reserved`` row whose launch had not begun changing the machine (no phase past it)."""
    return rec.phase in (None, "reserved")


def explain(rec: SliceRecord) -> str | None:
    """For a launch whose process is gone mid-way: what that left, and what recovers it."""
    if rec.state not in ("reserved", "launching") or pid_alive(rec.pid):
        return None
    if untouched(rec):
        return "its launcher died before changing anything; it holds nothing"
    if rec.state == "reserved":
        return (f"its launcher (pid {rec.pid}) died while detaching devices; "
                f"coreslice stop {rec.name} --return-devices gives them back")
    doing = "after its CPU reached the kernel" if rec.phase == "woken" else f"while {rec.phase}"
    return (f"its launcher (pid {rec.pid}) died {doing}; its CPUs may run: "
            f"coreslice stop {rec.name} parks and scrubs it, coreslice restart {rec.name} boots it again")


def _upgrade(con: sqlite3.Connection) -> None:
    """Add the columns a file written by an older coreslice lacks (SQLite: ADD COLUMN only)."""
    have = {r[1] for r in con.execute("PRAGMA table_info(slices)")}
    for col, kind in _ADDED_COLUMNS.items():
        if col not in have:
            con.execute(f"ALTER TABLE slices ADD COLUMN {col} {kind}")


def _check(rec: SliceRecord, holding: list[SliceRecord], relaunch: bool = True) -> list[int]:
    """Raise LedgerConflict if ``rec`` wants what a holding slice has; else the ids of the
    slices it relaunches (exactly the same CPUs and memory).  ``relaunch=False``: resources that
    placement chose as free are never a relaunch: a slice holding them now took them meanwhile."""
    replaces = []
    for old in holding:
        if old.same_resources(rec) and relaunch:
            if old.state in ("reserved", "launching") and pid_alive(old.pid) and old.pid != os.getpid():
                raise LedgerConflict(f"slice '{old.name}' ({old.resources()}) is being launched right now by "
                                     f"process {old.pid}; wait for it to finish, then relaunch")
            replaces.append(old.id)
            continue
        what = rec.conflict_with(old)
        if what is None and old.name != rec.name:
            continue
        t = old.times
        since = _clock(t.get("running_at") or t.get("launched_at") or t.get("reserved_at"))
        fix = (f"relaunch '{old.name}' with exactly its CPUs and memory, or stop it (coreslice stop {old.name})")
        if what is None:
            raise LedgerConflict(f"a slice named '{old.name}' exists ({old.resources()}; {old.state} since {since}); "
                                 f"choose another --name, {fix}")
        verb = "are" if what.startswith(("CPUs ", "PCI functions ")) else "is"
        raise LedgerConflict(f"{what} {verb} held by slice '{old.name}' ({old.resources()}; {old.state} since "
                             f"{since}); choose other resources, {fix}")
    return replaces


def _clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "?"
