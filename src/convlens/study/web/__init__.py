"""The study's web server: ``app`` (FastAPI application), ``api`` (JSON endpoints), ``pages`` (HTML pages
and the admin area), ``schemas`` (request models), ``security`` (CSRF, admin sign-in, rate-limit keys,
headers, body limit) and ``server`` (uvicorn with one or more workers); ``templates/`` and ``static/``."""
