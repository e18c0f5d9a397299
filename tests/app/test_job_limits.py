"""Every page's long job honours the per-user job limit with an alert, not an error."""

from __future__ import annotations

import pytest
from dash import no_update

from analysis import jobs
from components.jobs import LOCAL_OWNER

MODEL = "memlens-demo"
PROMPT = "The cat sat on the mat. The cat sat on the mat."


def background_jobs():
    """``(module, callback name, alert id, arguments after set_progress)`` of every long job."""
    sweep_data = {"model": MODEL, "prompt": PROMPT, "n_layers": 2, "n_heads": 4, "n_pos": 16}
    compared = {
        "model": MODEL,
        "prompt_a": PROMPT,
        "prompt_b": PROMPT,
        "n_pos_a": 16,
        "n_pos_b": 16,
        "n_layers": 2,
    }
    return [
        ("pages.ablate", "run_sweep", "ablate-sweep-alert", (1, sweep_data, "zero", "", "", [], 0)),
        ("pages.retention", "run_horizon", "retention-horizon-alert", (1, {"key": "x"})),
        (
            "pages.compare_jobs",
            "run_patching",
            "compare-patch-alert",
            (1, compared, " mat", " cat", ["resid_pre"], "0", False),
        ),
        (
            "pages.compare_jobs",
            "run_set",
            "compare-set-alert",
            (1, "text", "a\nb", None, None, ["mean_loss"], "", "0", "0", MODEL),
        ),
    ]


def output_count(app, alert_id: str) -> int:
    """Outputs of the callback that writes ``alert_id``'s children, as the browser sees them."""
    dependencies = app.server.test_client().get("/_dash-dependencies").get_json()
    (output,) = [d["output"] for d in dependencies if f"{alert_id}.children" in d["output"]]
    return output.count("...") + 1


@pytest.mark.parametrize("module_name, name, alert_id, args", background_jobs())
def test_long_job_over_the_limit_shows_an_alert(
    memlens_app, cache_dir, monkeypatch, module_name, name, alert_id, args
):
    import importlib

    monkeypatch.setenv("MEMLENS_MAX_JOBS_PER_USER", "1")
    job = getattr(importlib.import_module(module_name), name)
    progress = []

    with jobs.job_slot(LOCAL_OWNER):  # this user's one job is running
        result = job(progress.append, *args)

    assert len(result) == output_count(memlens_app.app, alert_id)
    *others, message, is_open = result
    assert is_open is True
    assert message.startswith("You already have 1 job running")
    assert all(value is no_update for value in others)
    assert progress == []  # refused before any work
