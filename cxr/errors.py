"""The one base of every error meant for the user, and the one way to say an exception in one line.

A `CxrError`'s message is one line that names the file (or option) and what is wrong with it; the
CLI prints it and exits with status 2. Anything else that escapes is a bug and surfaces as one.
`CxrError` derives from ValueError so that callers who caught the ValueError subclasses this
package raised before (SpecError, DataError, ...) still catch them.
"""

from __future__ import annotations


class CxrError(ValueError):
    """Input cxr-bench cannot use: a spec, data, weights, result file or option. One-line message."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """`ClassName: first words of the message`, whitespace folded to one line, at most `limit` characters."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}" if text else type(err).__name__
