"""Log tools for the log-analysis agent: bounded reading, regex search, counts, templates, semantic search.

Everything here is plain Python (no model): the agent's answers come from these functions, so they
are exact and unit-tested against the Loghub structured CSVs (tests/test_logtools.py). The log's
format (timestamp, level, component, ...) is inferred from the log itself (tools/logformat.py); every
count says which format was inferred and how many lines fit it. The tools forgive a small model:
filters are case-insensitive unless asked, an invalid regex is a short error to recover from, a
filter matching nothing is reported and dropped, and each result leads with its answer.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tools.logformat import GENERIC, SEVERITIES, LogFormat, infer_format, parse_time_value

SAMPLE_LOG = Path(__file__).resolve().parents[1] / "examples" / "sample_data" / "app.log"
RESULT_CHARS = 1200  # tool results are cut to this many characters (they all land in the model's context)


class LogError(ValueError):
    """A log that cannot be analysed (missing, empty, binary, ...); the message says why."""


# ----------------------------------------------------------------------------------------- formats
# The format of a log is inferred from the log itself (logformat.py): no system is hard-coded.
_LEVEL_WORDS = "|".join(sorted(SEVERITIES, key=len, reverse=True))
_GENERIC_LEVEL = re.compile(rf"\b({_LEVEL_WORDS})\b", re.IGNORECASE)
_GENERIC_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})")


def detect_format(lines: Iterable[str], sample: int = 400) -> LogFormat:
    """The header format inferred from the first ``sample`` non-empty lines (GENERIC when none fits)."""
    return infer_format(lines, sample)


@dataclass
class Record:
    """Parsed fields of one line (None where the format has no such field or the line did not match)."""

    time: str | None = None
    level: str | None = None
    component: str | None = None
    content: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def parse_line(fmt: LogFormat, line: str) -> Record:
    """The fields of one line; a line the format does not fit (a stack trace, a wrapped message) has none."""
    m = fmt.pattern.match(line) if fmt is not GENERIC else None
    if m is None:
        if fmt is GENERIC:  # no header format: a level keyword and an ISO timestamp near the start
            lv = _GENERIC_LEVEL.search(line[:120])
            tm = _GENERIC_TIME.search(line[:60])
            return Record(time=tm.group(1) if tm else None, level=lv.group(1).upper() if lv else None, content=line)
        return Record(content=line)
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    comp = fmt.component(g) if fmt.component else g.get("component")
    return Record(time=g.get("time"), level=g.get("level"), component=comp.strip() if comp else None,
                  content=g.get("content", ""), fields=g)


def parse_time(fmt: LogFormat, value: str | None) -> datetime | None:
    """datetime of a time field (formats without a year get 1900), or None."""
    if value and fmt is GENERIC:
        try:
            return datetime.strptime(value.replace("T", " ")[:19], "%Y-%m-%d %H:%M:%S")
        except ValueError:
            return None
    return parse_time_value(value, fmt.time_format)


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

    @property
    def parsed(self) -> int:
        """Lines the inferred format fits (the share says how sure the inference is)."""
        return sum(1 for r in self.records if r.fields)

    def format_note(self) -> str:
        """Which format was inferred and how sure it is, for tool results."""
        if self.format is GENERIC:
            return "format: none recognised (levels found by keyword only)"
        share = self.parsed / max(1, len(self.lines))
        return f"format {self.format.spec}, inferred; {self.parsed} of {len(self.lines)} lines fit it ({share:.0%})"

    def describe(self) -> str:
        s = f"{self.path.name}: {len(self.lines)} lines read, {self.format_note()}"
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


def _compile(pattern: str, case_sensitive: bool = False) -> tuple[re.Pattern | None, str | None]:
    """The regex (case-insensitive unless asked), or a short error a small model can act on."""
    try:
        return re.compile(pattern, 0 if case_sensitive else re.IGNORECASE), None
    except re.error as exc:
        return None, (f"Invalid regular expression {pattern!r} ({exc}). Use a plain word such as ERROR "
                      "or timeout, or an empty pattern for all lines.")


def _filter(log: LogFile, pattern: str | None, case_sensitive: bool = False) -> tuple[list[int], str | None]:
    """Indices of lines matching ``pattern`` (all lines when empty), or an error text.

    Case-insensitive unless asked: a small model writes ``INFO`` for a log that writes ``Info``.
    """
    if not pattern:
        return list(range(len(log.lines))), None
    rx, err = _compile(pattern, case_sensitive)
    if rx is None:
        return [], err
    return [i for i, ln in enumerate(log.lines) if rx.search(ln)], None


def level_named(log: LogFile, word: str) -> str | None:
    """The level value of this log that ``word`` names (any case), e.g. 'warn' -> 'WARN'; else None."""
    w = word.strip().strip("[]").lower()
    if not w:
        return None
    for value in count_values(log, "level"):
        if value != "(none)" and value.lower() == w:
            return value
    return None


def search_logs(log: LogFile, pattern: str, max_results: int = 8, case_sensitive: bool = False) -> ToolOutput:
    """Regex search (case-insensitive unless asked): the number of matching lines and the first ones.

    A pattern that is one of the log's level names counts the lines *at that level* (the level field),
    which is what "how many WARN lines" means; lines that only mention the word are reported beside it.
    """
    if not pattern or not pattern.strip():
        msg = "search_logs needs a word or regular expression, e.g. ERROR or timeout."
        return ToolOutput(msg, msg)
    idx, err = _filter(log, pattern, case_sensitive)
    if err:
        return ToolOutput(err, err)
    max_results = max(1, min(int(max_results or 8), 20))
    level = level_named(log, pattern)
    if level is not None:
        mentions = len(idx)
        idx = [i for i, r in enumerate(log.records) if r.level == level]
        head = (f"{len(idx)} of {len(log.lines)} lines have level {level}"
                f" ({mentions} lines contain /{pattern}/ anywhere).")
        summary = f"{len(idx)} of {len(log.lines)} lines have level {level}"
    else:
        head = f"{len(idx)} of {len(log.lines)} lines match /{pattern}/" + ("" if case_sensitive else " (any case)") + "."
        summary = f"{len(idx)} of {len(log.lines)} lines match /{pattern}/"
        if not idx:
            head += f" Levels in this log: {_names(log, 'level')}; components: {_names(log, 'component')}."
    shown = idx[:max_results]
    body = "\n".join(f"L{i + 1}: {_short(log.lines[i])}" for i in shown)
    cited = ", ".join(f"L{i + 1}" for i in shown[:5])
    summary += f" (first: {cited})." if shown else "."
    return ToolOutput(_cut(head + ("\n" + body if body else "")), summary, [i + 1 for i in shown],
                      {"count": len(idx), "total": len(log.lines), **({"level": level} if level else {})})


def _names(log: LogFile, by: str, n: int = 6) -> str:
    c = count_values(log, by)
    c.pop("(none)", None)
    return ", ".join(str(k) for k, _ in c.most_common(n)) or "none"


def _bucket(dt: datetime, minutes: int) -> str:
    minutes = max(1, minutes)
    total = dt.hour * 60 + dt.minute
    start = total - total % minutes
    day = dt.strftime("%m-%d") if dt.year == 1900 else dt.strftime("%Y-%m-%d")
    return f"{day} {start // 60:02d}:{start % 60:02d}"


def count_values(log: LogFile, by: str = "level", pattern: str = "", window_minutes: int = 60,
                 case_sensitive: bool = False) -> collections.Counter:
    """Exact counts of lines (optionally only those matching ``pattern``) per level/component/time bucket."""
    if by not in ("level", "component", "time"):
        raise LogError(f"Unknown field {by!r}: count by 'level', 'component' or 'time'.")
    idx, err = _filter(log, pattern, case_sensitive)
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
        else:
            dt = parse_time(log.format, r.time)
            key = _bucket(dt, window_minutes) if dt else None
        c[key if key is not None else "(none)"] += 1
    return c


def count_lines(log: LogFile, by: str = "level", pattern: str = "", window_minutes: int = 60,
                case_sensitive: bool = False) -> ToolOutput:
    """Counts per level / component / time window, the top value first (all lines when no pattern).

    A filter that matches no line is reported and the counts over all lines are given instead, so a
    small model that invented a pattern still gets the answer, with the reason stated.
    """
    try:
        c = count_values(log, by, pattern, window_minutes, case_sensitive)
        dropped = ""
        if pattern and not c:
            dropped = f"No line matches /{pattern}/, so all lines are counted. "
            c, pattern = count_values(log, by, "", window_minutes), ""
    except LogError as exc:
        return ToolOutput(str(exc), str(exc))
    n = sum(c.values())
    what = f"lines matching /{pattern}/" if pattern else "lines"
    items = sorted(c.items()) if by == "time" else c.most_common()
    label = f"per {window_minutes}-minute window" if by == "time" else f"by {by}"
    note = ""
    if set(c) == {"(none)"}:
        note = f" This log has no {by} field ({log.format_note()})."
    ranked = [(k, v) for k, v in c.most_common() if k != "(none)"]
    if ranked:
        top_k, top_v = ranked[0]
        lead = f"Top {by}: {top_k} with {top_v} of {n} {what}."
    else:
        lead = f"No {by} value found in {n} {what}."
    shown = items[:25]
    body = ", ".join(f"{k}: {v}" for k, v in shown) + (f", ... ({len(items) - 25} more)" if len(items) > 25 else "")
    text = f"{dropped}{lead} {n} {what} counted {label}: {body}.{note}\n({log.format_note()})"
    listed = ", ".join(f"{k}: {v}" for k, v in ranked[:8])
    summary = f"{dropped}{lead}" + (f" Counts {label}: {listed}." if len(ranked) > 1 else "") + note
    return ToolOutput(_cut(text), summary, [], {"counts": dict(c), "total": n, "by": by, "pattern": pattern})


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
    idx, err = _filter(log, pattern)
    if err:
        return ToolOutput(err, err)
    dropped = ""
    if pattern and not idx:  # an invented filter: group all lines, and say so
        dropped, pattern = f"No line matches /{pattern}/, so all lines are grouped. ", ""
    try:
        groups = mine_templates(log, pattern)
    except LogError as exc:
        return ToolOutput(str(exc), str(exc))
    top = max(1, min(int(top or 5), 15))
    n = sum(g["count"] for g in groups)
    what = f"lines matching /{pattern}/" if pattern else "lines"
    body = "\n".join(f"{g['count']} lines (first L{g['first_line']}): {_short(g['template'], 140)}" for g in groups[:top])
    if groups:
        g = groups[0]
        lead = (f"The most frequent template ({g['count']} of {n} {what}, first L{g['first_line']}) is: "
                f"{_short(g['template'], 100)}")
        text = f"{dropped}{lead}\n{len(groups)} templates over {n} {what}; top {min(top, len(groups))}:\n{body}"
        summary = dropped + lead
    else:
        text = summary = f"No {what} to group."
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


# ------------------------------------------------------------------------------ measuring the reader
COMPONENT_COLUMNS = ("Component", "Program")  # what Loghub's structured CSVs call the component


def name_set(spec: str) -> set[str]:
    """Comma-separated names, lower-cased (what the transcript builders' ``--exclude`` takes)."""
    return {s.strip().lower() for s in (spec or "").split(",") if s.strip()}


def read_structured(structured_csv: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a Loghub ``*_structured.csv`` (its exact parse: what the tools are measured against)."""
    import csv

    with open(structured_csv, encoding="utf-8", errors="replace", newline="") as f:
        return list(csv.DictReader(f))


def component_column(rows: Sequence[dict[str, str]]) -> str | None:
    """The column of a structured CSV's rows that holds the component (:data:`COMPONENT_COLUMNS`), or None."""
    return next((c for c in COMPONENT_COLUMNS if rows and c in rows[0]), None)


def _same_component(ours: str | None, theirs: str) -> bool:
    """Equal, or equal to the last ``:`` piece: Loghub splits a ``[thread:Class@line]`` bracket at the
    first ``:``, which leaves the tail of the thread name in front of the class in its Component."""
    return ours is not None and (ours == theirs or (":" in theirs and theirs.rsplit(":", 1)[-1] == ours))


def reader_agreement(structured_csv: str | os.PathLike) -> dict[str, Any]:
    """Per-line agreement of the inferred level / component with a Loghub ``*_structured.csv``.

    The log is the CSV's name without ``_structured.csv``. A column whose values are the host name
    (Loghub calls the syslog host "Level" in Linux and "Component" in OpenSSH) is reported as such.
    """
    path = Path(structured_csv)
    log = read_log(path.with_name(path.name.replace("_structured.csv", "")))
    rows = read_structured(path)
    recs = log.records
    pairs = [(recs[int(r["LineId"]) - 1], r) for r in rows if 0 < int(r["LineId"]) <= len(recs)]
    out: dict[str, Any] = {"system": path.name.split("_")[0], "lines": len(pairs), "format": log.format_note(),
                           "parsed": log.parsed / max(1, len(log.lines))}

    def share(pred) -> float:
        return sum(1 for rec, r in pairs if pred(rec, r)) / max(1, len(pairs))

    def host_share(col: str) -> float:
        return share(lambda rec, r: rec.fields.get("host") == r[col])

    if rows and "Level" in rows[0]:
        lv = share(lambda rec, r: rec.level == r["Level"])
        out["level"] = lv
        if lv < 0.5 and host_share("Level") >= 0.95:
            out["level"], out["level_note"] = None, f"CSV Level holds the host name (host agrees {host_share('Level'):.1%})"
    col = component_column(rows)
    if col:
        cp = share(lambda rec, r: _same_component(rec.component, r[col]))
        out["component"], out["component_column"] = cp, col
        if cp < 0.5 and host_share(col) >= 0.95:
            out["component"], out["component_note"] = None, f"CSV {col} holds the host name (host agrees {host_share(col):.1%})"
    return out


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def reader_table(root: str | os.PathLike) -> str:
    """The agreement table for every ``*_structured.csv`` under ``root`` (printed by --reader-table)."""
    root = Path(root)
    paths = sorted(root.rglob("*_structured.csv"))
    if not paths:
        raise LogError(f"No *_structured.csv under {root}: pass a folder of Loghub samples.")
    lines = [f"{'system':<11} {'lines':>5} {'parsed':>7} {'level':>7} {'component':>9}  format / notes"]
    for p in paths:
        a = reader_agreement(p)
        notes = "; ".join(a[k] for k in ("level_note", "component_note") if k in a)
        lines.append(f"{a['system']:<11} {a['lines']:>5} {a['parsed']:>7.1%} {_pct(a.get('level')):>7} {_pct(a.get('component')):>9}  "
                     f"{a['format'].split(', inferred')[0].removeprefix('format ')}" + (f"  [{notes}]" if notes else ""))
    return "\n".join(lines)
