"""User text is text: escaping for the Markdown that Streamlit renders.

Run, pipeline, penalty and metric names, event messages and alert attributes come from
users. Wherever the page builds Markdown (``st.markdown``, ``st.caption``, ``st.info``
and the other banners, widget labels), every such string goes through :func:`md_escape`
first, so ``**bold**``, ``<b>tag</b>``, ``[link](http://x)``, ``$x$``, ``:red[x]``,
``:smile:`` and ``# heading`` appear as typed. Elements that render plain text (chart
titles, axes and legends drawn by Vega, table cells, selectbox options) take the string
as is: escaping there would show the backslashes.
"""

from __future__ import annotations

import string

__all__ = ["md_escape"]

_PUNCTUATION = frozenset(string.punctuation)
"""ASCII punctuation: CommonMark lets a backslash escape each of these characters, which
also keeps Streamlit's extensions (math ``$``, directives ``:red[...]``, emoji and icon
shortcodes ``:name:``, raw HTML ``<``, entities ``&``) from seeing them."""


def md_escape(text: object) -> str:
    r"""``text`` as Markdown that renders literally.

    Every ASCII punctuation character is backslash-escaped; a line break becomes a
    Markdown hard break (trailing ones are dropped); the first space or tab of a line
    becomes a character reference, so indentation never starts a code block. (Runs of
    spaces still collapse, as in any HTML.)

    Args:
      text: the user's string (anything else is converted with ``str``).

    Returns:
      Markdown source that Streamlit displays as ``text``.

    Example:
      >>> print(md_escape("**bold** [x](http://e) $a$"))
      \*\*bold\*\* \[x\]\(http\:\/\/e\) \$a\$
    """
    lines = str(text).replace("\r\n", "\n").replace("\r", "\n").rstrip("\n").split("\n")
    return "\\\n".join(_escape_line(line) for line in lines)


def _escape_line(line: str) -> str:
    out = "".join("\\" + c if c in _PUNCTUATION else c for c in line)
    if out[:1] in (" ", "\t"):
        out = f"&#{ord(out[0])};{out[1:]}"
    return out
