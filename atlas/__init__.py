"""head-atlas database: schema, ingest, read-only queries. Imports no torch."""

from atlas.errors import AtlasError, BadInput, Busy, NotFound, SchemaMismatch
from atlas.notebook import Notebook, open
from atlas.store import Atlas

__all__ = ["Atlas", "AtlasError", "BadInput", "Busy", "NotFound", "Notebook", "SchemaMismatch", "open"]
