"""An OpenAI-compatible HTTP server over one engine: ``tierlm serve`` (see server.py).

protocol.py    request/response schemas (pydantic)
async_engine.py  the engine thread and per-request async streams
metrics.py     Prometheus metrics, one registry per server
server.py      FastAPI routes, error mapping, SSE, ``serve()``

Importing this package imports nothing heavy; fastapi/uvicorn load with server.py.
"""
