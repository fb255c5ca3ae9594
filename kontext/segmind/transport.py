"""HTTP for the Segmind client: one request, its body read within a byte limit (a long result
into a temporary file), transport failures and error answers turned into typed errors — wrapped in
:class:`~kontext.segmind.retry.Retryable` where repeating is free (the table in
:mod:`kontext.segmind.retry`). The API key is sent only to the API's own hosts and never appears
in a detail or a log line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from kontext.errors import ApiBadResponse, ApiConnectionError, ApiError, ApiTimeout
from kontext.segmind.errors import error_for_status
from kontext.segmind.parsing import error_message, retry_after_from_headers, trim
from kontext.segmind.retry import Retryable, repeat_is_free
from kontext.spool import SPOOL_BYTES, ResultFile

log = logging.getLogger("kontext.segmind")


@dataclass
class Answer:
    """One HTTP answer, fully read: into ``body``, or (a long 200 read with ``spool=True``) into
    ``file``, with ``body`` then holding the file's first bytes only."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    elapsed_s: float
    url: str
    file: ResultFile | None = None

    @property
    def size(self) -> int:
        return self.file.size if self.file is not None else len(self.body)


class Transport:
    """Requests to the API (and result downloads) over a caller-owned session.

    ``timeout`` bounds one generation request, ``short_timeout`` one v2 status/response GET;
    ``max_image_bytes`` caps every body read.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        api_key: str,
        base_url: str,
        timeout_s: float,
        max_image_bytes: int,
    ) -> None:
        self._session = session
        self._api_key = api_key
        self._base_origin = URL(base_url).origin()
        self.max_image_bytes = int(max_image_bytes)
        connect = min(10.0, timeout_s)
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect)
        self.short_timeout = aiohttp.ClientTimeout(total=min(timeout_s, 30.0), sock_connect=connect)

    def parse_json(self, answer: Answer, label: str, *, charged_maybe: bool = False) -> Any:
        """The answer's JSON body; not JSON is an :class:`ApiBadResponse`."""
        try:
            return json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            raise ApiBadResponse(
                self.detail(label, answer.status, "not JSON: " + error_message(answer.body),
                            answer.headers.get("x-request-id")),
                status=answer.status, charged_maybe=charged_maybe,
            ) from None

    async def checked(
        self, pending: Awaitable[Answer], label: str, *, idempotent: bool = False
    ) -> Answer:
        """Await one request; a non-200 becomes its typed error (or a :class:`Retryable`)."""
        answer = await pending
        if answer.status == 200:
            return answer
        raise self.status_error(answer, label, idempotent=idempotent)

    def status_error(self, answer: Answer, label: str, *, idempotent: bool) -> Exception:
        """The typed error of a non-200 answer; wrapped in :class:`Retryable` when repeating is free
        (:func:`~kontext.segmind.retry.repeat_is_free`: 429/502/503 always; any 5xx for a GET)."""
        message = error_message(answer.body)
        rid = answer.headers.get("x-request-id")
        retry_after = retry_after_from_headers(answer.headers) if answer.status == 429 else None
        detail = self.detail(label, answer.status, message, rid)
        if retry_after is not None:
            detail += f"; retry after {retry_after:.1f}s"
        error = error_for_status(
            answer.status, detail, message=message, retry_after=retry_after,
            charged_maybe=not idempotent,
        )
        if repeat_is_free(answer.status, idempotent=idempotent):
            return Retryable(error, retry_after if answer.status == 429 else None)
        return error

    def detail(self, label: str, status: int | None, message: str, request_id: str | None) -> str:
        """``label: HTTP status: message (request id …)``, trimmed, the key redacted."""
        parts = [label]
        if status is not None:
            parts.append(f"HTTP {status}")
        if message:
            parts.append(trim(message))
        text = ": ".join(parts)
        if request_id:
            text += f" (request id {trim(str(request_id), 100)})"
        return self.redact(text)

    def redact(self, text: str) -> str:
        """``text`` with the API key replaced by ``***``."""
        return text.replace(self._api_key, "***") if self._api_key else text

    # --- requests ------------------------------------------------------------------------------

    def sends_key(self, url: str) -> bool:
        """The key goes only to the API's own origin (or another https host of segmind.com)."""
        target = URL(url)
        if target.origin() == self._base_origin:
            return True
        host = (target.host or "").lower()
        return target.scheme == "https" and (host == "segmind.com" or host.endswith(".segmind.com"))

    async def request(
        self,
        method: str,
        url: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        idempotent: bool = False,
        timeout: aiohttp.ClientTimeout | None = None,
        spool: bool = False,
    ) -> Answer:
        """One HTTP request, body read in full (with ``spool``, a 200's body past
        :data:`~kontext.spool.SPOOL_BYTES` into a temporary file). Transport failures become
        typed errors; those where repeating is free are wrapped in :class:`Retryable`."""
        with_key = self.sends_key(url)
        headers = {"x-api-key": self._api_key, "Accept": "*/*"} if with_key else {"Accept": "*/*"}
        label = f"{method} {URL(url).path}"
        started = time.monotonic()
        try:
            return await self._exchange(
                method, url, json_body=json_body, headers=headers,
                timeout=timeout or self.timeout, label=label,
                started=started, spool=spool,
            )
        except ApiError:
            raise
        except (
            aiohttp.ClientConnectorCertificateError,
            aiohttp.ClientConnectorSSLError,
            aiohttp.ClientSSLError,
        ) as exc:
            raise ApiConnectionError(self.detail(label, None, f"TLS failure: {exc}", None)) from None
        except aiohttp.ClientConnectorError as exc:
            # Nothing was sent: free to repeat.
            raise Retryable(ApiConnectionError(
                self.detail(label, None, f"cannot connect: {exc}", None))) from None
        except aiohttp.ConnectionTimeoutError:
            raise Retryable(ApiConnectionError(
                self.detail(label, None, "connect timeout", None))) from None
        except TimeoutError:
            elapsed = time.monotonic() - started
            error: ApiError = ApiTimeout(
                self.detail(label, None, f"no answer within {elapsed:.1f}s", None),
                charged_maybe=not idempotent,
            )
            if idempotent:
                raise Retryable(error) from None
            raise error from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # Disconnected/reset after the request went out: the job may have run.
            error = ApiConnectionError(
                self.detail(label, None, f"connection broke after sending: "
                            f"{type(exc).__name__}: {exc}", None),
                charged_maybe=not idempotent,
            )
            if idempotent:
                raise Retryable(error) from None
            raise error from None
        except aiohttp.ClientError as exc:
            raise ApiConnectionError(
                self.detail(label, None, f"{type(exc).__name__}: {exc}", None),
                charged_maybe=not idempotent,
            ) from None

    async def _exchange(
        self, method: str, url: str, *, json_body: Mapping[str, Any] | None,
        headers: Mapping[str, str], timeout: aiohttp.ClientTimeout,
        label: str, started: float, spool: bool,
    ) -> Answer:
        """Send, read the answer; a spooled body's file is closed unless the answer is returned
        (a failure or a cancellation while the response is released). Redirects are never
        followed here: a redirect is the answer (result downloads follow one by hand, only to
        the API's own hosts: :mod:`kontext.segmind.calls`)."""
        body: bytes | ResultFile = b""
        try:
            async with self._session.request(
                method, url, json=json_body, headers=headers, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                body = await self._read_body(resp, label, spool=spool)
                elapsed = time.monotonic() - started
                headers_copy, status, where = resp.headers.copy(), resp.status, str(resp.url)
        except BaseException:
            if isinstance(body, ResultFile):
                body.close()
            raise
        if isinstance(body, ResultFile):
            return Answer(status, headers_copy, body.head, elapsed, where, body)
        return Answer(status, headers_copy, body, elapsed, where)

    async def _read_body(
        self, resp: aiohttp.ClientResponse, label: str, *, spool: bool = False
    ) -> bytes | ResultFile:
        """The body, never more than ``max_image_bytes``. With ``spool``, a 200's body longer
        than :data:`~kontext.spool.SPOOL_BYTES` is written to a :class:`ResultFile` chunk by
        chunk as it arrives (only ~64 KiB of it in memory at a time)."""
        limit = self.max_image_bytes
        length = resp.content_length
        if length is not None and length > limit:
            raise ApiBadResponse(
                self.detail(label, resp.status, f"body of {length} bytes is over {limit}", None),
                status=resp.status, charged_maybe=resp.status == 200,
            )
        encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
        spooling = spool and resp.status == 200
        if length is not None and encoding == "identity" and not (
            spooling and length > SPOOL_BYTES
        ):
            # aiohttp stops at Content-Length, and nothing is decompressed, so this cannot read
            # more than the limit; one read is several times cheaper than a loop of 64 KiB chunks
            # for a 1 MiB image. A compressed body is counted as it is inflated, below.
            return await resp.read()
        chunks: list[bytes] = []
        size = 0
        file: ResultFile | None = None
        try:
            if spooling and length is not None and length > SPOOL_BYTES:
                file = ResultFile()
            async for chunk in resp.content.iter_chunked(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise ApiBadResponse(
                        self.detail(label, resp.status, f"body over {limit} bytes", None),
                        status=resp.status, charged_maybe=resp.status == 200,
                    )
                if file is not None:
                    file.write(chunk)
                    continue
                chunks.append(chunk)
                if spooling and size > SPOOL_BYTES:  # no Content-Length, or compressed
                    file = ResultFile()
                    for held in chunks:
                        file.write(held)
                    chunks.clear()
        except BaseException:
            if file is not None:
                file.close()
            raise
        return file if file is not None else b"".join(chunks)

    def log_call(self, method: str, what: str, answer: Answer, *, attempts: int = 1) -> None:
        log.info(
            "segmind %s %s -> %d in %.2fs, request id %s, %d bytes%s",
            method, what, answer.status, answer.elapsed_s,
            answer.headers.get("x-request-id", "-"), answer.size,
            f", {attempts} attempts" if attempts > 1 else "",
        )
