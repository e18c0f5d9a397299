"""The prompt and model input panel that every analysis page opens with.

A page makes its ids with ``PromptPanelIds("<page>")``, places ``make_prompt_panel(ids, ...)`` in
its layout and calls :func:`register_example_callback` once, at import, so the example buttons
fill the prompt box. The page's own callback listens to ``ids.analyse`` and reads ``ids.prompt``
and ``ids.model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import dash_bootstrap_components as dbc
from dash import ALL, Input, Output, callback, ctx, html, no_update

# (button text, prompt). The first one opens the app; its repeated sentence lets induction heads
# show as a stripe one repeat-length below the diagonal.
EXAMPLE_PROMPTS: tuple[tuple[str, str], ...] = (
    (
        "Repeated phrase",
        "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    ),
    (
        "Story",
        "Once upon a time, Mary went to the market to buy apples. When she came home, she gave "
        "the apples to her brother John, who said thank you to",
    ),
    (
        "Code",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + "
        "fibonacci(n - 2)\n",
    ),
)
DEFAULT_PROMPT = EXAMPLE_PROMPTS[0][1]


@dataclass(frozen=True)
class PromptPanelIds:
    """The component ids of one page's prompt panel, all prefixed by the page name."""

    page: str

    @property
    def prompt(self) -> str:
        return f"{self.page}-prompt"

    @property
    def model(self) -> str:
        return f"{self.page}-model"

    @property
    def analyse(self) -> str:
        return f"{self.page}-analyse"

    @property
    def truncate(self) -> str:
        return f"{self.page}-truncate"

    @property
    def example_type(self) -> str:
        """``type`` of the example buttons' pattern-matching ids."""
        return f"{self.page}-example"


def model_options(models: list[str], current: str | None) -> list[dict]:
    """Options for the model picker; ``current`` is kept even when it is not in ``models``."""
    names = list(models)
    if current and current not in names:
        names.append(current)
    return [{"label": name, "value": name} for name in names]


def make_prompt_panel(
    ids: PromptPanelIds,
    *,
    models: list[str],
    model: str,
    prompt: str,
    truncate: bool | None = None,
    actions=None,
) -> dbc.Card:
    """A card with example buttons, the prompt box, the model picker and the Analyse button.

    Args:
        ids: The page's :class:`PromptPanelIds`.
        models: Model names to offer (``analysis.available_models()``).
        model: The chosen model (added to the options if missing).
        prompt: The text in the prompt box.
        truncate: ``None`` for no truncation checkbox; else whether ``ids.truncate``, "keep
            only the last tokens of a prompt that is too long", starts ticked. A page that
            shows it passes its value on as ``analysis.analyze(truncate=...)``.
        actions: Components for the panel's last line, at the right (e.g. a report button).
    """
    examples = [
        dbc.Button(
            title,
            id={"type": ids.example_type, "index": index},
            color="secondary",
            outline=True,
            size="sm",
            n_clicks=0,
        )
        for index, (title, _) in enumerate(EXAMPLE_PROMPTS)
    ]
    body = [
        html.Div(
            [html.Span("Examples", className="small text-body-secondary me-1"), *examples],
            className="d-flex flex-wrap align-items-center gap-1 mb-2",
        ),
        dbc.Textarea(
            id=ids.prompt,
            value=prompt,
            rows=4,
            placeholder="Type a prompt to analyse",
            class_name="font-monospace mb-2",
            spellcheck=False,
        ),
        html.Div(
            [
                dbc.InputGroup(
                    [
                        dbc.InputGroupText("Model"),
                        dbc.Select(id=ids.model, options=model_options(models, model), value=model),
                    ],
                    size="sm",
                    class_name="flex-grow-1",
                ),
                dbc.Button("Analyse", id=ids.analyse, color="primary", n_clicks=0),
            ],
            className="d-flex gap-2 align-items-center",
        ),
    ]
    footer = []
    if truncate is not None:
        footer.append(
            dbc.Checkbox(
                id=ids.truncate,
                label="Keep only the last tokens of a prompt that is too long",
                value=truncate,
                class_name="small mb-0",
            )
        )
    if actions is not None:
        footer.append(html.Div(actions, className="ms-auto"))
    if footer:
        body.append(html.Div(footer, className="d-flex flex-wrap align-items-center gap-2 mt-2"))
    return dbc.Card(dbc.CardBody(body), class_name="h-100")


def example_prompt(index: object) -> str:
    """The text of example ``index``; ``ValueError`` for anything that is not one."""
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"example index must be an integer, got {index!r}")
    if not 0 <= index < len(EXAMPLE_PROMPTS):
        raise ValueError(f"there is no example {index}; there are {len(EXAMPLE_PROMPTS)}")
    return EXAMPLE_PROMPTS[index][1]


def register_example_callback(ids: PromptPanelIds) -> None:
    """Make the page's example buttons fill its prompt box."""

    @callback(
        Output(ids.prompt, "value", allow_duplicate=True),
        Input({"type": ids.example_type, "index": ALL}, "n_clicks"),
        prevent_initial_call=True,
    )
    def fill_example(clicks):
        if not isinstance(ctx.triggered_id, dict) or not any(clicks):
            return no_update
        return example_prompt(ctx.triggered_id["index"])
