"""MemLens app: ``python app.py`` (or ``python app.py run --host H --port P``) serves it.

``app`` and ``server`` are module-level so a WSGI server can import them (``app:server``).
"""

from __future__ import annotations

import argparse
import logging
import threading

import dash
import dash_bootstrap_components as dbc
from dash import Dash

import cli
import serving
from analysis.settings import get_settings
from components.alerts import APP_ALERT, make_error_alert, show_callback_error
from components.shell import load_figure_templates, make_app_stores, make_navbar

logger = logging.getLogger("memlens")

load_figure_templates()
# Long jobs run in local processes, or on Celery workers (`celery -A app:celery_app worker`)
# when MEMLENS_REDIS_URL is set.
background_manager, celery_app = serving.make_background_manager()
# Bootstrap comes from assets/ (no CDN): the app works offline.
app = Dash(
    __name__,
    use_pages=True,
    serve_locally=True,
    title="MemLens",
    background_callback_manager=background_manager,
    on_error=show_callback_error,  # what a callback still raises becomes an alert, not a 500
)
server = app.server
serving.enable_auth(app)
serving.identify_browsers(server)  # whose long job is whose, for MEMLENS_MAX_JOBS_PER_USER
serving.answer_bad_requests(server)  # 4xx, not 500, for requests no page makes
app.layout = dbc.Container(
    [
        make_navbar(list(dash.page_registry.values())),
        make_error_alert(APP_ALERT),
        *make_app_stores(),
        dash.page_container,
    ],
    fluid=True,
    class_name="pb-4",
)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (``run`` is the default command) and dispatch it."""
    parser = argparse.ArgumentParser(prog="app.py", description="MemLens web app")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="serve the app with Dash's server (default)")
    run.add_argument("--host", help="address to bind (MEMLENS_HOST)")
    run.add_argument("--port", type=int, help="port to listen on (MEMLENS_PORT)")
    run.set_defaults(handler=_run)
    serving.register(commands)
    cli.register(commands)
    args = parser.parse_args(argv)
    return (getattr(args, "handler", None) or _run)(args) or 0


def _run(args: argparse.Namespace) -> int:
    # Flags set the same variables as the environment, so every module sees one set of settings.
    serving.apply_flags(args)
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    threading.Thread(target=serving.warm_up, name="warm-up", daemon=True).start()
    print(f"MemLens at http://{settings.host}:{settings.port}/", flush=True)
    app.run(host=settings.host, port=settings.port, debug=settings.debug)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
