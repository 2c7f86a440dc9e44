"""The generated protobuf modules must match proto/tiality.proto (run `make proto` after editing it)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tiality_cli.net._proto import generate


def test_generated_code_is_current() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate.generate(Path(tmp))
        stale = [p.name for p in fresh if p.read_bytes() != (generate.PACKAGE_DIR / p.name).read_bytes()]
    assert len(fresh) == 4
    assert stale == [], f"out of date: {stale}; run `make proto`"


def test_every_field_is_documented() -> None:
    from tiality_cli.net._proto import tiality_pb2 as pb

    doc = (generate.ROOT / "docs" / "protocol.md").read_text()
    missing = [
        f"{m.name}.{f.name}"
        for m in pb.DESCRIPTOR.message_types_by_name.values()
        for f in m.fields
        if f"`{f.name}`" not in doc
    ]
    assert missing == []
