"""``kontext.vocab``: the enums are the strings the database, JSON and the API already use."""

from __future__ import annotations

import json

from PIL import Image
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

from kontext import schema
from kontext.vocab import ImageFormat, JobState, LedgerKind, Outcome, Source


def test_the_check_constraints_are_the_ones_the_migrations_made() -> None:
    # the exact text revision 0003 wrote (changing an enum needs a revision)
    expected = [
        (schema.jobs, "ck_jobs_state",
         "state IN ('accepted', 'claimed', 'sent', 'posting', 'posted', 'failed', 'refunded')"),
        (schema.ledger, "ck_ledger_kind",
         "kind IN ('start', 'grant', 'revoke', 'daily', 'reserve', 'commit', 'refund')"),
    ]
    for table, name, text in expected:
        for dialect in (sqlite.dialect(), postgresql.dialect()):
            ddl = str(CreateTable(table).compile(dialect=dialect))
            assert f"CONSTRAINT {name} CHECK ({text})" in ddl

def test_members_are_their_strings() -> None:
    assert JobState.POSTED == "posted" and f"{LedgerKind.REFUND}" == "refund"
    assert json.dumps([Outcome.HANDED_OVER, Source.USE_AS_INPUT]) == '["handed_over", "use_as_input"]'
    assert schema.ACTIVE_STATES == ("accepted", "claimed", "sent", "posting")
    assert schema.LEASED_STATES == ("claimed", "sent", "posting")
    assert {"posted": 1}[Outcome.POSTED] == 1


def test_image_formats_map_at_the_edges() -> None:
    assert [f.value for f in ImageFormat] == ["jpg", "png", "webp"]  # the API's wire values
    assert {f: f.pil for f in ImageFormat} == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
    assert all(f.pil in Image.registered_extensions().values() for f in ImageFormat)
    assert ImageFormat.JPG.mime == "image/jpeg"
    assert ImageFormat.from_pil("JPEG") is ImageFormat.JPG and ImageFormat.from_pil("GIF") is None
    assert ImageFormat.from_pil(None) is None
