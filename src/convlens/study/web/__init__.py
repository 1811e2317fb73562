"""The study's web server: ``app`` (FastAPI application), ``api`` (JSON endpoints), ``pages`` (HTML pages
and the admin area), ``schemas`` (request models), ``security`` (CSRF, admin sign-in and sign-out, headers,
body limit), ``throttle`` (rate limits keyed per participant or address), ``settings`` (what the application
is built with) and ``server`` (``convlens study serve``: checked settings, uvicorn with one or more workers);
``templates/`` and ``static/``."""
