"""head-atlas database: schema, ingest, read-only queries. Imports no torch."""

from atlas.errors import AtlasError, BadInput, Busy, NotFound, SchemaMismatch
from atlas.store import Atlas, open

__all__ = ["Atlas", "AtlasError", "BadInput", "Busy", "NotFound", "SchemaMismatch", "open"]
