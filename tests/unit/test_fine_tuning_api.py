"""The files and fine-tuning jobs API in-process, through the official openai client, with vLLM mocked.

No worker runs here (nothing trains): these tests cover uploads, validation, the status flow up to
``queued``, cancellation, errors and pagination. Training itself: test_fine_tuning_worker.py and the e2e tests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai import AsyncOpenAI

from access.store import KeyStore
from adapters import Registry
from gateway import Settings, create_app
from jobs.queue import JobStore
from tests.factories import chat_jsonl, preference_jsonl
from training.worker import pid_alive

BASE = "m"


def fake_vllm(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/models":
        return httpx.Response(200, json={"data": [{"id": BASE, "root": "/nowhere", "parent": None}]})
    return httpx.Response(404)


@asynccontextmanager
async def started(settings: Settings) -> AsyncIterator[FastAPI]:
    """A gateway app with its lifespan run, in front of the mocked vLLM."""
    app = create_app(settings, transport=httpx.MockTransport(fake_vllm))
    async with app.router.lifespan_context(app):
        yield app


@asynccontextmanager
async def openai_client(app: FastAPI) -> AsyncIterator[AsyncOpenAI]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gateway")
    async with AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0) as c:
        yield c


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[FastAPI]:
    async with started(
        Settings(data_dir=tmp_path, base_model=BASE, health_interval_s=3600, fine_tuning_workers=0)
    ) as app:
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[AsyncOpenAI]:
    async with openai_client(app) as c:
        yield c


async def upload(client: AsyncOpenAI, content: bytes, name: str = "train.jsonl") -> str:
    return (await client.files.create(file=(name, content), purpose="fine-tune")).id


async def validated(app: FastAPI, client: AsyncOpenAI, job_id: str) -> str:
    await app.state.fine_tuning.validations_done()
    return (await client.fine_tuning.jobs.retrieve(job_id)).status


async def test_file_round_trip(client: AsyncOpenAI) -> None:
    content = chat_jsonl(16)
    created = await client.files.create(file=("train.jsonl", content), purpose="fine-tune")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.filename, created.bytes, created.purpose) == ("train.jsonl", len(content), "fine-tune")
    assert [f.id for f in (await client.files.list()).data] == [created.id]
    assert (await client.files.retrieve(created.id)).bytes == len(content)
    assert (await client.files.content(created.id)).content == content
    assert (await client.files.delete(created.id)).deleted is True
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)


async def test_bad_file_is_400_naming_each_bad_line_and_nothing_is_stored(
    client: AsyncOpenAI, app: FastAPI, tmp_path: Path
) -> None:
    good = chat_jsonl(3).decode().splitlines()
    no_reply = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
    content = "\n".join([good[0], good[1], "{not json", good[2], no_reply]).encode()
    with pytest.raises(openai.BadRequestError) as caught:
        await upload(client, content, "my-data.jsonl")
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "file" and error["code"] == "invalid_training_data"
    assert "my-data.jsonl:3: bad JSON" in error["message"]
    assert "my-data.jsonl:5: the last message is from the user" in error["message"]
    assert str(tmp_path) not in error["message"], "the client sees its own file name, not where it was staged"
    assert (await client.files.list()).data == []
    stored = app.state.fine_tuning.jobs.files.root
    assert [p for p in stored.rglob("*") if p.is_file()] == []


async def test_upload_needs_purpose_fine_tune_and_a_jsonl_name(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.files.create(file=("train.jsonl", chat_jsonl(2)), purpose="batch")
    assert caught.value.param == "purpose"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as caught:
        await upload(client, chat_jsonl(2), "train.txt")
    assert "unsupported file type '.txt'" in caught.value.message


async def test_job_moves_from_validating_files_to_queued_and_cancels(client: AsyncOpenAI, app: FastAPI) -> None:
    file_id = await upload(client, chat_jsonl(16))
    job = await client.fine_tuning.jobs.create(
        model=BASE,
        training_file=file_id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        suffix="triage",
        seed=7,
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "validating_files" and job.model == BASE and job.seed == 7
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (2, 4)
    assert job.hyperparameters.learning_rate_multiplier == 1.0, "auto resolves to the default"
    assert job.method is not None and job.method.type == "supervised"
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None

    assert await validated(app, client, job.id) == "queued"
    messages = [e.message for e in (await client.fine_tuning.jobs.list_events(job.id)).data]
    assert messages[0].startswith("Files validated (14 training, 2 validation examples)"), messages
    assert messages[-1] == f"Created fine-tuning job: {job.id}", "newest first"

    with pytest.raises(openai.ConflictError):
        await client.files.delete(file_id)  # a queued job still needs it

    cancelled = await client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    with pytest.raises(openai.ConflictError) as caught:
        await client.fine_tuning.jobs.cancel(job.id)
    assert "already cancelled" in caught.value.message
    assert (await client.files.delete(file_id)).deleted


async def test_data_that_training_would_refuse_fails_the_job_in_validation(client: AsyncOpenAI, app: FastAPI) -> None:
    file_id = await upload(client, chat_jsonl(1))
    job = await client.fine_tuning.jobs.create(model="base", training_file=file_id)
    assert await validated(app, client, job.id) == "failed"
    failed = await client.fine_tuning.jobs.retrieve(job.id)
    assert failed.error is not None and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file" and "too few" in failed.error.message
    assert failed.finished_at is not None


async def test_leakage_between_training_and_validation_files_fails_the_job(client: AsyncOpenAI, app: FastAPI) -> None:
    data = chat_jsonl(8)
    train, val = await upload(client, data), await upload(client, data, "val.jsonl")
    job = await client.fine_tuning.jobs.create(model=BASE, training_file=train, validation_file=val)
    assert await validated(app, client, job.id) == "failed"
    error = (await client.fine_tuning.jobs.retrieve(job.id)).error
    assert error is not None and "leakage" in error.message and val in error.message


async def test_create_refuses_what_cannot_train_with_a_clear_error(client: AsyncOpenAI) -> None:
    file_id = await upload(client, chat_jsonl(4))
    with pytest.raises(openai.NotFoundError) as missing:
        await client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=file_id)
    assert missing.value.code == "model_not_found" and f"answers to {BASE}, base" in missing.value.message  # type: ignore[attr-defined]

    cases = [
        ({"training_file": "file-nope"}, "training_file", "does not exist"),
        ({"method": {"type": "dpo"}}, "training_file", "preference pairs"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "'auto' or an integer from 1 to 50"),
        ({"suffix": "Has Space"}, "suffix", "invalid suffix"),
        ({"method": {"type": "reinforcement"}}, "method.type", "'supervised' or 'dpo'"),
    ]
    for change, param, words in cases:
        body = {"model": BASE, "training_file": file_id, **change}
        with pytest.raises(openai.BadRequestError) as caught:
            await client.fine_tuning.jobs.create(**body)  # type: ignore[arg-type]
        assert caught.value.param == param, (change, caught.value.body)  # type: ignore[attr-defined]
        assert words in caught.value.message, (change, caught.value.message)
    assert (await client.fine_tuning.jobs.list()).data == [], "nothing was created"


async def test_jobs_list_newest_first_in_pages(client: AsyncOpenAI) -> None:
    file_id = await upload(client, chat_jsonl(8))
    ids = [(await client.fine_tuning.jobs.create(model=BASE, training_file=file_id)).id for _ in range(3)]
    first = await client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[:0:-1] and first.has_more
    rest = await client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in rest.data] == ids[:1] and not rest.has_more
    assert [j.id async for j in client.fine_tuning.jobs.list(limit=1)] == ids[::-1], "the client pages through"
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("ftjob-nope")
    other = (await client.fine_tuning.jobs.list_events(ids[0])).data[0].id
    with pytest.raises(openai.NotFoundError) as caught:
        await client.fine_tuning.jobs.list_events(ids[1], after=other)
    assert caught.value.body["param"] == "after", "a cursor from another job's events is refused"  # type: ignore[index]


async def test_a_dpo_job_takes_preference_pairs_and_beta(client: AsyncOpenAI, app: FastAPI) -> None:
    pairs = await upload(client, preference_jsonl(8), "pairs.jsonl")
    job = await client.fine_tuning.jobs.create(
        model=BASE, training_file=pairs, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25}}}
    )
    assert job.method is not None and job.method.type == "dpo" and job.method.dpo is not None
    assert job.method.dpo.hyperparameters is not None and job.method.dpo.hyperparameters.beta == 0.25
    assert await validated(app, client, job.id) == "queued"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.fine_tuning.jobs.create(model=BASE, training_file=pairs)
    assert "preference pairs, which train with method type 'dpo'" in caught.value.message


async def test_a_job_read_as_succeeded_sees_what_the_worker_pushed(tmp_path: Path) -> None:
    # The worker pushes from another process; the gateway's poll for outside writes is made slow here, so only
    # the job read itself can make the pushed version visible to the client's next request.
    settings = Settings(
        data_dir=tmp_path, base_model=BASE, health_interval_s=3600, registry_refresh_s=3600, fine_tuning_workers=0
    )
    async with started(settings) as app, openai_client(app) as client:
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=await upload(client, chat_jsonl(16)))
        assert await validated(app, client, job.id) == "queued"
        view = app.state.gateway.registry
        elsewhere = Registry.open(settings.registry_url, settings.adapter_store)
        jobs = JobStore.open(settings.registry_url, settings.data_dir)
        try:
            assert jobs.claim("worker:1") is not None
            # Stands in for the push: any write moves the revision.
            KeyStore(elsewhere.database).create_key("acme", ["inference"])
            jobs.succeed(job.id, "worker:1", fine_tuned_model="ft:m::x", trained_tokens=1, result_files=[])
            assert view.catalog.revision < elsewhere.revision()
            assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "succeeded"
            assert view.catalog.revision == elsewhere.revision()
        finally:
            jobs.close()
            elsewhere.close()


async def test_the_gateway_runs_its_workers_and_stops_them_with_it(tmp_path: Path, tiny_base: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, base_model=BASE, base_model_path=tiny_base, health_interval_s=3600, fine_tuning_workers=2
    )
    async with started(settings) as app:
        pids = app.state.fine_tuning.workers.pids
        assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)
    assert not any(pid_alive(pid) for pid in pids), "stopped with the gateway"
