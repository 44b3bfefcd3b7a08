"""Log tools for the log-analysis agent: bounded reading, regex search, counts, templates, semantic search.

Everything here is plain Python (no model): the agent's answers come from these functions, so they
are exact and unit-tested against the Loghub structured CSVs (tests/test_examples.py).

Reading is streamed line by line with hard caps (bytes, lines, bytes per line), so a 1 GB file or a
file without newlines costs bounded time and memory: what was left out is stated in ``LogFile.note``.
A missing path, a directory, a device/FIFO, an empty or a binary file raise :class:`LogError` with a
message saying what to do.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

SAMPLE_LOG = Path(__file__).resolve().parent / "sample_data" / "app.log"
RESULT_CHARS = 1200  # tool results are cut to this many characters (they all land in the model's context)


class LogError(ValueError):
    """A log that cannot be analysed (missing, empty, binary, ...); the message says why."""


# ----------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class LogFormat:
    """One line format: a regex with named groups (time, level, component, content) + a time format."""

    name: str
    regex: str
    time_format: str | None = None  # strptime format of the ``time`` group (or a prefix of it)
    component: Callable[[dict], str | None] | None = None  # derive the component from the groups

    @property
    def pattern(self) -> re.Pattern:
        return _compiled(self.regex)


_RE_CACHE: dict[str, re.Pattern] = {}


def _compiled(regex: str) -> re.Pattern:
    pat = _RE_CACHE.get(regex)
    if pat is None:
        pat = _RE_CACHE[regex] = re.compile(regex)
    return pat


_LEVELS = r"TRACE|DEBUG|INFO|NOTICE|WARN|WARNING|ERROR|ERR|CRITICAL|CRIT|FATAL|SEVERE|ALERT|EMERG"


def _zk_component(g: dict) -> str | None:
    m = re.search(r"(?:^|:)([A-Za-z_][\w$.]*)@\d+$", g.get("bracket") or "")
    return m.group(1) if m else None


FORMATS: tuple[LogFormat, ...] = (
    # 2024-03-01 10:15:02 INFO  scheduler: job 4411 started   (the sample log; many app logs)
    LogFormat("iso-level-component",
              rf"^(?P<time>\d{{4}}-\d{{2}}-\d{{2}}[ T]\d{{2}}:\d{{2}}:\d{{2}}(?:[.,]\d+)?)\s+(?P<level>{_LEVELS})\s+"
              r"(?P<component>[^\s:\[\]]+): (?P<content>.*)$", "%Y-%m-%d %H:%M:%S"),
    # Hadoop: 2015-10-18 18:01:47,978 INFO [main] org.apache...MRAppMaster: Created ...
    LogFormat("iso-level-thread-component",
              rf"^(?P<time>\d{{4}}-\d{{2}}-\d{{2}} \d{{2}}:\d{{2}}:\d{{2}}(?:[.,]\d+)?) (?P<level>{_LEVELS}) +"
              r"\[(?P<thread>[^\]]*)\] (?P<component>[^\s:]+): ?(?P<content>.*)$", "%Y-%m-%d %H:%M:%S"),
    # Zookeeper: 2015-07-29 17:41:44,747 - INFO  [QuorumPeer[myid=1]/0:0:...:2181:FastLeaderElection@774] - ...
    LogFormat("iso-dash-level-bracket",
              rf"^(?P<time>\d{{4}}-\d{{2}}-\d{{2}} \d{{2}}:\d{{2}}:\d{{2}}(?:[.,]\d+)?) - (?P<level>{_LEVELS}) +"
              r"\[(?P<bracket>.*?)\] - (?P<content>.*)$", "%Y-%m-%d %H:%M:%S", _zk_component),
    # HDFS: 081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 ...
    LogFormat("hdfs", rf"^(?P<time>\d{{6}} \d{{6}}) (?P<pid>\d+) (?P<level>{_LEVELS}) (?P<component>[^\s:]+): (?P<content>.*)$",
              "%y%m%d %H%M%S"),
    # Spark: 17/06/09 20:10:40 INFO spark.SecurityManager: Changing view acls to: yarn,curi
    LogFormat("yy/mm/dd-level-component",
              rf"^(?P<time>\d{{2}}/\d{{2}}/\d{{2}} \d{{2}}:\d{{2}}:\d{{2}}) (?P<level>{_LEVELS}) (?P<component>[^\s:]+): (?P<content>.*)$",
              "%y/%m/%d %H:%M:%S"),
    # Apache error log: [Sun Dec 04 04:47:44 2005] [notice] workerEnv.init() ok ...
    LogFormat("bracket-time-level", r"^\[(?P<time>[A-Z][a-z]{2} [A-Z][a-z]{2} \d{2} \d{2}:\d{2}:\d{2} \d{4})\] "
              r"\[(?P<level>[a-zA-Z]+)\] (?P<content>.*)$", "%a %b %d %H:%M:%S %Y"),
    # Proxifier: [10.30 16:49:06] chrome.exe - proxy.cse.cuhk.edu.hk:5070 open through proxy ...
    LogFormat("proxifier", r"^\[(?P<time>\d{2}\.\d{2} \d{2}:\d{2}:\d{2})\] (?P<component>.+?) - (?P<content>.*)$",
              "%m.%d %H:%M:%S"),
    # syslog (Linux, OpenSSH): Jun 14 15:16:01 combo sshd(pam_unix)[19939]: authentication failure; ...
    LogFormat("syslog", r"^(?P<time>[A-Z][a-z]{2} +\d{1,2} \d{2}:\d{2}:\d{2}) (?P<host>\S+) "
              r"(?P<component>[^\[:]+?)(?:\[(?P<pid>\d+)\])?: ?(?P<content>.*)$", "%b %d %H:%M:%S"),
)

_GENERIC_LEVEL = re.compile(rf"\b({_LEVELS})\b", re.IGNORECASE)
_GENERIC_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})")
GENERIC = LogFormat("generic", r"^(?P<content>.*)$")


def detect_format(lines: Iterable[str], sample: int = 200) -> LogFormat:
    """The format matching most of the first ``sample`` non-empty lines (at least half), else generic."""
    probe = [ln for ln in lines if ln.strip()][:sample]
    if not probe:
        return GENERIC
    best, hits = GENERIC, 0
    for fmt in FORMATS:
        n = sum(1 for ln in probe if fmt.pattern.match(ln))
        if n > hits:
            best, hits = fmt, n
    return best if hits * 2 >= len(probe) else GENERIC


@dataclass
class Record:
    """Parsed fields of one line (None where the format has no such field or the line did not match)."""

    time: str | None = None
    level: str | None = None
    component: str | None = None
    content: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def parse_line(fmt: LogFormat, line: str) -> Record:
    m = fmt.pattern.match(line) if fmt is not GENERIC else None
    if m is None:  # generic: a level keyword and an ISO timestamp anywhere near the start
        lv = _GENERIC_LEVEL.search(line[:120])
        tm = _GENERIC_TIME.search(line[:60])
        return Record(time=tm.group(1) if tm else None, level=lv.group(1).upper() if lv else None, content=line)
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    comp = fmt.component(g) if fmt.component else g.get("component")
    return Record(time=g.get("time"), level=g.get("level"), component=comp.strip() if comp else None,
                  content=g.get("content", line), fields=g)


def parse_time(fmt: LogFormat, value: str | None) -> datetime | None:
    """datetime of a time field (formats without a year get 1900), or None."""
    if not value or not fmt.time_format:
        if value and fmt is GENERIC:
            try:
                return datetime.strptime(value.replace("T", " ")[:19], "%Y-%m-%d %H:%M:%S")
            except ValueError:
                return None
        return None
    text = " ".join(value.split())
    if fmt.time_format.startswith("%Y-%m-%d"):
        text = text.replace("T", " ")[:19]
    try:
        return datetime.strptime(text, fmt.time_format)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------- reading
@dataclass
class ReadLimits:
    """Caps on what is read from a log (a 1 GB log is analysed on its first ``max_bytes``)."""

    max_bytes: int = 32 << 20
    max_lines: int = 200_000
    max_line_bytes: int = 8192  # longer lines are cut (the rest of the line is skipped, streamed)
    sniff_bytes: int = 8192


@dataclass
class LogFile:
    """The (bounded) lines of a log, its detected format and a note on anything left out."""

    path: Path
    lines: list[str]
    format: LogFormat
    size_bytes: int
    bytes_read: int
    truncated: bool = False
    long_lines: int = 0
    note: str = ""
    _records: list[Record] | None = None

    @property
    def records(self) -> list[Record]:
        if self._records is None:
            self._records = [parse_line(self.format, ln) for ln in self.lines]
        return self._records

    @property
    def fingerprint(self) -> str:
        """Identity of what was read (path, size, mtime, caps): keys the semantic index."""
        st = self.path.stat()
        key = f"{self.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{len(self.lines)}|{self.bytes_read}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def describe(self) -> str:
        parsed = sum(1 for r in self.records if r.fields)
        s = (f"{self.path.name}: {len(self.lines)} lines read, format {self.format.name} "
             f"({parsed} lines parsed)")
        return s + (f"; {self.note}" if self.note else "")


def read_log(path: str | os.PathLike, limits: ReadLimits | None = None) -> LogFile:
    """Stream a log into memory within ``limits``; clear :class:`LogError` for unusable inputs."""
    limits = limits or ReadLimits()
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise LogError(f"No such log file: {p}. Pass an existing file with --log PATH "
                       "(or leave --log out to use the sample log).") from None
    except OSError as exc:
        raise LogError(f"Cannot access {p}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LogError(f"{p} is a directory; pass one log file with --log PATH.")
    if not stat.S_ISREG(st.st_mode):
        raise LogError(f"{p} is not a regular file (device, FIFO or socket); copy the log to a file first.")
    if st.st_size == 0:
        raise LogError(f"{p} is empty: there is nothing to analyse.")
    lines: list[str] = []
    read = long_lines = 0
    truncated = False
    try:
        with open(p, "rb") as f:
            head = f.read(limits.sniff_bytes)
            if b"\x00" in head:
                raise LogError(f"{p} looks like a binary file (it contains NUL bytes); pass a text log.")
            if head and _mostly_binary(head):
                raise LogError(f"{p} looks like a binary file (mostly non-text bytes); pass a text log.")
            f.seek(0)
            while True:
                if read >= limits.max_bytes or len(lines) >= limits.max_lines:
                    truncated = f.read(1) != b""
                    break
                raw = f.readline(min(limits.max_line_bytes, limits.max_bytes - read) + 1)
                if not raw:
                    break
                read += len(raw)
                if not raw.endswith(b"\n") and len(raw) > limits.max_line_bytes:
                    long_lines += 1
                    raw = raw[:limits.max_line_bytes]
                    while read < limits.max_bytes:  # skip the rest of the over-long line, streamed
                        rest = f.readline(min(1 << 16, limits.max_bytes - read))
                        if not rest:
                            break
                        read += len(rest)
                        if rest.endswith(b"\n"):
                            break
                if b"\x00" in raw:
                    raise LogError(f"{p} contains NUL bytes at line {len(lines) + 1}: it looks binary; "
                                   "pass a text log.")
                lines.append(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
    except OSError as exc:
        raise LogError(f"Cannot read {p}: {exc.strerror or exc}") from None
    if not any(ln.strip() for ln in lines):
        raise LogError(f"{p} contains no text (only blank lines): there is nothing to analyse.")
    notes = []
    if truncated:
        notes.append(f"read only the first {len(lines)} lines / {read:,} of {st.st_size:,} bytes "
                     f"(caps: {limits.max_lines:,} lines, {limits.max_bytes:,} bytes)")
    if long_lines:
        notes.append(f"{long_lines} line(s) longer than {limits.max_line_bytes} bytes were cut")
    log = LogFile(p, lines, detect_format(lines), st.st_size, read, truncated, long_lines, "; ".join(notes))
    return log


def _mostly_binary(head: bytes) -> bool:
    """Not UTF-8 and more than 10% control or undecodable bytes (a Latin-1 log with a few accents passes)."""
    if head[:4] in (b"\x7fELF", b"PK\x03\x04", b"\x89PNG"):
        return True
    try:
        head.decode("utf-8")
        return False
    except UnicodeDecodeError:
        pass
    text = head.decode("utf-8", errors="replace")
    odd = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\r\n\f\b"))
    return odd / max(1, len(text)) > 0.10


# ------------------------------------------------------------------------------------- the tools
@dataclass
class ToolOutput:
    """What a tool returns: ``text`` (goes into the context) and ``summary`` (one factual sentence)."""

    text: str
    summary: str
    lines: list[int] = field(default_factory=list)  # line numbers cited
    data: dict[str, Any] = field(default_factory=dict)


def _cut(text: str, limit: int = RESULT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 20].rstrip() + "\n... (cut)"


def _short(line: str, n: int = 160) -> str:
    return line if len(line) <= n else line[: n - 3] + "..."


def _filter(log: LogFile, pattern: str | None) -> tuple[list[int], str | None]:
    """Indices of lines matching ``pattern`` (all lines when empty), or an error text."""
    if not pattern:
        return list(range(len(log.lines))), None
    try:
        # smart case (as ripgrep): a pattern with capitals is case-sensitive ("ERROR" is the level,
        # not every "error" in a message); an all-lowercase pattern matches any case
        rx = re.compile(pattern, 0 if any(ch.isupper() for ch in pattern) else re.IGNORECASE)
    except re.error as exc:
        return [], f"Invalid regular expression {pattern!r}: {exc}."
    return [i for i, ln in enumerate(log.lines) if rx.search(ln)], None


def search_logs(log: LogFile, pattern: str, max_results: int = 8) -> ToolOutput:
    """Regex search (smart case): the number of matching lines and the first ones, numbered."""
    if not pattern or not pattern.strip():
        return ToolOutput("Give a non-empty regular expression.", "No search was made (empty pattern).")
    idx, err = _filter(log, pattern)
    if err:
        return ToolOutput(err, err)
    max_results = max(1, min(int(max_results or 8), 20))
    shown = idx[:max_results]
    head = f"{len(idx)} of {len(log.lines)} lines match /{pattern}/."
    body = "\n".join(f"L{i + 1}: {_short(log.lines[i])}" for i in shown)
    cited = ", ".join(f"L{i + 1}" for i in shown[:5])
    summary = f"{len(idx)} of {len(log.lines)} lines match /{pattern}/" + (f" (first: {cited})." if shown else ".")
    return ToolOutput(_cut(head + ("\n" + body if body else "")), summary, [i + 1 for i in shown],
                      {"count": len(idx), "total": len(log.lines)})


def _bucket(dt: datetime, minutes: int) -> str:
    minutes = max(1, minutes)
    total = dt.hour * 60 + dt.minute
    start = total - total % minutes
    day = dt.strftime("%m-%d") if dt.year == 1900 else dt.strftime("%Y-%m-%d")
    return f"{day} {start // 60:02d}:{start % 60:02d}"


def count_values(log: LogFile, by: str = "level", pattern: str = "", window_minutes: int = 60) -> collections.Counter:
    """Exact counts of lines (optionally only those matching ``pattern``) per level/component/time bucket."""
    idx, err = _filter(log, pattern)
    if err:
        raise LogError(err)
    recs = log.records
    c: collections.Counter = collections.Counter()
    for i in idx:
        r = recs[i]
        if by == "level":
            key = r.level
        elif by == "component":
            key = r.component
        elif by == "time":
            dt = parse_time(log.format, r.time)
            key = _bucket(dt, window_minutes) if dt else None
        else:
            raise LogError(f"Unknown field {by!r}: count by 'level', 'component' or 'time'.")
        c[key if key is not None else "(none)"] += 1
    return c


def count_lines(log: LogFile, by: str = "level", pattern: str = "", window_minutes: int = 60) -> ToolOutput:
    """Counts per level / component / time window (of all lines, or those matching ``pattern``)."""
    try:
        c = count_values(log, by, pattern, window_minutes)
    except LogError as exc:
        return ToolOutput(str(exc), str(exc))
    n = sum(c.values())
    what = f"lines matching /{pattern}/" if pattern else "lines"
    if by == "time":
        items = sorted(c.items())
        label = f"per {window_minutes}-minute window"
    else:
        items = c.most_common()
        label = f"by {by}"
    note = ""
    if set(c) == {"(none)"}:
        note = f" This log format ({log.format.name}) has no {by} field."
    shown = items[:25]
    body = ", ".join(f"{k}: {v}" for k, v in shown) + (f", ... ({len(items) - 25} more)" if len(items) > 25 else "")
    top = ", ".join(f"{k}: {v}" for k, v in (items if by != "time" else c.most_common())[:4])
    text = f"{n} {what}, counted {label}: {body}.{note}"
    summary = f"{n} {what} counted {label}; {top}.{note}"
    return ToolOutput(_cut(text), summary, [], {"counts": dict(c), "total": n})


# Masks for template mining: variable parts that Drain should treat as parameters.
_MASKS = (
    (r"((?<=[^A-Za-z0-9])|^)(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})(:\d+)?((?=[^A-Za-z0-9])|$)", "IP"),
    (r"blk_-?\d+", "BLK"),
    (r"((?<=[^A-Za-z0-9])|^)([A-Za-z0-9][\w.-]*\.[A-Za-z]{2,}:\d+)((?=[^A-Za-z0-9])|$)", "HOSTPORT"),
    (r"((?<=[^A-Za-z0-9])|^)(0x[a-fA-F0-9]+)((?=[^A-Za-z0-9])|$)", "HEX"),
    (r"((?<=[^A-Za-z0-9])|^)([\-\+]?\d+)((?=[^A-Za-z0-9])|$)", "NUM"),
)


def mine_templates(log: LogFile, pattern: str = "") -> list[dict[str, Any]]:
    """Group similar lines with Drain (drain3) on the message part; clusters sorted by size."""
    from drain3 import TemplateMiner
    from drain3.masking import MaskingInstruction
    from drain3.template_miner_config import TemplateMinerConfig

    cfg = TemplateMinerConfig()
    cfg.masking_instructions = [MaskingInstruction(rx, name) for rx, name in _MASKS]
    cfg.profiling_enabled = False
    miner = TemplateMiner(config=cfg)
    idx, err = _filter(log, pattern)
    if err:
        raise LogError(err)
    first: dict[int, int] = {}
    members: dict[int, int] = collections.Counter()
    for i in idx:
        content = log.records[i].content or log.lines[i]
        res = miner.add_log_message(content)
        cid = res["cluster_id"]
        first.setdefault(cid, i + 1)
        members[cid] += 1
    out = []
    for cl in miner.drain.clusters:
        if cl.cluster_id in members:
            out.append({"id": cl.cluster_id, "template": cl.get_template(), "count": members[cl.cluster_id],
                        "first_line": first[cl.cluster_id]})
    out.sort(key=lambda d: (-d["count"], d["first_line"]))
    return out


def top_templates(log: LogFile, top: int = 5, pattern: str = "") -> ToolOutput:
    """The most frequent line templates (similar lines grouped), with counts and a first line number."""
    try:
        groups = mine_templates(log, pattern)
    except LogError as exc:
        return ToolOutput(str(exc), str(exc))
    top = max(1, min(int(top or 5), 15))
    n = sum(g["count"] for g in groups)
    what = f"lines matching /{pattern}/" if pattern else "lines"
    body = "\n".join(f"{g['count']} lines (first L{g['first_line']}): {_short(g['template'], 140)}" for g in groups[:top])
    text = f"{len(groups)} templates over {n} {what}; top {min(top, len(groups))}:\n{body}"
    if groups:
        g = groups[0]
        summary = (f"{len(groups)} templates over {n} {what}; the most frequent ({g['count']} lines, first "
                   f"L{g['first_line']}) is: {_short(g['template'], 100)}")
    else:
        summary = f"No {what} to group."
    return ToolOutput(_cut(text), summary, [g["first_line"] for g in groups[:top]],
                      {"templates": groups[:top], "n_templates": len(groups)})


# ------------------------------------------------------------------------------- semantic search
@dataclass
class SemanticIndex:
    """Log chunks (``lines_per_chunk`` consecutive lines) in a Chroma collection, built on first use."""

    log: LogFile
    store_dir: Path
    lines_per_chunk: int = 12
    _retriever: Any = None

    def retriever(self) -> Any:
        if self._retriever is None:
            from flashback_agents.retrieval import ChromaRetriever
            from flashback_agents.retrieval.chunking import Chunk, chunk_id

            r = ChromaRetriever(self.store_dir, collection=f"log-{self.log.fingerprint}")
            if r.count() == 0:
                chunks = []
                src = str(self.log.path.resolve())
                for start in range(0, len(self.log.lines), self.lines_per_chunk):
                    block = self.log.lines[start:start + self.lines_per_chunk]
                    text = "\n".join(block)
                    if text.strip():
                        chunks.append(Chunk(text=text, source=src, start_line=start + 1, end_line=start + len(block),
                                            index=len(chunks), id=chunk_id(src, f"{start}:{text}")))
                r.add_chunks(chunks, progress=len(chunks) > 50)
            self._retriever = r
        return self._retriever

    def search(self, query: str, k: int = 2) -> ToolOutput:
        if not query or not query.strip():
            return ToolOutput("Give a non-empty query.", "No semantic search was made (empty query).")
        query = " ".join(query.split()[:60])
        docs = self.retriever().retrieve(query, k)
        parts, cited = [], []
        for d in docs:
            s, e = d.metadata.get("start_line"), d.metadata.get("end_line")
            cited.append(int(s))
            lines = d.text.splitlines()
            shown = "\n".join(f"L{int(s) + j}: {_short(ln, 120)}" for j, ln in enumerate(lines[:6]))
            parts.append(f"lines {s}-{e} (score {d.score:.2f}):\n{shown}")
        text = f"{len(docs)} closest chunks for {query!r}:\n" + "\n".join(parts)
        summary = (f"The log chunks closest to {query!r} are at " +
                   ", ".join(f"L{d.metadata.get('start_line')}-L{d.metadata.get('end_line')}" for d in docs) + ".")
        return ToolOutput(_cut(text), summary, cited)
