"""``synth_workers.uuids``: the bulk ids and delivery tags are version-4 UUIDs as
``uuid.uuid4()`` writes them, every one different."""

from __future__ import annotations

import uuid

from synth_workers.uuids import uuid4s


def test_uuid4s_are_canonical_version_4_uuids_all_different() -> None:
    made = uuid4s(5000)
    assert len(made) == 5000
    assert len(set(made)) == 5000
    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text
    assert uuid4s(0) == []
    assert uuid4s(1)[0] != uuid4s(1)[0]
