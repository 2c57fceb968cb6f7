"""The HTTP service: a finished run behind FastAPI, started by ``crosstower serve DIR``.

``POST /recommend`` takes ``{"user_id": ID, "k": 10}`` or ``{"history": [ITEM_ID, ...], "k": 10}``
(ids as JSON strings or whole numbers; ``"exclude_seen": false`` keeps the history's items), or a
batch ``{"requests": [...]}``, and answers through :class:`~crosstower.recommend.Retriever`, so
an answer equals ``crosstower recommend`` and the run's index search. ``GET /health`` says the
service is up, ``GET /info`` what it serves (model, data set, index, the run's metrics);
``/docs`` is the OpenAPI page FastAPI writes.

Bad requests get a 4xx JSON answer ``{"error": "..."}`` naming what is wrong: 400 for a body
that is not JSON, 404 for ids the data set does not hold, 422 for a body that does not fit the
schema (k below 1 or above the catalogue, an empty batch, an unknown key). Any other failure
is a 500 with the same shape; none stops the service.
"""

from __future__ import annotations

import logging
import threading
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag, model_validator

from crosstower.errors import first_error_line
from crosstower.recommend import Recommendation, RequestError, Retriever, UnknownIdError

log = logging.getLogger("crosstower.serve")

RawId = StrictStr | StrictInt


class RecommendRequest(BaseModel):
    """One user by id, or one history of item ids (oldest first) for a user the run has not seen."""

    model_config = ConfigDict(extra="forbid")
    user_id: RawId | None = None
    history: list[RawId] | None = None
    k: Annotated[int, Field(ge=1)] = 10
    exclude_seen: bool = True

    @model_validator(mode="after")
    def _one_of_user_or_history(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give either user_id or history")
        return self


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: Annotated[list[RecommendRequest], Field(min_length=1)]


def _request_kind(body: Any) -> str:
    return "batch" if isinstance(body, dict) and "requests" in body else "single"


# A body with "requests" is a batch, any other a single request: the union is decided by the
# body, so a bad request is reported against the one schema it was meant for.
AnyRequest = Annotated[Annotated[RecommendRequest, Tag("single")] | Annotated[BatchRequest, Tag("batch")],
                       Discriminator(_request_kind)]


class Recommended(BaseModel):
    user_id: RawId | None = Field(description="the user asked for; null for a history")
    items: list[RawId] = Field(description="item ids, best first")
    scores: list[float] = Field(description="the model's scores, higher is better")


class RecommendResponse(Recommended):
    served_by: str


class BatchResponse(BaseModel):
    served_by: str
    results: list[Recommended]


def create_app(retriever: Retriever) -> FastAPI:
    """The service's FastAPI application over ``retriever``."""
    info = retriever.describe()
    app = FastAPI(title="crosstower", description=f"{info['model']} on {info['dataset']}, served by {info['served_by']}")
    # Requests are answered one at a time: a history request briefly overrides the model's user
    # fields (crosstower.nn.fields.row_values), which concurrent requests must not see.
    lock = threading.Lock()

    def answer(request: RecommendRequest) -> Recommendation:
        with lock:
            if request.user_id is not None:
                return retriever.recommend(users=[request.user_id], k=request.k, exclude_seen=request.exclude_seen)[0]
            return retriever.recommend(histories=[request.history], k=request.k, exclude_seen=request.exclude_seen)[0]

    @app.post("/recommend", response_model=RecommendResponse | BatchResponse)
    def recommend(body: AnyRequest) -> dict[str, Any]:
        if isinstance(body, BatchRequest):
            return {"served_by": retriever.served_by, "results": [answer(r).as_dict() for r in body.requests]}
        return {"served_by": retriever.served_by, **answer(body).as_dict()}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def describe() -> dict[str, Any]:
        return info

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return _error(400, "the body is not valid JSON")
        return _error(422, _first_problem(problems))

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return _error(404 if isinstance(error, UnknownIdError) else 422, str(error))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _first_problem(problems: list[dict]) -> str:
    """FastAPI's validation problems as one line, like the config's: ``requests.0.k: ...``
    (the ``body`` prefix and the union's tags left out)."""

    class _Problems:
        def errors(self) -> list[dict]:
            return [{**p, "loc": [part for part in p["loc"] if part not in ("body", "single", "batch")]}
                    for p in problems]

    return first_error_line(_Problems())


def serve(run_dir: Any, host: str = "127.0.0.1", port: int = 8000, data_dir: Any = None,
          threads: int | None = None, eager: bool = False) -> None:
    """Open ``run_dir`` and serve it until interrupted (uvicorn's Ctrl-C / SIGTERM handling);
    ``threads`` torch threads score (default: the run's ``train.threads``). Known users' queries
    go through the compiled query side (:meth:`Retriever.compile`) unless ``eager``."""
    import torch
    import uvicorn

    from crosstower.recommend import load_run

    retriever = load_run(run_dir, data_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    if not eager and retriever.compile():
        log.info("queries of known users run as an ONNX graph in onnxruntime (--eager: in PyTorch)")
    app = create_app(retriever)
    log.info("serving %s on http://%s:%d (OpenAPI docs at /docs)", run_dir, host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
