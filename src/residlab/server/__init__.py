"""The model server and Live Chat: ``residlab serve`` runs :func:`create_app` under uvicorn.

Importing this package starts nothing; the app factory takes its state and settings.
"""

from __future__ import annotations

from residlab.server.app import create_app
from residlab.server.state import ServerState

__all__ = ["ServerState", "create_app"]
