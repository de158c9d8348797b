"""A tamper-evident audit trail: JSON Lines events in a SHA-256 hash chain.

Every event is one line of canonical JSON (sorted keys, no spaces) holding `seq` (1, 2,
...), `prev_hash` (the previous event's `event_hash`; 64 zeros for the first) and
`event_hash` = SHA-256 of the canonical JSON of the event without `event_hash`. So:

* an edited line no longer matches its own event_hash (or, if the hash was recomputed,
  the prev_hash recorded by the next line);
* a deleted, inserted or reordered line breaks the seq sequence and the prev_hash links;
* deleting or rewriting the *last* lines is caught by the head anchor `<log>.head` (seq
  and hash of the last event, rewritten atomically after each append). Whoever can
  rewrite both files can forge a consistent history; for that, copy the head hash
  somewhere the writer cannot change (a CI log, a ticket) and compare later.

Appends take an exclusive `fcntl.flock` on the log, read the last event under the lock,
append, fsync, then update the head: concurrent writers on one host interleave safely
(flock is not reliable on NFS). Config and results pass through `secrets.redact` first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import pwd
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qlorax import __version__
from qlorax.artifacts import canonical_json, utc_now, write_json_atomic
from qlorax.errors import QloraxError
from qlorax.fingerprint import detect_environment_kind
from qlorax.ops.secrets import redact

AUDIT_FORMAT = "qlorax-audit/1"
GENESIS_HASH = "0" * 64
_RESERVED = frozenset({"seq", "prev_hash", "event_hash", "format"})
HEAD_SUFFIX = ".head"
_TAIL_CHUNK = 64 * 1024


class AuditLogError(QloraxError):
    """The audit log cannot be appended to (unwritable, or its last line is corrupt)."""


def event_hash(event: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an event without its own `event_hash` field."""
    body = {k: v for k, v in event.items() if k != "event_hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _current_user() -> str:
    """The effective user from the password database ($USER can be set to anything)."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def head_path(log_path: Path) -> Path:
    return Path(str(log_path) + HEAD_SUFFIX)


def _read_last_line(handle: Any) -> tuple[bytes, bool] | None:
    """The last line of an open binary file (without newline) and whether it was complete."""
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    if size == 0:
        return None
    position, buffer = size, b""
    complete = False
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        handle.seek(position)
        buffer = handle.read(step) + buffer
        complete = buffer.endswith(b"\n")
        body = buffer[:-1] if complete else buffer
        cut = body.rfind(b"\n")
        if cut >= 0:
            return body[cut + 1 :], complete
    return (buffer[:-1] if complete else buffer), complete


class AuditLogger:
    """Appends hash-chained audit events (the guide's AuditLogger, made tamper-evident and secret-free)."""

    def __init__(
        self, path: Path | str = "audit.log", environment: str | None = None, user: str | None = None
    ):
        self.path = Path(path)
        self.environment = environment or detect_environment_kind()
        self.user = user or _current_user()
        self.host = socket.gethostname()

    # -- the guide's events -------------------------------------------------------------
    def log_training_start(
        self, config: Mapping[str, Any], config_hash: str, run_dir: Path | str
    ) -> dict[str, Any]:
        """A run begins: its config hash and the config with every secret redacted."""
        return self.log_event(
            "training_start", config_hash=config_hash, config=dict(config), run_dir=str(run_dir)
        )

    def log_training_complete(
        self, results: Mapping[str, Any], artifacts: Mapping[str, Any], run_dir: Path | str
    ) -> dict[str, Any]:
        """A run finished: its results and the SHA-256 of every artifact ({relpath: sha256} or a manifest)."""
        return self.log_event(
            "training_complete",
            results=dict(results),
            artifacts=_artifact_digests(artifacts),
            run_dir=str(run_dir),
        )

    def log_verification(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """A verification finished: its summary (score, runs compared, mismatches)."""
        return self.log_event("verification", summary=dict(summary))

    def log_gates(self, passed: bool, issues: list[str]) -> dict[str, Any]:
        """The quality gates' verdict."""
        return self.log_event("gates", passed=bool(passed), issues=list(issues))

    # -- the chain ----------------------------------------------------------------------
    def log_event(self, event_type: str, **fields: Any) -> dict[str, Any]:
        """Append one event (fields redacted) to the chain and return it as written."""
        base = {
            "event_type": str(event_type),
            "timestamp": utc_now(),
            "user": self.user,
            "environment": self.environment,
            "host": self.host,
            "pid": os.getpid(),
            "qlorax_version": __version__,
        }
        clash = (_RESERVED | base.keys()) & fields.keys()
        if clash:
            raise ValueError(f"audit event fields {sorted(clash)} are reserved")
        payload = _jsonable(redact({**base, **fields}))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditLogError(f"cannot open audit log {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                seq, prev = self._last_link(handle)
                event = {**payload, "format": AUDIT_FORMAT, "seq": seq + 1, "prev_hash": prev}
                event["event_hash"] = event_hash(event)
                line = (canonical_json(event) + "\n").encode("utf-8")
                handle.seek(0, os.SEEK_END)
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
                write_json_atomic(
                    head_path(self.path),
                    {
                        "format": AUDIT_FORMAT,
                        "seq": event["seq"],
                        "event_hash": event["event_hash"],
                        "updated_at": event["timestamp"],
                    },
                )
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        return event

    def _last_link(self, handle: Any) -> tuple[int, str]:
        found = _read_last_line(handle)
        if found is None:
            return 0, GENESIS_HASH
        last, complete = found
        problem = None
        if not complete:
            problem = "its last line is incomplete (no newline)"
        else:
            try:
                event = json.loads(last)
            except ValueError:
                event = None
            if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
                problem = "its last line is not an audit event"
            elif event_hash(event) != event.get("event_hash"):
                problem = "its last line does not match its event_hash"
            else:
                return event["seq"], event["event_hash"]
        # Fail closed: chaining onto a damaged tail would hide the damage.
        raise AuditLogError(
            f"refusing to append to audit log {self.path}: {problem}; run `qlorax audit verify {self.path}`"
        )


def _jsonable(obj: Any) -> Any:
    """Make a redacted structure canonical-JSON safe: NaN/inf as strings, paths and other objects as str."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else repr(obj)  # 'nan', 'inf', '-inf'
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return str(obj)


def _artifact_digests(artifacts: Mapping[str, Any]) -> dict[str, Any]:
    """{relpath: sha256} from either that form or a manifest (artifact_summary.json)."""
    files = artifacts.get("files") if isinstance(artifacts.get("files"), Mapping) else None
    if files is not None:
        digests: dict[str, Any] = {
            rel: entry.get("sha256") if isinstance(entry, Mapping) else entry for rel, entry in files.items()
        }
        if "deterministic_digest" in artifacts:
            digests = {"files": digests, "deterministic_digest": artifacts["deterministic_digest"]}
        return digests
    return dict(artifacts)


# -- verification -----------------------------------------------------------------------
def _parse_lines(path: Path) -> list[dict[str, Any]]:
    """One record per line: {line, event (None if unreadable), error, hash_ok}."""
    data = path.read_bytes()
    if not data:
        return []
    complete = data.endswith(b"\n")
    lines = data.split(b"\n")
    if complete:
        lines = lines[:-1]
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(lines, start=1):
        record: dict[str, Any] = {"line": number, "event": None, "error": None, "hash_ok": False}
        records.append(record)
        if not raw.strip():
            record["error"] = "an empty line"
            continue
        try:
            event = json.loads(raw)
        except ValueError:
            record["error"] = "not valid JSON" + (
                "" if complete or number < len(lines) else " (incomplete last line: an interrupted write?)"
            )
            continue
        if not isinstance(event, dict) or not isinstance(event.get("seq"), int) or "prev_hash" not in event:
            record["error"] = "not a qlorax audit event"
            continue
        record["event"] = event
        record["hash_ok"] = event_hash(event) == event.get("event_hash")
    return records


def _follows(anchor: tuple[int, str | None], event: Mapping[str, Any] | None) -> bool:
    """Whether `event` is the next link after anchor (seq, event_hash; hash None = unknown)."""
    if event is None or event.get("seq") != anchor[0] + 1:
        return False
    return anchor[1] is None or event.get("prev_hash") == anchor[1]


def _describe(event: Mapping[str, Any]) -> str:
    return f"seq {event.get('seq')} ({event.get('event_type', '?')})"


def verify_log(path: Path | str) -> tuple[bool, list[str]]:
    """Check the whole chain and the head anchor; (ok, problems), each problem naming its line.

    Walks the lines keeping an anchor (seq and hash of the last accepted event) and
    explains each break as the likeliest single change: a line inserted (the lines
    around it link directly), a pair swapped, events deleted (a gap in seq), or a line
    edited (its own hash, or the next line's prev_hash, no longer matches)."""
    path = Path(path)
    if not path.is_file():
        return False, [f"{path}: audit log not found"]
    walk = _ChainWalk(path, _parse_lines(path))
    while walk.index < len(walk.records):
        walk.step()
    problems = walk.problems + _check_head(path, walk.anchor, walk.anchor_line)
    problems = sorted(dict.fromkeys(problems), key=_line_key)
    return not problems, problems


class _ChainWalk:
    """One walk over the log's lines (verify_log): the anchor (seq and hash of the last accepted
    event) and its line, the problems found so far, and the index of the next line to read."""

    def __init__(self, path: Path, records: list[dict[str, Any]]):
        self.path = path
        self.records = records
        self.problems: list[str] = []
        self.anchor: tuple[int, str | None] = (0, GENESIS_HASH)
        self.anchor_line = 0
        # The link before the last one accepted, while that one was accepted as a plain next link:
        # a forged line inserted with a correct seq, prev_hash and event_hash is accepted first, and
        # shows only when the real next line also claims to follow this link.
        self.before: tuple[tuple[int, str | None], int] | None = None
        self.index = 0

    def step(self) -> None:
        """Read the next line (two for a swapped pair) and record what, if anything, broke there."""
        record = self.records[self.index]
        line, event = record["line"], record["event"]
        following = self.records[self.index + 1]["event"] if self.index + 1 < len(self.records) else None
        if self.before is not None and event is not None and record["hash_ok"] and _follows(self.before[0], event):
            self._two_claim_one_link(self.before[1], event, line, following)
        elif not _follows(self.anchor, event) and _follows(self.anchor, following):
            assert following is not None
            self._out_of_place(record, event, line, following)
        elif event is None:
            self.problems.append(f"line {line}: edited: {record['error']}")
            self.anchor, self.anchor_line = (self.anchor[0] + 1, None), line  # it took one event's place
            self.before = None
            self.index += 1
        else:
            self._next_link(record, event, line)

    def _accept(self, event: Mapping[str, Any], line: int) -> None:
        self.anchor, self.anchor_line = (event["seq"], event.get("event_hash")), line

    def _two_claim_one_link(self, before_line: int, event: Mapping[str, Any], line: int,
                            following: Mapping[str, Any] | None) -> None:
        """This line and the one accepted before it both follow the same link: one was inserted."""
        self.problems.append(_one_of_two_inserted(self.path, before_line, (self.anchor, self.anchor_line), event,
                                                  line, following))
        if not self.problems[-1].startswith(f"line {line}:"):  # the earlier line was the forgery
            self._accept(event, line)
        self.before = None
        self.index += 1

    def _out_of_place(self, record: dict[str, Any], event: Mapping[str, Any] | None, line: int,
                      following: Mapping[str, Any]) -> None:
        """This line breaks the chain but the next one continues it: a swapped pair, or an insertion."""
        if (event is not None and following.get("event_hash") is not None
                and _follows((following["seq"], following["event_hash"]), event)):
            self.problems.append(f"lines {line} and {line + 1}: reordered: {_describe(event)} and "
                                 f"{_describe(following)} are swapped")
            self._accept(event, line + 1)
            self.index += 2
            self.before = None
            return
        what = _describe(event) if event is not None else f"a line that is {record['error']}"
        self.problems.append(
            f"line {line}: inserted: {what} is not part of the chain "
            f"(lines {line - 1 if line > 1 else 'start'} and {line + 1} link directly)"
        )
        self.index += 1

    def _next_link(self, record: dict[str, Any], event: Mapping[str, Any], line: int) -> None:
        """A readable event in its place: check its own hash and its link, then accept it."""
        if not record["hash_ok"]:
            self.problems.append(f"line {line}: edited: {_describe(event)} does not match its event_hash")
        if not _follows(self.anchor, event):
            self.problems.extend(_broken_link(self.anchor, self.anchor_line, record, event, line))
        plain_link = record["hash_ok"] and _follows(self.anchor, event)
        self.before = (self.anchor, self.anchor_line) if plain_link else None
        self._accept(event, line)
        self.index += 1


def _broken_link(anchor: tuple[int, str | None], anchor_line: int, record: dict[str, Any],
                 event: Mapping[str, Any], line: int) -> list[str]:
    """Why a readable event does not follow the anchor: a gap (deleted), a step back (reordered
    or duplicated), or the same seq with another hash (the line before was edited)."""
    expected = anchor[0] + 1
    if event["seq"] > expected:
        gap = event["seq"] - expected
        missing = f"seq {expected}" if gap == 1 else f"seq {expected}-{event['seq'] - 1}"
        where = f"after line {anchor_line}" if anchor_line else "at the start"
        return [f"line {line}: deleted: {gap} event(s) missing {where} ({missing})"]
    if event["seq"] < expected:
        return [f"line {line}: reordered or duplicated: {_describe(event)} where seq {expected} was expected"]
    if record["hash_ok"]:
        target = f"line {anchor_line}" if anchor_line else f"line {line}"
        return [f"{target}: edited: its hash was recomputed but no longer matches the "
                f"prev_hash recorded at line {line}"]
    return []


def _one_of_two_inserted(path: Path, before_line: int,
                         accepted: tuple[tuple[int, str | None], int], event: Mapping[str, Any], line: int,
                         following: Mapping[str, Any] | None) -> str:
    """Two consecutive lines both claim to follow the same event: one was inserted with a
    correctly computed hash. The real one is the one the rest of the chain (the next line,
    else the head anchor) continues from."""
    link_line, (first, first_line) = before_line, accepted
    this = (event["seq"], event.get("event_hash"))
    head_hash = None
    try:
        head_hash = json.loads(head_path(path).read_text(encoding="utf-8")).get("event_hash")
    except (OSError, ValueError, AttributeError):
        pass
    earlier_forged = _follows(this, following) or (following is None and head_hash == this[1])
    later_forged = _follows(first, following) or (following is None and head_hash == first[1])
    start = f"line {link_line}" if link_line else "the start"
    if this[1] == first[1]:
        return f"line {line}: inserted: {_describe(event)} is a copy of line {first_line}"
    if earlier_forged and not later_forged:
        return (f"line {first_line}: inserted: seq {first[0]} is a forged event (correct hashes) that is not part "
                f"of the chain ({start} and line {line} link directly)")
    if later_forged and not earlier_forged:
        return (f"line {line}: inserted: {_describe(event)} is a forged event (correct hashes) that is not part "
                f"of the chain (lines {first_line} and {line + 1} link directly)")
    return (f"lines {first_line} and {line}: inserted: both claim seq {this[0]} after {start}; one of them was "
            "inserted (the rest of the chain does not say which)")


def _check_head(path: Path, anchor: tuple[int, str | None], anchor_line: int) -> list[str]:
    """Compare the chain's last event (anchor) with the head anchor file: catches tail deletions."""
    head_file = head_path(path)
    last_seq, last_hash = anchor
    if not head_file.is_file():
        if last_seq == 0:
            return []
        return [f"{head_file.name}: head anchor missing; the end of the log cannot be checked for deletions"]
    try:
        head = json.loads(head_file.read_text(encoding="utf-8"))
        head_seq, head_hash = int(head["seq"]), str(head["event_hash"])
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{head_file.name}: head anchor unreadable"]
    if last_seq < head_seq:
        missing = f"seq {last_seq + 1}" if head_seq == last_seq + 1 else f"seq {last_seq + 1}-{head_seq}"
        return [
            f"line {anchor_line + 1}: deleted: the log ends at seq {last_seq} but the head anchor records "
            f"seq {head_seq} ({missing} missing from the end)"
        ]
    if last_seq > head_seq:
        return [
            f"line {anchor_line}: appended outside qlorax (or the head update was interrupted): the log "
            f"ends at seq {last_seq}, the head anchor records seq {head_seq}"
        ]
    if last_hash is not None and last_hash != head_hash:
        return [f"line {anchor_line}: edited: the last event's hash differs from the head anchor's"]
    return []


def _line_key(problem: str) -> tuple[int, str]:
    for prefix in ("line ", "lines "):
        if problem.startswith(prefix):
            digits = problem[len(prefix) :].split(":")[0].split(" ")[0]
            if digits.isdigit():
                return int(digits), problem
    return 1 << 30, problem
