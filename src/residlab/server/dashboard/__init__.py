"""The dashboard's data layer: the read-only answers of ``GET /api/data/{endpoint}``, the
router that serves them, and the static export.

Modules, in dependency order (each imports only those before it; nothing here is imported by
this package file, so importing one module pulls in only what it needs):

- ``files``: names resolved through folder listings, the parsed-file cache, query parameters,
  command hints (``DashboardFiles``, ``Params``, ``Where``, ``canonical_key``, ``b64``).
- the areas, one per view, each registering ``HANDLERS`` (and ``export_keys``):
  ``projections`` (projection files, shared), ``inference``, ``spans``, ``deepdive`` (lens,
  attention), ``keys`` (part 1's export keys), ``extraction``, ``steering``, ``analysis``,
  ``diff_spans``, ``noising``, ``overview``.
- ``data``: ``DashboardData``, the dispatch table built from the areas (no area imports it).
- ``api`` (the FastAPI router), ``bundle`` (the page's modules as one script) and ``export``
  (``residlab dashboard export``).
"""
