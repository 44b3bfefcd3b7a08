"""The budget guard: closes a required tool call (or a JSON answer) before ``max_new_tokens`` cuts it.

:class:`CloseGuard` follows the generated tokens with its own xgrammar matcher and, near the end of the
budget, returns the shortest valid close of the reply, which decoding pushes as if generated. Decoding
(:mod:`flashback_agents.generation`) never imports this module: a processor that must complete carries
its guard's constructor (``processor.close_guard``, set by :mod:`flashback_agents.constrained`).
xgrammar is the optional dependency imported where it is used.
"""

from __future__ import annotations

from typing import Any, Sequence

from .toolformat import ConstraintError

__all__ = ["CloseGuard", "CloseVocab", "close_guard", "MAX_CLOSE_OVERSHOOT", "CLOSE_SLACK", "CLOSE_MARGIN",
           "MAX_CLOSE_STEPS"]

#: most tokens the guard may add past ``max_new_tokens`` to close a reply (more: ConstraintError)
MAX_CLOSE_OVERSHOOT = 256
#: the guard closes when the shortest close plus this many tokens no longer fits in what is left
#: (one more model token may open another string or array)
CLOSE_SLACK = 4
#: how far from the end (beyond the last known close length) the guard starts to look
CLOSE_MARGIN = 32
#: longest close the walk looks for (characters or tokens): a schema needing more cannot be closed
MAX_CLOSE_STEPS = 4096

_PRINTABLE = "".join(chr(c) for c in range(32, 127) if chr(c) != "\\")
#: characters tried, in order, outside a free string: close what is open (a string of a pattern or a
#: format too), then the next item, then the shortest values (an empty string, a digit), then anything
#: printable (t/f/n, [ and {, enum letters)
_ORDER_OUT = "]},\"0" + "".join(c for c in _PRINTABLE if c not in "]},0\"")
#: inside a free string: close it, else pad it (minLength) with a plain letter
_ORDER_IN = "\"x" + "".join(c for c in _PRINTABLE if c not in "\"x")
#: the same character chosen this many times in a row: look for the text that lets the string close
_STUCK_RUN = 8
#: what that search tries: one letter of each case, one digit, every other printable character but ``"``
_UNSTICK_ALPHABET = "x0X" + "".join(c for c in _PRINTABLE if not c.isalnum() and c != '"')
_UNSTICK_PROBES = 4000


class CloseGuard:
    """Keeps a required call (or a JSON answer) closable within the token budget.

    It follows the generated tokens with its own ``xgrammar.GrammarMatcher`` (lazily: only near the
    end of the budget) and, when the shortest valid close of what was generated so far (plus
    :data:`CLOSE_SLACK`) no longer fits in the tokens left (``max_new_tokens`` or the context
    window), returns that close: generation pushes those tokens (and a stop token) as if decoded, so
    the reply is a complete, parsable call instead of one cut at ``length``. The close is exact with
    respect to the grammar (each token is checked by a matcher); "shortest" is a greedy walk that
    closes strings, arrays and objects first, writes the smallest values still required (``""``,
    ``0``, ``[]``, the first enum member), pads a string to its ``minLength``, and searches a few
    characters ahead where a pattern or a format needs them (an email's ``@``): shortest or close to
    it for JSON-schema grammars, and never more than :data:`MAX_CLOSE_STEPS` characters.
    A close that does not fit in the context window, or needs more than :data:`MAX_CLOSE_OVERSHOOT`
    tokens past ``max_new_tokens``, raises :class:`ConstraintError`.
    """

    def __init__(self, compiled: Any, stop_ids: Sequence[int], vocab: "CloseVocab | None" = None):
        import xgrammar as xgr

        self._xgr = xgr
        self.compiled = compiled
        self.matcher = xgr.GrammarMatcher(compiled)
        self.seen = 0  # generated tokens the matcher has accepted
        self.lost = False  # a generated token the matcher refused: the guard stands aside
        self.stop_ids = sorted(int(t) for t in stop_ids)
        self.vocab = vocab or CloseVocab(compiled.tokenizer_info)
        first = self.close()  # the shortest complete reply, from the start (None: found when needed, or an error)
        #: tokens kept back for the close: the last close's length plus CLOSE_SLACK
        self.reserve = (len(first) if first is not None else 0) + CLOSE_SLACK

    def follow(self, generated: Sequence[int]) -> None:
        """Accept the generated tokens not yet seen."""
        for t in generated[self.seen:]:
            if self.matcher.is_terminated():
                break
            if not self.matcher.accept_token(int(t)):
                self.lost = True
                break
        self.seen = len(generated)

    def plan(self, generated: Sequence[int], left: int, room: int) -> list[int] | None:
        """Before a step: the close to push now (ends with a stop token), or None to let the model go on.

        ``left``: tokens this reply may still produce (budget and window); ``room``: positions left in
        the context window (the close may exceed ``left`` by up to MAX_CLOSE_OVERSHOOT, never ``room``).
        """
        if left > self.reserve + CLOSE_MARGIN:
            return None
        self.follow(generated)
        if self.lost or self.matcher.is_terminated():
            return None
        toks = self.close()
        if toks is None:
            raise ConstraintError("The constrained reply cannot be closed from where the model took it "
                                  f"(no valid close within {MAX_CLOSE_STEPS} characters); raise max_tokens or "
                                  "simplify the schema.")
        self.reserve = len(toks) + CLOSE_SLACK
        if self.reserve < left:
            return None
        if len(toks) > room:
            raise ConstraintError(f"The required tool call / JSON reply cannot be completed in the context window: "
                                  f"{room} positions are left and its shortest valid end needs {len(toks)} tokens; "
                                  "raise max_context_tokens or shorten the conversation.")
        if len(toks) > left + MAX_CLOSE_OVERSHOOT:
            raise ConstraintError(f"The required tool call / JSON reply needs {len(toks)} more tokens to be valid, "
                                  f"more than max_new_tokens leaves ({left}) plus {MAX_CLOSE_OVERSHOOT}; raise "
                                  "max_tokens or relax the schema (minLength, minItems, required properties).")
        return toks

    def step_budget(self, left: int) -> int:
        """Most tokens one multi-token step (speculation, jump-forward) may take: up to where the guard
        starts to look, then one at a time, so the guard looks at exactly the positions it looks at
        under one-token decoding (the output stays plain decoding's)."""
        edge = self.reserve + CLOSE_MARGIN
        return left - edge if left > edge else 1

    # ------------------------------------------------------------ the close
    def close(self) -> list[int] | None:
        """Token ids of the shortest valid end of the reply from the matcher's state, ending with a
        stop token (None: none found within MAX_CLOSE_STEPS)."""
        m = self.matcher.fork()
        out: list[int] = []
        text = ""
        last, run, unstuck = "", 0, False
        for _ in range(MAX_CLOSE_STEPS):
            if m.is_completed():
                break
            forced = m.find_jump_forward_string()
            if forced and m.accept_string(forced):
                text += forced
                continue
            order = _ORDER_IN if self._accepts(m, "q") and self._accepts(m, "x") else _ORDER_OUT
            ch = next((c for c in order if m.accept_string(c)), None)
            if ch is not None:
                text += ch
                run, unstuck = (run + 1, unstuck) if ch == last else (1, False)
                last = ch
                if run >= _STUCK_RUN and not unstuck:  # padding a string: a pattern/format may need other chars
                    unstuck = True
                    if self._accepts(m, " ") and self._accepts(m, "~"):  # a free string (minLength): pad on
                        continue
                    path = self._unstick(m)
                    if path and m.accept_string(path):
                        text += path
                        last, run = "", 0
                continue
            tok = self._any_token(m)  # inside a multi-byte character, or a non-ASCII enum member
            if tok is None:
                return None
            out += self._tokens(text.encode("utf-8"))
            text = ""
            out.append(tok)
        else:
            return None
        out += self._tokens(text.encode("utf-8"))
        stop = next((t for t in self.stop_ids if self._accepts_token(m, t)), None)
        if stop is None:
            return None
        out.append(stop)
        check = self.matcher.fork()  # the tokens, not only the text, must be what the grammar accepts
        if not all(check.accept_token(t) for t in out):
            return None
        return out

    def _unstick(self, m: Any) -> str | None:
        """The shortest text (up to 3 characters, at most _UNSTICK_PROBES tries) after which ``m`` can
        close a string (accepts ``"``) or is complete: what a pattern or a format (an email's ``@x``,
        a ``-`` between digit groups) needs where padding with one character never ends."""
        frontier, probes = [("", m)], 0
        for _ in range(3):
            deeper = []
            for path, node in frontier:
                for c in _UNSTICK_ALPHABET:
                    probes += 1
                    if probes > _UNSTICK_PROBES:
                        return None
                    if not node.accept_string(c):
                        continue
                    if node.is_completed() or self._accepts(node, '"'):
                        node.rollback(1)
                        return path + c
                    deeper.append((path + c, node.fork()))
                    node.rollback(1)
            frontier = deeper
        return None

    @staticmethod
    def _accepts(m: Any, s: str) -> bool:
        if m.accept_string(s):
            m.rollback(1)
            return True
        return False

    @staticmethod
    def _accepts_token(m: Any, t: int) -> bool:
        f = m.fork()
        return bool(f.accept_token(t))

    def _any_token(self, m: Any) -> int | None:
        """The allowed token with the fewest bytes (accepted into ``m``), or None."""
        xgr = self._xgr
        mask = xgr.allocate_token_bitmask(1, self.compiled.tokenizer_info.vocab_size)
        m.fill_next_token_bitmask(mask, 0)
        allowed = xgr.testing.bitmask_to_bool_mask(mask)[0]
        stops, vocab = set(self.stop_ids), self.vocab.vocab
        best = None
        for t in allowed.nonzero().flatten().tolist():
            if t in stops or t >= len(vocab) or not vocab[t]:
                continue
            if best is None or len(vocab[t]) < len(vocab[best]):
                best = t
                if len(vocab[t]) == 1:
                    break
        if best is None or not m.accept_token(best):
            return None
        return best

    def _tokens(self, data: bytes) -> list[int]:
        """``data`` as token ids, longest vocabulary piece first (exact bytes, no tokenizer quirks:
        no prefix space, no normalisation)."""
        pieces, longest = self.vocab.pieces, self.vocab.longest
        out, i = [], 0
        while i < len(data):
            for n in range(min(longest, len(data) - i), 0, -1):
                t = pieces.get(data[i:i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:
                raise ConstraintError(f"The vocabulary has no token for byte {data[i]:#x}; this model cannot close "
                                      "the reply.")
        return out


class CloseVocab:
    """A grammar vocabulary as the guard reads it: each token's bytes (special tokens blank) and
    {bytes: first token id} without stop tokens. Built once per model (:meth:`GrammarCache.close_vocab`)."""

    def __init__(self, info: Any):
        self.vocab: list[bytes] = list(info.decoded_vocab)
        stops = set(info.stop_token_ids)
        self.pieces: dict[bytes, int] = {}
        for i, b in enumerate(self.vocab):
            if b and i not in stops and b not in self.pieces:
                self.pieces[b] = i
        self.longest = max((len(b) for b in self.pieces), default=1)


def close_guard(processors: Sequence[Any], stop_ids: Sequence[int]) -> CloseGuard | None:
    """The guard for a generation whose processors include one that must complete (None: none does)."""
    marked = [p for p in processors if getattr(p, "close_on_budget", False)]
    if len(marked) != 1 or len(getattr(marked[0], "compiled_grammars", ())) != 1 or not stop_ids:
        return None
    return CloseGuard(marked[0].compiled_grammars[0], stop_ids, getattr(marked[0], "close_vocab", None))
