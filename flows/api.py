"""A small HTTP endpoint over the fine-tuned model: the same answers as `realm ask --json`.

    realm serve-api [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/health
    curl -s localhost:8000/ask -H 'content-type: application/json' \\
         -d '{"question": "who wrote the nutcracker ballet?", "top_k": 5}'

The model loads once, at start-up (before uvicorn binds, when `realm serve-api` passes it in, or
in the app's lifespan when given only a project root), and answers are serialised with a lock:
one CPU model, one question at a time. It binds 127.0.0.1 unless told otherwise (issue #6, 5).

Limits: a request body over MAX_BODY_BYTES (64 kB) gets 413 before it is read (by its
Content-Length, or as soon as a chunked body passes the limit); a question may have at most
MAX_QUESTION_CHARS (2,000) characters and top_k at most 100. A 422 names the field and the rule
broken, never the input itself, so a huge request is not echoed back.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from realm_core.answer import MAX_QUESTION_CHARS, Answer, Answerer
from realm_core.io import InputError

MAX_BODY_BYTES = 64 * 1024


class AskRequest(BaseModel):
    question: str = Field(
        min_length=1, max_length=MAX_QUESTION_CHARS, description="the question, e.g. 'who wrote hamlet?'"
    )
    top_k: int = Field(5, ge=1, le=100, description="how many retrieved blocks to return as evidence")


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, without reading or echoing it."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit
        self.message = f'request body over {limit:,} bytes; send one JSON object {{"question": ..., "top_k": ...}} with a question of at most {MAX_QUESTION_CHARS:,} characters'

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await JSONResponse({"detail": self.message}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:  # a chunked body has no Content-Length: count what arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise StarletteHTTPException(
                    status_code=413, detail=self.message
                )  # FastAPI re-raises it from body parsing
            return message

        await self.app(scope, limited, send)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with each error's field, type and message, but not the input (FastAPI's default echoes it)."""
    errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
    return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)


def create_app(
    answerer: Answerer | None = None, root: Path | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI app; give a loaded `answerer`, or a project `root` to load it from at start-up."""
    if answerer is None and root is None:
        raise ValueError("give a loaded Answerer or the project root to load one from")
    lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.answerer = answerer if answerer is not None else Answerer.from_project(root)
        yield

    app = FastAPI(title="REALM question answering", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_exception_handler(RequestValidationError, validation_error)

    @app.get("/health")
    def health() -> dict:
        loaded: Answerer = app.state.answerer
        return {"status": "ok", "blocks": len(loaded.model.store), "reader_top_k": loaded.reader_top_k}

    @app.post("/ask", response_model=Answer)
    def ask(request: AskRequest) -> dict:
        """The answer span, its score, and the top retrieved blocks with f(x, z) and p(z|x)."""
        try:
            with lock:
                return app.state.answerer(request.question, request.top_k).to_dict()
        except InputError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None

    return app
