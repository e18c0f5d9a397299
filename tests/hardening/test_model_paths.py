"""No checkpoint outside the allowed model directories loads from the UI, a URL or a store.

The checkpoint here is real and loadable (a tiny random GPT-2), so a refusal can only come from
where it lies; the last test loads it once its directory is allowed. Name resolution itself is
tested in tests/analysis/test_models.py; the traversal strings are in test_bad_inputs.py.
"""

from __future__ import annotations

import pytest

from analysis.models import DEMO_MODEL
from components.alerts import APP_ALERT
from tests.hardening.conftest import alert_text
from tests.hardening.test_bad_inputs import open_page

REFUSED = "is not inside an allowed model directory"
PROMPT = "The cat sat on the mat. The cat sat on the mat."
PAGES = [
    pytest.param(
        "pages.attention",
        "analyse",
        {"attention-analyse.n_clicks": 1, "attention-prompt.value": PROMPT},
        "attention-model.value",
        "attention-alert",
        id="attention",
    ),
    pytest.param(
        "pages.retention",
        "analyse",
        {"retention-analyse.n_clicks": 1, "retention-prompt.value": PROMPT},
        "retention-model.value",
        "retention-alert",
        id="retention",
    ),
    pytest.param(
        "pages.compare",
        "compare",
        {
            "compare-run.n_clicks": 1,
            "compare-prompt-a.value": PROMPT,
            "compare-prompt-b.value": "x",
        },
        "compare-model.value",
        "compare-alert",
        id="compare",
    ),
    pytest.param(
        "pages.ablate",
        "run_ablation",
        {"ablate-analyse.n_clicks": 1, "ablate-prompt.value": PROMPT},
        "ablate-model.value",
        "ablate-alert",
        id="ablate",
    ),
    pytest.param("pages.heads", "show_scores", {}, "heads-model.value", "heads-alert", id="heads"),
]


@pytest.mark.parametrize(("module", "name", "values", "model_input", "alert_id"), PAGES)
def test_dropdown_value_outside_the_allowed_dirs_is_refused(
    http, tiny_model_dir, module, name, values, model_input, alert_id
):
    reply = http.call(module, name, {**values, model_input: str(tiny_model_dir)})

    assert REFUSED in alert_text(reply, alert_id)


def test_prompt_set_with_a_model_outside_the_allowed_dirs_is_refused(memlens_app, tiny_model_dir):
    from pages.compare_jobs import run_set

    progress = []
    *_, message, is_open = run_set(
        progress.append,
        1,
        "text",
        "a\nb",
        None,
        None,
        ["mean_loss"],
        "",
        "0",
        "0",
        str(tiny_model_dir),
    )

    assert is_open is True and REFUSED in message
    assert progress == []


def test_link_with_a_model_outside_the_allowed_dirs_falls_back_to_the_demo(http, tiny_model_dir):
    message = open_page(http, "/", f"?model={tiny_model_dir}&prompt=hello")

    assert REFUSED in message and f"Showing {DEMO_MODEL} instead" in message


def test_edited_store_naming_an_outside_model_is_refused(http, tiny_model_dir):
    """The analysis store lives in the browser, where a user can rewrite it."""
    data = {"model": str(tiny_model_dir), "prompt": PROMPT, "n_layers": 2, "n_heads": 4}
    reply = http.call(
        "pages.attention",
        "show_head",
        {
            "attention-analysis.data": data,
            "attention-layer.value": "0",
            "attention-head.value": "0",
        },
    )

    assert reply.status == 200 and "Traceback" not in reply.text
    assert reply.side[f"{APP_ALERT}.is_open"] is True
    assert REFUSED in reply.side[f"{APP_ALERT}.children"]
    assert "attention-head-figure.figure" not in reply.outputs


def test_symlink_in_an_allowed_dir_to_an_outside_checkpoint_is_refused(
    http, tiny_model_dir, tmp_path, monkeypatch
):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "innocent").symlink_to(tiny_model_dir, target_is_directory=True)
    monkeypatch.setenv("MEMLENS_MODEL_DIRS", str(allowed))

    reply = http.call(
        "pages.attention",
        "analyse",
        {
            "attention-analyse.n_clicks": 1,
            "attention-prompt.value": PROMPT,
            "attention-model.value": str(allowed / "innocent"),
        },
    )

    assert REFUSED in alert_text(reply, "attention-alert")


def test_the_same_checkpoint_loads_once_its_directory_is_allowed(
    http, tiny_model_dir, cache_dir, monkeypatch
):
    monkeypatch.setenv("MEMLENS_MODEL_DIRS", str(tiny_model_dir.parent))

    reply = http.call(
        "pages.attention",
        "analyse",
        {
            "attention-analyse.n_clicks": 1,
            "attention-prompt.value": PROMPT,
            "attention-model.value": str(tiny_model_dir),
        },
    )

    assert reply.get("attention-alert.is_open") is False, reply.get("attention-alert.children")
    assert reply.get("attention-analysis.data")["model"] == str(tiny_model_dir)
