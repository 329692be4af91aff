"""The HTTP front door: the OpenAI-compatible API (FastAPI + uvicorn).

    app.py          create_app: routes, thin over the serving layer
    completions.py  OpenAI request → engine request → OpenAI response (JSON or SSE)
    schemas.py      request and response bodies (pydantic), all in one place
    errors.py       one error shape for every 4xx/5xx
    middleware.py   request context, auth, body limits, access log (pure ASGI)
    guard.py        Host and Origin allowlists, CORS preflight (DNS rebinding, cross-site)
    body.py         application/json only; JSON Python can carry (400, never 500)
    auth.py         API key or JWT bearer token (PyJWT), who the caller is
    metrics.py      Prometheus metrics of the daemon
    accesslog.py    the JSON-lines access and audit log

May import: serving, offload (the client the dispatcher is handed), model, bundle, config,
errors. Nothing imports api except cli.py and the fleet agent inside the daemon (its
metrics); the cloud worker reads only schemas.py, so this file imports nothing: importing
`edge_runtime.api.schemas` must not load FastAPI.
"""
