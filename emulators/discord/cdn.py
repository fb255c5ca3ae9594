"""The emulated CDN: stored attachments behind signed, expiring URLs.

Every attachment URL carries Discord's ``ex``/``is``/``hm`` query (expiry, issue time, HMAC);
a URL answers 404 once it expired or once the test called
``DiscordEmulator.expire_attachment`` (which bumps the attachment's generation, so every URL
issued before stops working, as when Discord's CDN links go stale).
"""

from __future__ import annotations

import hashlib
import io
import math
import mimetypes
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web

from .changes import Changes
from .config import Address, Settings
from .ids import Snowflakes

_ATTACHMENT_PATH_RE = re.compile(r"/attachments/(\d+)/")


@dataclass
class StoredAttachment:
    id: int
    data: bytes
    filename: str
    content_type: str | None
    width: int | None = None
    height: int | None = None
    description: str | None = None
    ephemeral: bool = False
    generation: int = 0


def image_info(data: bytes) -> tuple[int, int, str | None] | None:
    """``(width, height, mime type)`` when Pillow can open ``data``, else None."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.width, img.height, Image.MIME.get(img.format or "")
    except Exception:
        return None


class Cdn:
    """Stores attachments, issues their signed URLs and serves them."""

    def __init__(
        self, settings: Settings, address: Address, snowflakes: Snowflakes, changes: Changes
    ) -> None:
        self._settings = settings
        self._address = address
        self._snowflakes = snowflakes
        self._changes = changes
        self.attachments: dict[int, StoredAttachment] = {}
        #: successful and refused downloads, by attachment id
        self.fetches: Counter[int] = Counter()
        self.fetch_failures: Counter[int] = Counter()

    def add_routes(self, app: web.Application) -> None:
        """Serve ``/attachments/...`` and ``/proxy/attachments/...``."""
        app.router.add_get("/attachments/{attachment_id:\\d+}/{filename}", self.serve)
        app.router.add_get("/proxy/attachments/{attachment_id:\\d+}/{filename}", self.serve)

    def _sign(self, att: StoredAttachment) -> str:
        issued = int(time.time())
        expires = issued + max(1, int(math.ceil(self._settings.attachment_ttl)))
        digest = hashlib.sha256(
            f"{self._settings.secret}:{att.id}:{att.generation}:{expires:x}:{issued:x}".encode()
        ).hexdigest()
        return f"ex={expires:x}&is={issued:x}&hm={digest}&"

    def _url_valid(self, att: StoredAttachment, query: Mapping[str, str]) -> bool:
        try:
            expires = int(query["ex"], 16)
            issued = int(query["is"], 16)
            digest = query["hm"]
        except (KeyError, ValueError):
            return False
        expected = hashlib.sha256(
            f"{self._settings.secret}:{att.id}:{att.generation}:{expires:x}:{issued:x}".encode()
        ).hexdigest()
        return digest == expected and time.time() <= expires

    def payload(self, att: StoredAttachment) -> dict[str, Any]:
        query = self._sign(att)
        name = quote(att.filename)
        payload: dict[str, Any] = {
            "id": str(att.id),
            "filename": att.filename,
            "size": len(att.data),
            "url": f"{self._address.base_url}/attachments/{att.id}/{name}?{query}",
            "proxy_url": f"{self._address.base_url}/proxy/attachments/{att.id}/{name}?{query}",
            "flags": 0,
        }
        if att.content_type is not None:
            payload["content_type"] = att.content_type
        if att.width is not None:
            payload["width"] = att.width
            payload["height"] = att.height
        if att.description is not None:
            payload["description"] = att.description
        if att.ephemeral:
            payload["ephemeral"] = True
        return payload

    def store(
        self,
        data: bytes,
        filename: str,
        content_type: str | None,
        *,
        sniff: bool,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> StoredAttachment:
        info = image_info(data)
        if sniff:
            if info is not None and info[2]:
                content_type = info[2]
            elif content_type in (None, "", "application/octet-stream"):
                content_type = mimetypes.guess_type(filename)[0] or content_type or None
        att = StoredAttachment(
            id=self._snowflakes.next(),
            data=bytes(data),
            filename=filename.replace(" ", "_") or "unknown",
            content_type=content_type,
            width=info[0] if info else None,
            height=info[1] if info else None,
            description=description,
            ephemeral=ephemeral,
        )
        self.attachments[att.id] = att
        return att

    def add(
        self, data: bytes, filename: str = "image.png", content_type: str | None = "auto"
    ) -> dict[str, Any]:
        """Store bytes as an uploaded attachment and return its Discord attachment object.

        ``content_type="auto"`` sniffs it (Pillow, then the file extension); ``None`` leaves
        the field out (Discord may omit it); any other string is used as given.
        """
        sniff = content_type == "auto"
        att = self.store(data, filename, None if sniff else content_type, sniff=sniff)
        return self.payload(att)

    def attachment_id(self, ref: Any) -> int:
        if isinstance(ref, Mapping):
            return int(ref["id"])
        if isinstance(ref, str):
            match = _ATTACHMENT_PATH_RE.search(ref)
            if match is None:
                raise LookupError(f"not an emulator attachment URL: {ref}")
            return int(match.group(1))
        return int(ref)

    def data(self, ref: Mapping[str, Any] | str | int) -> bytes:
        """The bytes of an attachment (dict, URL or id)."""
        return self.attachments[self.attachment_id(ref)].data

    def expire(self, ref: Mapping[str, Any] | str | int) -> None:
        """Make every URL issued so far for this attachment answer 404 (CDN expiry)."""
        self.attachments[self.attachment_id(ref)].generation += 1

    def fresh(self, ref: Mapping[str, Any] | str | int) -> dict[str, Any]:
        """A new attachment object (fresh signed URLs), like a fresh fetch of the message."""
        return self.payload(self.attachments[self.attachment_id(ref)])

    def refresh_message_urls(self, message: dict[str, Any]) -> None:
        for i, att in enumerate(message.get("attachments", [])):
            stored = self.attachments.get(int(att["id"]))
            if stored is not None:
                message["attachments"][i] = self.payload(stored)

    async def serve(self, request: web.Request) -> web.Response:
        aid = int(request.match_info["attachment_id"])
        att = self.attachments.get(aid)
        if att is None or not self._url_valid(att, request.query):
            self.fetch_failures[aid] += 1
            self._changes.notify()
            return web.Response(status=404, text="This content is no longer available.")
        self.fetches[aid] += 1
        self._changes.notify()
        return web.Response(
            body=att.data, headers={"Content-Type": att.content_type or "application/octet-stream"}
        )
