"""Every use of Litestar's private API, in one place; ``tests/test_compat.py`` fails clearly when one moves.

Litestar describes request bodies itself only when it decodes them; the handlers here structure their bodies with the
wire converter, so the schema of each body is made with the same generator Litestar uses for responses, which it does
not export.
"""

from __future__ import annotations

from litestar._openapi.schema_generation import SchemaCreator

__all__ = ["SchemaCreator"]
