"""REST routes of interactions: the callback (``POST /interactions/{id}/{token}/callback``)
and the interaction webhook (follow-ups, and ``GET``/``PATCH``/``DELETE`` of ``@original`` and
follow-up messages).

Discord's rules are kept: one callback per interaction, only the callback types the
interaction's type allows, within ``response_deadline``; webhook calls only while the token
lives (``token_ttl``). Every refused request is added to the interaction's ``rejected`` list.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .changes import Changes
from .config import Settings
from .http import read_body
from .interactions import Interactions
from .messages import MessageStore, check_upload, resolve_embeds
from .models import (
    EPHEMERAL,
    IS_COMPONENTS_V2,
    LOADING,
    SUPPRESS_EMBEDS,
    SUPPRESS_NOTIFICATIONS,
    APIError,
    InteractionRecord,
    UploadedFile,
    err,
    json_response,
    now_iso,
)
from .validation import validate_message, validate_modal

#: told of each follow-up message once it is stored, before the bot gets its answer
FollowupObserver = Callable[[InteractionRecord, dict[str, Any]], None]


class InteractionRoutes:
    """The callback and webhook routes of interactions."""

    def __init__(
        self,
        settings: Settings,
        interactions: Interactions,
        messages: MessageStore,
        changes: Changes,
        followup_created: FollowupObserver,
    ) -> None:
        self._settings = settings
        self._interactions = interactions
        self._messages = messages
        self._changes = changes
        self._followup_created = followup_created

    def add_routes(self, app: web.Application, api: str) -> None:
        """Register the routes under the API prefix ``api``."""
        r = app.router
        r.add_post(api + "/interactions/{interaction_id:\\d+}/{token}/callback", self.callback)
        message = api + "/webhooks/{app_id:\\d+}/{token}/messages/{message_id}"
        r.add_post(api + "/webhooks/{app_id:\\d+}/{token}", self.followup)
        r.add_get(message, self.get_message)
        r.add_patch(message, self.edit_message)
        r.add_delete(message, self.delete_message)

    def _reject(self, rec: InteractionRecord | None, route: str, exc: APIError) -> APIError:
        if rec is not None:
            rec.rejected.append(
                {"route": route, "status": exc.status, "code": exc.code, "message": exc.message}
            )
            self._changes.notify()
        return exc

    async def callback(self, request: web.Request) -> web.Response:
        rec = self._interactions.get(int(request.match_info["interaction_id"]))
        if rec is not None and rec.token != request.match_info["token"]:
            rec = None
        payload, files = await read_body(request)
        try:
            return self._callback(request, rec, payload, files)
        except APIError as exc:
            raise self._reject(rec, "callback", exc) from None

    def _callback(
        self,
        request: web.Request,
        rec: InteractionRecord | None,
        payload: Any,
        files: list[UploadedFile],
    ) -> web.Response:
        # No awaits in here: check-and-acknowledge is atomic for concurrent clients.
        if rec is None or rec.token_expired():
            raise APIError(404, 10062, "Unknown interaction")
        if (
            self._settings.response_deadline is not None
            and time.monotonic() - rec.created_at > self._settings.response_deadline
        ):
            raise APIError(404, 10062, "Unknown interaction")
        if rec.acknowledged:
            raise APIError(400, 40060, "Interaction has already been acknowledged.")
        if not isinstance(payload, dict):
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={"type": err("BASE_TYPE_REQUIRED", "This field is required")},
            )
        cb_type = payload.get("type")
        data = payload.get("data") or {}
        check_upload(files, rec.attachment_size_limit)
        allowed = {
            2: {4, 5, 9},
            3: {4, 5, 6, 7, 9},
            4: {8},
            5: {4, 5, 6, 7},
        }[rec.type]
        if rec.type in (3, 5) and rec.message_id is None:
            allowed -= {6, 7}
        if cb_type not in allowed:
            raise APIError(
                400,
                50035,
                "Invalid Form Body",
                errors={
                    "type": err(
                        "INTERACTION_CALLBACK_TYPE_INVALID",
                        f"Callback type {cb_type} is not valid for this interaction",
                    )
                },
            )
        msg: dict[str, Any] | None = None
        flags = int(data.get("flags") or 0)
        if cb_type == 4:
            validate_message(data, files, require_content=True)
            msg_type = 0 if rec.type != 2 else (23 if rec.data.get("type", 1) != 1 else 20)
            msg = self._messages.create_from_body(
                rec.channel_id,
                data,
                files,
                flags=flags
                & (EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2),
                msg_type=msg_type,
                interaction=rec,
            )
            rec.original = msg
        elif cb_type == 5:
            msg_type = 0 if rec.type != 2 else (23 if rec.data.get("type", 1) != 1 else 20)
            msg = self._messages.make_message(
                rec.channel_id,
                author=self._messages.bot_user,
                flags=(flags & EPHEMERAL) | LOADING,
                msg_type=msg_type,
                interaction=rec,
            )
            rec.original = msg
        elif cb_type == 6:
            rec.original = self._messages.get(rec.message_id or 0)
        elif cb_type == 7:
            target = self._messages.get(rec.message_id or 0)
            if target is None:
                raise APIError(404, 10008, "Unknown Message")
            validate_message(data, files, require_content=False)
            self._messages.edit_from_body(target, data, files)
            rec.original = msg = target
        elif cb_type == 8:
            rec.autocomplete_choices = list(data.get("choices") or [])
        elif cb_type == 9:
            validate_modal(data)
            rec.modal = copy.deepcopy(data)
        rec.responses.append(payload)
        self._changes.notify()
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        answer: dict[str, Any] = {
            "interaction": {
                "id": str(rec.id),
                "type": rec.type,
                "response_message_loading": cb_type == 5,
                "response_message_ephemeral": bool(msg and msg["flags"] & EPHEMERAL),
            }
        }
        if msg is not None:
            answer["interaction"]["response_message_id"] = msg["id"]
        if cb_type in (4, 5, 7) and msg is not None:
            answer["resource"] = {"type": cb_type, "message": msg}
        elif cb_type == 6:
            answer["resource"] = {"type": 6}
        return json_response(answer)

    def _webhook_rec(self, request: web.Request) -> InteractionRecord:
        rec = self._interactions.by_token(request.match_info["token"])
        if rec is None or int(request.match_info["app_id"]) != self._settings.application_id:
            raise APIError(404, 10015, "Unknown Webhook")
        if rec.token_expired():
            raise self._reject(rec, "webhook", APIError(401, 50027, "Invalid Webhook Token"))
        return rec

    def _webhook_message(self, rec: InteractionRecord, message_id: str) -> dict[str, Any]:
        if message_id == "@original":
            if rec.original is None or rec.original_deleted:
                raise APIError(404, 10008, "Unknown Message")
            return rec.original
        for msg in rec.messages():
            if msg["id"] == message_id and self._messages.get(int(message_id)) is not None:
                return msg
        raise APIError(404, 10008, "Unknown Message")

    async def followup(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        body, files = await read_body(request)
        try:
            if not rec.acknowledged:
                raise APIError(404, 10015, "Unknown Webhook")
            if not isinstance(body, dict):
                raise APIError(400, 50006, "Cannot send an empty message")
            check_upload(files, rec.attachment_size_limit)
            validate_message(body, files, require_content=True)
        except APIError as exc:
            raise self._reject(rec, "followup", exc) from None
        flags = int(body.get("flags") or 0)
        original = rec.original
        if (
            rec.response_type == 5
            and original is not None
            and original["flags"] & LOADING
            and not rec.original_deleted
        ):
            # The first followup after a "thinking" defer replaces the placeholder; its
            # ephemeral state is the one chosen at defer time.
            original["content"] = str(body.get("content") or "")
            original["components"] = copy.deepcopy(body.get("components") or [])
            original["attachments"] = self._messages.uploaded_attachments(
                body, files, ephemeral=bool(original["flags"] & EPHEMERAL)
            )
            original["embeds"] = resolve_embeds(body.get("embeds") or [], original["attachments"])
            original["flags"] = (original["flags"] & EPHEMERAL) | (
                flags & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
            )
            original["timestamp"] = now_iso()
            msg = original
        else:
            msg = self._messages.create_from_body(
                rec.channel_id,
                body,
                files,
                flags=flags
                & (EPHEMERAL | SUPPRESS_EMBEDS | SUPPRESS_NOTIFICATIONS | IS_COMPONENTS_V2),
                interaction=rec,
            )
        rec.followups.append(msg)
        self._changes.notify()
        self._followup_created(rec, msg)
        if request.query.get("wait") in ("1", "true", "True"):
            return json_response(msg)
        return web.Response(status=204)

    async def get_message(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        msg = self._webhook_message(rec, request.match_info["message_id"])
        self._messages.refresh_urls(msg)
        return json_response(msg)

    async def edit_message(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        message_id = request.match_info["message_id"]
        body, files = await read_body(request)
        try:
            msg = self._webhook_message(rec, message_id)
            if not isinstance(body, dict):
                body = {}
            check_upload(files, rec.attachment_size_limit)
            validate_message(body, files, require_content=False)
        except APIError as exc:
            raise self._reject(rec, "edit", exc) from None
        self._messages.edit_from_body(msg, body, files)
        if message_id == "@original":
            rec.edits.append(body)
        rec.message_edits.append((int(msg["id"]), body))
        self._changes.notify()
        return json_response(msg)

    async def delete_message(self, request: web.Request) -> web.Response:
        rec = self._webhook_rec(request)
        message_id = request.match_info["message_id"]
        try:
            msg = self._webhook_message(rec, message_id)
        except APIError as exc:
            raise self._reject(rec, "delete", exc) from None
        if msg is rec.original:
            rec.original_deleted = True
        self._messages.delete(msg)
        return web.Response(status=204)
