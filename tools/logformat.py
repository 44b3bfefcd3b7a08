"""Log format inference: the header fields of an unknown log, found from the log itself.

Loghub describes each system with a format string such as ``<Date> <Time> <Pid> <Level> <Component>:
<Content>``; a new user's log comes with none. :func:`infer_format` finds one from the first lines:

1. Each line's head is cut into tokens (whitespace-separated; a ``[...]`` group, nested or with
   spaces, is one token; logs whose lines are ``a|b|c|content`` are cut on ``|``).
2. Every token gets a kind: time-like (``2015-10-18``, ``18:01:47,978``, ``081109``+``203615``,
   ``Jun``, an epoch), a severity (the vocabularies of every common family, any case: INFO, WARN,
   WARNING, ERROR, FATAL, SEVERE, NOTICE, CRIT, EMERG, ..., Windows' ``Info``/``Warning``,
   logcat's single letters ``V D I W E F A``), a number, a bracketed field, a separator (``-``), a
   ``name:`` or ``name[pid]:`` token, or an identifier.
3. A column (the n-th token of each line) is part of the header while most lines agree on its
   kind; the header ends at a ``name:`` token (what follows is the message) or at the last column
   that most lines agree on (identifiers after it are the message's first words).
4. Roles: the first run of time-like columns is the timestamp; the column whose values fall in a
   severity vocabulary is the level; the component is found by punctuation and position cues,
   strongest first (``comp:`` / ``comp[pid]:``; ``[... Class@123]``; the identifier just after
   the level when a bracket or a fixed-width gap follows it; the identifier just before the level;
   ``comp - message``; the first identifier field of a ``|``-separated log; the first
   low-cardinality identifier column).
5. A per-log regex with named groups (time, level, component, content, ...) is built from the
   columns, and the share of lines it parses says how sure the inference is.

Nothing here knows any particular system: the eight Loghub samples in ``../shared/data`` are only
used to measure it (``python -m tools.logformat --reader-table``).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

# ------------------------------------------------------------------------------ vocabularies
SEVERITIES = frozenset("""
TRACE DEBUG DBG FINE FINER FINEST VERBOSE CONFIG INFO INFORMATION INFORMATIONAL NOTICE NOTE
WARN WARNING WRN ERROR ERR FAILURE FAIL CRITICAL CRIT FATAL SEVERE ALERT EMERG EMERGENCY PANIC
""".split())
LETTER_LEVELS = frozenset("VDIWEFA")  # Android logcat (and some Java loggers)
MONTHS = frozenset("JAN FEB MAR APR MAY JUN JUL AUG SEP SEPT OCT NOV DEC".split())
WEEKDAYS = frozenset("MON TUE WED THU FRI SAT SUN".split())
SEPARATORS = frozenset({"-", "--", "|", "::", "*", "#", ">", "=>", "->"})

_CLOCK = re.compile(r"\d{1,2}:\d{2}(?::\d{2})?(?:[.,:]\d+)?")
_DATEISH = re.compile(r"\d[\dT:.,/_+\-]*\d(?:Z|[+-]\d{2}:?\d{2})?")
_IP = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?")
_PIDCOMP = re.compile(r"[^\s\[\]]+\[\d+\]:?")
_PRI = re.compile(r"<\d{1,3}>")
_IDENT = re.compile(r"[A-Za-z_$][^\s]*")
_CLASS_AT_LINE = re.compile(r"([A-Za-z_$][\w$]*)@\d+$")  # log4j-style "...Class@123" inside a bracket


class FormatError(ValueError):
    """The lines given cannot be used to infer a format (none, or all blank)."""


# ------------------------------------------------------------------------------ the format
@dataclass(frozen=True)
class LogFormat:
    """One line format: a regex with named groups (time, level, component, content) + a time format.

    ``spec`` is the Loghub-style description (``<Time> <Level> <Component>: <Content>``) and
    ``coverage`` the share of the sampled lines the regex parsed when it was inferred.
    """

    name: str
    regex: str
    time_format: str | None = None  # strptime format of the ``time`` group ("epoch" for Unix seconds)
    component: Callable[[dict], str | None] | None = None  # derive the component from the groups
    spec: str = ""
    coverage: float = 0.0
    sampled: int = 0

    @property
    def pattern(self) -> re.Pattern:
        return _compiled(self.regex)

    def describe(self) -> str:
        """What was inferred and how sure it is, for tool results."""
        if self is GENERIC or not self.spec:
            return "no header format recognised (levels found by keyword only)"
        return f"inferred format {self.spec} ({self.coverage:.0%} of {self.sampled} sampled lines fit it)"


_RE_CACHE: dict[str, re.Pattern] = {}


def _compiled(regex: str) -> re.Pattern:
    pat = _RE_CACHE.get(regex)
    if pat is None:
        pat = _RE_CACHE[regex] = re.compile(regex)
    return pat


GENERIC = LogFormat("generic", r"^(?P<content>.*)$")


# ------------------------------------------------------------------------------ tokens
@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


def tokenize(line: str, delimiter: str | None = None, max_tokens: int = 14, max_chars: int = 400) -> list[Token]:
    """The head of a line as tokens; a ``[...]`` group (nested, or with spaces) is one token."""
    toks: list[Token] = []
    if delimiter:
        pos = 0
        for part in line.split(delimiter)[:-1][:max_tokens]:  # the last piece is the message
            toks.append(Token(part.strip(), pos, pos + len(part)))
            pos += len(part) + len(delimiter)
        return toks
    i, n = 0, min(len(line), max_chars)
    while i < n and len(toks) < max_tokens:
        while i < n and line[i].isspace():
            i += 1
        if i >= n:
            break
        start = i
        pri = _PRI.match(line, i) if i == 0 else None
        if pri:  # a syslog priority "<34>" glued to the timestamp
            toks.append(Token(pri.group(0), 0, pri.end()))
            i = pri.end()
            continue
        if line[i] == "[":
            depth = 0
            while i < len(line):
                ch = line[i]
                depth += ch == "["
                depth -= ch == "]"
                i += 1
                if depth == 0:
                    break
            if depth != 0:  # unbalanced: fall back to a plain token
                i = start
        while i < len(line) and not line[i].isspace():
            i += 1
        toks.append(Token(line[start:i], start, i))
    return toks


def _core(text: str) -> str:
    return text.strip(",;").strip("[]()<>:").strip()


def is_severity(text: str) -> bool:
    """A level word of any common family, any case (``[notice]``, ``Info``, ``WARN``, ``<err>``)."""
    return _core(text).upper() in SEVERITIES


def is_time_text(core: str) -> bool:
    """Digits with date/time separators (``2015-10-18``, ``18:01:47,978``, ``20171223-22:15:29:606``)."""
    if _CLOCK.fullmatch(core):
        return True
    if not _DATEISH.fullmatch(core) or _IP.fullmatch(core):
        return False
    return ":" in core or bool(re.search(r"\d[-/.]\d", core))


def token_kind(text: str) -> str:
    """The kind of one header token (see the module docstring)."""
    t = text.rstrip(",;")
    core = _core(text)
    if not t:
        return "empty"
    if _PRI.fullmatch(t):
        return "pri"
    if core.upper() in SEVERITIES:
        return "level"
    if len(core) == 1 and core in LETTER_LEVELS and len(t) <= 3:
        return "letter"
    if t in SEPARATORS:
        return "sep"
    if core.upper() in MONTHS:
        return "month"
    if core.upper() in WEEKDAYS:
        return "weekday"
    if is_time_text(core):
        return "time"
    if t.isdigit():
        return "int"
    if t.startswith("["):
        return "btime" if _CLOCK.search(t) and re.search(r"\d{1,2}:\d{2}:\d{2}", t) else "bracket"
    if _PIDCOMP.fullmatch(t):
        return "pidcomp"
    if t.endswith(":") and len(t) > 1 and not t.endswith("::"):
        return "colon"
    if _IDENT.fullmatch(t):
        return "word"
    return "other"


_ANCHORS = {"pri", "time", "btime", "month", "weekday", "int", "level", "letter", "sep", "bracket", "pidcomp", "colon"}
_TIMEISH = {"time", "btime", "month", "weekday"}


# ------------------------------------------------------------------------------ columns
@dataclass
class Column:
    """The n-th header token over the sampled lines: its dominant kind and what it holds."""

    index: int
    kind: str
    share: float  # of sampled lines whose token here has that kind
    values: list[str] = field(default_factory=list)  # the tokens of that kind
    wide_gap: float = 0.0  # share of lines with 2+ spaces after this token (fixed-width columns)
    role: str = "field"  # time / level / component / sep / field

    @property
    def distinct(self) -> int:
        return len(set(self.values))


def _columns(token_rows: list[list[Token]], lines: list[str], width: int) -> list[Column]:
    cols = []
    n = len(token_rows)
    for j in range(width):
        kinds: collections.Counter = collections.Counter()
        by_kind: dict[str, list[str]] = collections.defaultdict(list)
        gaps = 0
        for toks, line in zip(token_rows, lines):
            if j < len(toks):
                k = token_kind(toks[j].text)
                kinds[k] += 1
                by_kind[k].append(toks[j].text)
                end = toks[j].end
                gaps += line[end:end + 2] == "  "
        if not kinds:
            break
        kind, cnt = kinds.most_common(1)[0]
        cols.append(Column(j, kind, cnt / n, by_kind[kind], gaps / n))
    return cols


def _int_time(cols: list[Column], j: int) -> bool:
    """An all-digit column that is a time: epoch seconds, or a yymmdd/yyyymmdd date before an HHMMSS."""
    c = cols[j]
    if c.kind != "int" or not c.values:
        return False
    vals = c.values[:50]
    if j > 0 and cols[j - 1].kind == "month" and all(1 <= int(v) <= 31 for v in vals):
        return True  # "Jun 14": day of month
    if (j > 0 and cols[j - 1].kind == "int" and all(len(v) == 6 for v in vals)
            and all(len(v) in (6, 8) for v in cols[j - 1].values[:50]) and _int_time(cols, j - 1)):
        return True  # the HHMMSS after a compact date
    if all(9 <= len(v) <= 10 and 10**8 <= int(v) <= 4 * 10**9 for v in vals):
        return True
    if j + 1 < len(cols) and cols[j + 1].kind == "int" and all(len(v) in (6, 8) for v in vals):
        nxt = cols[j + 1].values[:50]
        ok = 0
        for d, t in zip(vals, nxt):
            try:
                datetime.strptime(d + t, ("%y%m%d" if len(d) == 6 else "%Y%m%d") + "%H%M%S")
                ok += 1
            except ValueError:
                pass
        return ok >= 0.9 * min(len(vals), len(nxt))
    return False


def _is_timeish(cols: list[Column], j: int) -> bool:
    return cols[j].kind in _TIMEISH or _int_time(cols, j)


# ------------------------------------------------------------------------------ inference
def _delimiter(lines: list[str]) -> str | None:
    """``|`` when nearly every line is ``field|field|...|message`` with short leading fields."""
    hits = sum(1 for ln in lines if ln.count("|") >= 2 and 0 < ln.find("|") <= 60)
    return "|" if hits >= 0.8 * len(lines) else None


def _shape(text: str) -> str:
    """A regex for tokens shaped like ``text``: digit runs, letter runs, punctuation kept."""
    out = []
    for m in re.finditer(r"\d+|[A-Za-z]+|\s+|.", text):
        s = m.group(0)
        if s[0].isdigit():
            out.append(r"\d+")
        elif s[0].isalpha():
            out.append(r"[A-Za-z]+")
        elif s[0].isspace():
            out.append(r"\s+")
        else:
            out.append(re.escape(s))
    return "".join(out)


def _shapes(values: Sequence[str], limit: int = 4) -> str | None:
    """An alternation of the few shapes the values take (None when there are too many)."""
    c = collections.Counter(_shape(v) for v in values)
    if len(c) > limit:
        return None
    alts = [s for s, _ in c.most_common()]
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _level_regex(col: Column) -> str:
    """The level column: its punctuation around a severity word (or a logcat letter)."""
    if col.kind == "letter":
        return r"(?P<level>[VDIWEFA])"
    words = sorted({_core(v).upper() for v in col.values} | SEVERITIES, key=lambda s: (-len(s), s))
    sample = collections.Counter(col.values).most_common(1)[0][0]
    core = _core(sample)
    i = sample.find(core)
    pre, post = sample[:i].strip(), sample[i + len(core):].strip()  # "[INFO ]" and "[WARN]" alike
    pre = re.escape(pre) + r"\s*" if pre else ""
    post = r"\s*" + re.escape(post) if post else ""
    return f"{pre}(?P<level>(?i:{'|'.join(map(re.escape, words))})){post}"


_COLON_COMPONENT = r"(?P<component>.{1,80}?)(?:\[(?P<pid>\d+)\])?(?: \([^)]*\))?:(?=\s|$)"


def _bracket_component(g: dict) -> str | None:
    """``[thread:pkg.Class@123]`` -> Class (log4j's %C@%L inside a bracket)."""
    m = _CLASS_AT_LINE.search(g.get("bracket") or "")
    return m.group(1) if m else None


def _pick_component(cols: list[Column], level: int | None, delimiter: str | None, n_lines: int) -> int | None:
    """The component column by punctuation and position cues, strongest first."""
    def word(j: int) -> bool:
        return 0 <= j < len(cols) and cols[j].kind == "word" and cols[j].role == "field"

    for c in cols:  # comp: / comp[pid]: (the header ends there)
        if c.kind in ("colon", "pidcomp"):
            return c.index
    for c in cols:  # [thread:pkg.Class@123]
        if c.kind == "bracket" and sum(bool(_CLASS_AT_LINE.search(v.strip("[]"))) for v in c.values) >= 0.5 * len(c.values):
            return c.index
    if level is not None:
        if word(level + 1):  # kept in the header only when a bracket or a fixed-width gap follows it
            return level + 1
        if word(level - 1) and cols[level - 1].distinct > 1:
            return level - 1
    for c in cols[:-1]:  # "comp - message" / "comp - LEVEL - message"
        if word(c.index) and cols[c.index + 1].kind == "sep":
            return c.index
    if delimiter:
        for c in cols:
            if word(c.index):
                return c.index
    for c in cols:  # the first low-cardinality identifier column that varies and is not a host name
        digits = sum(any(ch.isdigit() for ch in v) for v in c.values) / max(1, len(c.values))
        if word(c.index) and 2 <= c.distinct <= max(30, 0.05 * n_lines) and digits < 0.5:
            return c.index
    return None


def _header(cols: list[Column], min_share: float) -> list[Column]:
    """The leading columns most lines agree on, up to a ``name:`` token or the last anchor column."""
    head: list[Column] = []
    for c in cols:
        if c.share < min_share or c.kind in ("other", "empty"):
            break
        head.append(c)
        if c.kind in ("colon", "pidcomp"):
            return head
    last = max((i for i, c in enumerate(head) if c.kind in _ANCHORS and c.share >= 0.9), default=-1)
    keep = head[:last + 1]
    # an identifier right after the last anchor stays when the columns are fixed-width (2+ spaces follow)
    if last + 1 < len(head) and head[last + 1].kind == "word" and head[last + 1].wide_gap >= 0.8:
        keep.append(head[last + 1])
    return keep


def infer_format(lines: Iterable[str], sample: int = 400, min_share: float = 0.6) -> LogFormat:
    """A :class:`LogFormat` for these lines (their first ``sample`` non-empty ones), or GENERIC."""
    probe = [ln for ln in lines if ln.strip()][:sample]
    if not probe:
        return GENERIC
    # continuation lines (indented stack frames, wrapped messages) carry no header: leave them out of
    # the column analysis (they still count against the share of lines the format fits)
    heads = [ln for ln in probe if not ln[0].isspace() and any(ch.isdigit() for ch in ln[:40])]
    analysed = heads if len(heads) >= 0.3 * len(probe) else probe
    delimiter = _delimiter(analysed)
    rows = [tokenize(ln, delimiter) for ln in analysed]
    width = max((len(r) for r in rows), default=0)
    cols = _columns(rows, analysed, min(width, 14))
    if delimiter:
        n_fields = collections.Counter(len(r) for r in rows).most_common(1)[0][0]
        head = cols[:n_fields]
    else:
        head = _header(cols, min_share)
    if not head:
        return GENERIC
    lv = next((c.index for c in head if c.kind in ("level", "letter")), None)
    if lv is not None:  # "LEVEL comp - message" / "LEVEL - message": the message starts after the first " - "
        sep = next((c.index for c in head[lv + 1:] if c.kind == "sep" and c.share >= 0.9), None)
        if sep is not None:
            head = head[:sep + 1]
    # roles: time run, level, component
    time_run: list[int] = []
    for c in head:
        if _is_timeish(head, c.index) and (not time_run or time_run[-1] == c.index - 1):
            time_run.append(c.index)
            continue
        if time_run:
            break
    for j in time_run:
        head[j].role = "time"
    level = next((c.index for c in head if c.kind in ("level", "letter") and c.role == "field"), None)
    if level is not None:
        head[level].role = "level"
    comp = _pick_component(head, level, delimiter, len(analysed))
    if comp is not None:
        head[comp].role = "component"
    fmt = _build(head, time_run, delimiter)
    return _measure(fmt, probe)


def _build(head: list[Column], time_run: list[int], delimiter: str | None) -> LogFormat:
    """The regex and Loghub-style spec for the header columns."""
    pieces: list[str] = []
    spec: list[str] = []
    component_fn = None
    n_int = 0
    for c in head:
        if delimiter:
            name = {"time": "time", "level": "level", "component": "component"}.get(c.role)
            body = r"[^|]*?"
            pieces.append(f"(?P<{name}>{body})" if name else body)
            spec.append({"time": "<Time>", "level": "<Level>", "component": "<Component>"}.get(c.role, "<Field>"))
            continue
        if c.role == "time":
            piece = _shapes(c.values) or r"\S+"
            if c.index == time_run[0]:
                piece = "(?P<time>" + piece
            if c.index == time_run[-1]:
                piece += ")"
            pieces.append(piece)
            if c.kind in ("month", "weekday"):
                spec.append(f"<{c.kind.capitalize()}>")
            elif c.kind == "int" and c.index and head[c.index - 1].kind == "month":
                spec.append("<Day>")
            else:
                spec.append("<Date>" if c.index == time_run[0] and len(time_run) > 1 else "<Time>")
        elif c.role == "level":
            pieces.append(_level_regex(c))
            spec.append("[<Level>]" if c.values and c.values[0].startswith("[") else "<Level>")
        elif c.role == "component":
            if c.kind in ("colon", "pidcomp"):
                pieces.append(_COLON_COMPONENT)
                spec.append("<Component>[<Pid>]:" if c.kind == "pidcomp" else "<Component>:")
            elif c.kind == "bracket":
                pieces.append(r"\[(?P<bracket>.*?)\](?=\s|$)")
                spec.append("[<Thread>:<Component>@<Line>]")
                component_fn = _bracket_component
            elif c.index + 1 < len(head) and head[c.index + 1].kind == "sep":
                pieces.append(r"(?P<component>\S.{0,80}?)")  # "Program Name - message": spaces allowed
                spec.append("<Component>")
            else:
                pieces.append(r"(?P<component>\S+)")
                spec.append("<Component>")
        elif c.kind == "pri":
            pieces.append(r"<\d{1,3}>")
            spec.append("<Priority>")
        elif c.kind == "sep" and c.share >= 0.99:
            sep = collections.Counter(c.values).most_common(1)[0][0]
            pieces.append(re.escape(sep))
            spec.append(sep)
        elif c.kind == "sep":  # mostly "-", sometimes a word: a label field (alert tags), not a separator
            pieces.append(r"\S+")
            spec.append("<Label>")
        elif c.kind in ("bracket", "btime"):
            pieces.append(r"\[.*?\](?=\s|$)")
            spec.append("[<Field>]")
        elif c.kind == "int":
            n_int += 1
            pieces.append(r"\d+")
            if c.index and head[c.index - 1].kind == "month":
                spec.append("<Day>")
            else:
                spec.append("<Pid>" if n_int == 1 else "<Tid>" if n_int == 2 else "<Num>")
        elif c.kind == "word" and c.index and head[c.index - 1].role == "time" and "(?P<host>" not in "".join(pieces):
            pieces.append(r"(?P<host>\S+)")  # syslog: the host name follows the timestamp
            spec.append("<Host>")
        else:
            pieces.append(r"\S+")
            spec.append("<Field>")
    if delimiter:
        regex = "^" + r"\|".join(pieces) + r"\|(?P<content>.*)$"
        spec_text = "|".join(spec) + "|<Content>"
    else:
        regex = "^" + "".join(p + ("" if i == len(pieces) - 1 else r"\s*" if p == r"<\d{1,3}>" else r"\s+")
                              for i, p in enumerate(pieces)) + r"(?:\s+(?P<content>.*))?$"
        spec_text = " ".join(spec) + " <Content>"
        if head[-1].role == "component" and head[-1].kind in ("colon", "pidcomp"):
            spec_text = spec_text.replace(": <Content>", ": <Content>")
    return LogFormat("inferred", regex, None, component_fn, spec_text)


def _measure(fmt: LogFormat, probe: list[str]) -> LogFormat:
    """Add the time format and the share of sampled lines the regex parses."""
    pat = fmt.pattern
    matches = [pat.match(ln) for ln in probe]
    ok = [m for m in matches if m]
    times = [m.group("time") for m in ok if "time" in pat.groupindex and m.group("time")]
    tf = infer_time_format(times) if times else None
    return LogFormat(fmt.name, fmt.regex, tf, fmt.component, fmt.spec, len(ok) / len(probe), len(probe))


# ------------------------------------------------------------------------------ time
TIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y/%m/%d %H:%M:%S", "%y/%m/%d %H:%M:%S", "%y-%m-%d %H:%M:%S",
    "%Y.%m.%d %H:%M:%S", "%d/%m/%Y %H:%M:%S", "%m/%d/%Y %H:%M:%S", "%d.%m.%Y %H:%M:%S", "%d/%b/%Y:%H:%M:%S",
    "%y%m%d %H%M%S", "%Y%m%d %H%M%S", "%Y%m%d-%H:%M:%S", "%Y%m%d %H:%M:%S", "%Y-%m-%d-%H.%M.%S",
    "%a %b %d %H:%M:%S %Y", "%b %d %H:%M:%S %Y", "%b %d %Y %H:%M:%S", "%b %d %H:%M:%S", "%a %b %d %H:%M:%S",
    "%d %b %Y %H:%M:%S", "%m-%d %H:%M:%S", "%m.%d %H:%M:%S", "%m/%d %H:%M:%S", "%Y-%m-%d %H:%M",
    "%Y-%m-%d", "%Y.%m.%d", "%y%m%d", "%H:%M:%S",
)
_FRACTION = re.compile(r"(?:(?<=\d{2}:\d{2}:\d{2})|(?<=\d{2}\.\d{2}\.\d{2}))[.,:]\d{1,9}(?=$|\s)")
_TZ = re.compile(r"(?:Z|[+-]\d{2}:?\d{2})$")


def normalize_time(value: str) -> str:
    """Brackets, trailing commas, fractions of a second and a time zone suffix removed."""
    text = " ".join(value.strip().strip("[]").rstrip(",").split())
    text = _TZ.sub("", text) if re.search(r"\d{2}:\d{2}", text) else text
    return _FRACTION.sub("", text)


def infer_time_format(values: Sequence[str]) -> str | None:
    """The strptime format (or "epoch") most of these time strings parse with."""
    sample = [normalize_time(v) for v in values[:100]]
    if not sample:
        return None
    firsts = [s.split()[0] for s in sample if s]
    if firsts and all(f.isdigit() and 9 <= len(f) <= 10 for f in firsts):
        return "epoch"
    best, best_n = None, 0
    for tf in TIME_FORMATS:
        n = 0
        for s in sample:
            try:
                datetime.strptime(s, tf)
                n += 1
            except ValueError:
                pass
        if n > best_n:
            best, best_n = tf, n
    return best if best_n >= 0.8 * len(sample) else None


def parse_time_value(value: str | None, time_format: str | None) -> datetime | None:
    """datetime of a time field (formats without a year get 1900), or None."""
    if not value or not time_format:
        return None
    text = normalize_time(value)
    if time_format == "epoch":
        try:
            return datetime.fromtimestamp(int(text.split()[0]), tz=timezone.utc).replace(tzinfo=None)
        except (ValueError, OverflowError, OSError):
            return None
    try:
        return datetime.strptime(text, time_format)
    except ValueError:
        return None


# ------------------------------------------------------------------------------ measuring
def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="Infer the format of a log, or measure the reader on Loghub samples.")
    ap.add_argument("log", nargs="?", help="a log file: print the inferred format")
    ap.add_argument("--reader-table", metavar="DIR", nargs="?", const="../shared/data/loghub",
                    help="per-line level/component agreement with every *_structured.csv under DIR")
    a = ap.parse_args(argv)
    from tools.logtools import LogError, read_log, reader_table

    try:
        if a.reader_table:
            print(reader_table(a.reader_table))
            return 0
        if not a.log:
            ap.error("give a log file or --reader-table [DIR]")
        fmt = read_log(a.log).format
    except LogError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(fmt.describe())
    print(f"regex: {fmt.regex}\ntime format: {fmt.time_format}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
