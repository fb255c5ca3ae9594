"""The HTTP plumbing of the Discord emulator: one middleware that records every request,
applies planned delays and faults, checks the bot token and adds Discord's headers; and the
body reader (JSON or multipart with ``payload_json`` and ``files[n]``) every route shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import BodyPartReader, web

from .changes import Changes
from .config import Settings
from .faults import FaultRule, Faults, rate_limit_headers
from .models import API_PREFIX_RE, APIError, RequestRecord, UploadedFile, err, json_response

_FILES_FIELD_RE = re.compile(r"^files\[(\d+)\]$")
_RECORD_KEY: web.RequestKey[RequestRecord] = web.RequestKey("emu_record", RequestRecord)
_BODY_KEY: web.RequestKey[tuple[Any, list[UploadedFile]]] = web.RequestKey("emu_body", tuple)


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise APIError(400, 50109, "The request body contains invalid JSON.") from None


class Http:
    """The middleware of the emulator's aiohttp application, and the record of every request
    it answered (``requests``)."""

    def __init__(self, settings: Settings, faults: Faults, changes: Changes) -> None:
        self._settings = settings
        self._faults = faults
        self._changes = changes
        self.requests: list[RequestRecord] = []

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        record = RequestRecord(
            method=request.method, path=request.path, query=dict(request.query), time=time.time()
        )
        request[_RECORD_KEY] = record
        is_ws = request.path == "/gateway"
        fault = None
        if not is_ws:
            await self._faults.wait_delays(request.method, request.path)
            fault = self._faults.take(request.method, request.path)
        response: web.StreamResponse
        try:
            if fault is not None and not fault.process:
                with contextlib.suppress(Exception):
                    await read_body(request)
                self._drop_if(fault, request, record)
                raise fault.to_error()
            self._check_auth(request)
            response = await handler(request)
            if fault is not None:
                self._drop_if(fault, request, record)
                raise fault.to_error()
        except APIError as exc:
            headers = {"Via": "1.1 google", **exc.headers}
            response = json_response(exc.body(), exc.status, headers)
        if not is_ws and request.path.startswith("/api") and not response.prepared:
            response.headers.setdefault("Via", "1.1 google")
            if "X-RateLimit-Bucket" not in response.headers:
                response.headers.update(rate_limit_headers(request.method, request.path))
        record.status = response.status
        if not is_ws:
            self.requests.append(record)
            self._changes.notify()
        return response

    def _drop_if(self, fault: FaultRule, request: web.Request, record: RequestRecord) -> None:
        """A planned dropped connection: record the request (status 0: no answer), close
        its connection."""
        if not fault.drop:
            return
        record.status = 0
        self.requests.append(record)
        self._changes.notify()
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # the connection is gone: nothing to answer

    def _check_auth(self, request: web.Request) -> None:
        path = API_PREFIX_RE.sub("", request.path)
        if not request.path.startswith("/api") or path.startswith(("/webhooks/", "/interactions/")):
            return
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bot ") or (
            self._settings.token is not None and header[4:] != self._settings.token
        ):
            raise APIError(401, 0, "401: Unauthorized")


async def read_body(request: web.Request) -> tuple[Any, list[UploadedFile]]:
    """The request's JSON payload (or ``payload_json``) and its files, read once."""
    if _BODY_KEY in request:
        return request[_BODY_KEY]
    record = request[_RECORD_KEY]
    files: list[UploadedFile] = []
    payload: Any = None
    if request.content_type.startswith("multipart/"):
        reader = await request.multipart()
        position = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):  # a nested multipart: not Discord's
                continue
            raw = await part.read(decode=False)
            name = part.name or ""
            if part.filename is None and name == "payload_json":
                payload = _loads(bytes(raw))
            elif part.filename is not None:
                match = _FILES_FIELD_RE.match(name)
                index = int(match.group(1)) if match else position
                ctype = part.headers.get("Content-Type")
                files.append(UploadedFile(name, index, part.filename, bytes(raw), ctype))
                position += 1
    else:
        raw = await request.read()
        if raw:
            payload = _loads(raw)
    record.json = payload
    record.files = [
        {
            "field": f.field,
            "filename": f.filename,
            "size": f.size,
            "content_type": f.content_type,
        }
        for f in files
    ]
    request[_BODY_KEY] = (payload, files)
    return payload, files

async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object (``{}`` when empty); 400 when it is not an object."""
    payload, _ = await read_body(request)
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise APIError(
            400,
            50035,
            "Invalid Form Body",
            errors=err("MODEL_TYPE_CONVERT", "Expected an object."),
        )
    return payload
