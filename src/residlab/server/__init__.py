"""The model server, Live Chat and dashboard: ``residlab serve`` runs
:func:`residlab.server.app.create_app` under uvicorn.

Importing this package starts and imports nothing (no FastAPI): the static export of the
dashboard uses the data layer without the server's extra; the app factory takes its state
and settings.
"""
