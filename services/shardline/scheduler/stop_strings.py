"""Stop strings over streamed text: what of the text so far may be sent, and where it ends.

Text arrives in deltas (whole characters: the tokenizer's incremental detokenization holds
back incomplete UTF-8). A stop string may span deltas, so the last `hold` characters
(the longest stop string less one) are held back until more text shows they cannot begin
one. The text sent never includes the stop string, nor anything after it.

    stops = ["END"], hold = 2     text so far     sent now   held back
    push("abcE")                  abcE            "ab"       cE
    push("N")                     abcEN           "c"        EN
    push("D more")                abcEND more     ""         (stop found: the text ends at c)
"""
from __future__ import annotations


class StopStringFilter:
    """Feed text deltas to push(); it returns what may be sent now."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.emitted = 0         # characters of text already sent
        self.stopped = False

    def push(self, delta: str, final: bool = False) -> tuple[str, bool]:
        """Append delta; return (text to send now, whether a stop string ended the text). With
        final (the sequence ended), everything not sent is released. After a stop, nothing."""
        if self.stopped:
            return "", True
        self.text += delta
        if self.stops:
            # A stop string not found before ends inside delta, so it starts at emitted or
            # later (emitted stays `hold` characters behind the end of the text).
            hits = [i for i in (self.text.find(s, self.emitted) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                out = self.text[self.emitted:cut]
                self.emitted = cut
                self.stopped = True
                return out, True
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out, False
