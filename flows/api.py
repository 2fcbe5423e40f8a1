"""A small HTTP endpoint over the fine-tuned model: the same answers as `realm ask --json`.

    realm serve-api [--host 127.0.0.1] [--port 8000]
    curl -s localhost:8000/health
    curl -s localhost:8000/ask -H 'content-type: application/json' \\
         -d '{"question": "who wrote the nutcracker ballet?", "top_k": 5}'

The model loads once, at start-up (before uvicorn binds, when `realm serve-api` passes it in, or
in the app's lifespan when given only a project root), and answers are serialised with a lock:
one CPU model, one question at a time. It binds 127.0.0.1 unless told otherwise (issue #6, 5).
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from realm_core.answer import Answer, Answerer
from realm_core.io import InputError


class AskRequest(BaseModel):
    question: str = Field(min_length=1, max_length=2000, description="the question, e.g. 'who wrote hamlet?'")
    top_k: int = Field(5, ge=1, le=100, description="how many retrieved blocks to return as evidence")


def create_app(answerer: Answerer | None = None, root: Path | None = None) -> FastAPI:
    """The FastAPI app; give a loaded `answerer`, or a project `root` to load it from at start-up."""
    if answerer is None and root is None:
        raise ValueError("give a loaded Answerer or the project root to load one from")
    lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.answerer = answerer if answerer is not None else Answerer.from_project(root)
        yield

    app = FastAPI(title="REALM question answering", lifespan=lifespan)

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
