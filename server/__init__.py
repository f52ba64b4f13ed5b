"""tokserve server: FastAPI API, queue backends, batching engine, metrics. Build the app with
:func:`server.app.create_app`; run it with ``python -m server`` (or ``tokserve serve``)."""
