"""A FastAPI app with pgsse mounted at /realtime: the README's FastAPI + SQLAlchemy recipe,
run by the tests under a plain ``uvicorn tests.python_host:app`` (DATABASE_URL from the
environment, as in production)."""

from __future__ import annotations

import os
from typing import Any

import pgsse
from fastapi import FastAPI, HTTPException
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

rt = pgsse.App()  # settings from the environment; keyword arguments override them
engine = create_async_engine(make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+asyncpg"))
Session = async_sessionmaker(engine)

app = FastAPI(lifespan=rt.lifespan)
app.mount("/realtime", rt)


@app.post("/bills/{bill_id}/pay")
async def pay(bill_id: int, fail: bool = False) -> dict[str, Any]:
    async with Session.begin() as session:  # commits when the block ends, rolls back on error
        await session.execute(text("UPDATE bills SET status = 'paid' WHERE id = :id"), {"id": bill_id})
        await pgsse.publish(session, f"bills/{bill_id}", "bill.status.changed",
                            {"id": bill_id, "status": "paid"})
        if fail:  # anything raised after publish: the event goes with the rollback
            raise HTTPException(409, "payment declined")
    return {"id": bill_id, "status": "paid"}


@app.get("/")
async def home() -> dict[str, str]:
    return {"app": "host"}
