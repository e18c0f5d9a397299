"""gunicorn's settings for ``gunicorn app:server``: the same as ``python app.py serve``.

gunicorn reads this file from the directory it starts in, or from ``-c gunicorn.conf.py``. The
address, the workers and everything else come from the ``MEMLENS_*`` variables (see the README's
settings table), through :func:`serving.gunicorn_options`.
"""

from serving import gunicorn_options

globals().update(gunicorn_options())
