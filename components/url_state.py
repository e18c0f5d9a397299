"""Reading a page's state from its URL query: one value a key, with a message for each bad one.

Dash pages passes the query to ``layout(**kwargs)`` as a string per key, or a list when the key
repeats. :class:`QueryReader` turns those into the values a page wants and collects a short,
user-facing message for every value it had to replace, so the page can show them in its alert.
Nothing here imports torch or TransformerLens.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

# A value quoted in a message is cut to this many characters, so a pasted essay stays readable.
SHORT_LENGTH = 40


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when anything was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short(text: str) -> str:
    """``text`` quoted for a message, cut with an ellipsis past :data:`SHORT_LENGTH` characters."""
    return repr(clip(text, SHORT_LENGTH))


def as_index(value: object) -> int | None:
    """A select, store or URL value as a non-negative int, None when it is not one."""
    if isinstance(value, bool):
        return None
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number >= 0 else None


class QueryReader:
    """Reads typed values from URL query parameters, noting each one it cannot use.

    Args:
        query: Parameters as Dash pages passes them to ``layout``: a string per key, or a list
            when the key repeats.

    Attributes:
        messages: One message per unusable or repeated value, in the order they were read.
    """

    def __init__(self, query: Mapping[str, object]) -> None:
        self.query = query
        self.messages: list[str] = []

    def text(self, name: str) -> str | None:
        """The value of ``name``; the first one when it repeats; None when absent or empty."""
        value = self.query.get(name)
        if isinstance(value, list):
            self.messages.append(f"the link gives '{name}' {len(value)} times; using the first")
            value = value[0] if value else None
        return value if isinstance(value, str) and value != "" else None

    def index(
        self,
        name: str,
        default: int | None = None,
        *,
        digits_only: bool = False,
        fallback: str | None = None,
    ) -> int | None:
        """The value of ``name`` as a whole number ≥ 0, ``default`` when absent or unusable.

        Args:
            name: Query key.
            default: Value when the key is absent, empty or not a whole number ≥ 0.
            digits_only: Accept only ASCII digits (no sign, spaces or underscores, which
                ``int`` would take).
            fallback: What the message says happens to a bad value; ``"using <default>"``
                (``"using none"`` for None) when not given.

        Returns:
            The number, or ``default``.
        """
        raw = self.text(name)
        if raw is None:
            return default
        if digits_only:
            number = int(raw) if raw.isascii() and raw.isdigit() else None
        else:
            number = as_index(raw)
        if number is None:
            if fallback is None:
                fallback = "using " + ("none" if default is None else str(default))
            self.messages.append(
                f"{name} {short(raw)} in the link is not a whole number ≥ 0; {fallback}"
            )
            return default
        return number

    def choice(
        self, name: str, options: Collection[str], default: str, *, problem: str | None = None
    ) -> str:
        """The value of ``name`` when it is one of ``options``, else ``default``.

        Args:
            name: Query key.
            options: The allowed values.
            default: Value when the key is absent, empty or not allowed.
            problem: What the message says about a value not allowed; ``"is not one of
                <options>; using <default>"`` when not given.

        Returns:
            The value, or ``default``.
        """
        raw = self.text(name)
        if raw is None:
            return default
        if raw in options:
            return raw
        if problem is None:
            problem = f"is not one of {', '.join(options)}; using {default}"
        self.messages.append(f"{name} {short(raw)} in the link {problem}")
        return default
