"""User SQL on the server: friendly early refusals, JSON-safe results, bounded fetches.

Security is not here. The serving DuckDB instance is locked (`atlas.store.sandbox`: no file
access, no extensions, no setting changes) and every read runs in a READ ONLY transaction, so
whatever gets past these checks still cannot read a file or write the atlas. The checks below walk
DuckDB's own parse tree (never the text) to explain a refusal before the engine's more cryptic
error, and to keep the catalog's metadata (settings, database paths) out of reach, which the
engine would otherwise show.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa
from duckdb.sqltypes import DuckDBPyType

from atlas.errors import BadInput

# Table functions a read may call; every other one (read_csv, glob, query, duckdb_*) is refused
# early. The engine refuses the file readers anyway; the metadata ones it would answer.
SAFE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
UNSAFE_FUNCTIONS = frozenset({"getenv", "current_setting", "read_text", "read_blob", "nextval", "setval",
                              "currval"})
SCHEMA_HINT = "GET /api/schema lists the tables and views; SQL here reads only those"


class TooLarge(BadInput):
    """A result over the server's row or byte limit (413)."""


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """One SELECT over the atlas's own tables and views, with CTE names resolved by scope."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise BadInput(f"the SQL does not parse: {_first_line(exc)}", "check the statement") from None
    if len(statements) != 1:
        raise BadInput(f"expected one SQL statement, got {len(statements)}", "send one SELECT at a time")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise BadInput(f"only read queries are allowed, not {statements[0].type.name}",
                       "the server is the atlas's only writer; submit builds with POST /api/builds")
    known = {r[0].lower() for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "UNION SELECT view_name FROM duckdb_views() WHERE NOT internal AND database_name = current_database()"
    ).fetchall()}
    try:
        # fetchall, not fetchone: DuckDB 2.0 refuses other work on a cursor with an unfinished result
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0])
        if tree.get("error"):
            raise BadInput(f"the SQL does not parse: {tree.get('error_message')}", "check the statement")
        for node, visible in _walk(tree, frozenset()):
            _check_node(node, visible, known)
    except RecursionError:  # refuse what cannot be checked
        raise BadInput("the query is nested too deeply for the server to check it",
                       "flatten it (fewer nested subqueries or chained operators)") from None


def _check_node(node: dict[str, Any], visible: frozenset[str], known: set[str]) -> None:
    kind = node.get("type", "")
    if kind.endswith("_QUERY_NODE"):  # DELETE/UPDATE/INSERT inside a CTE: the statement says SELECT
        raise BadInput(f"only read queries are allowed, not {kind.removesuffix('_QUERY_NODE')} inside a query",
                       "the server is the atlas's only writer; submit builds with POST /api/builds")
    if kind == "BASE_TABLE":
        name, schema = node.get("table_name", ""), node.get("schema_name", "")
        allowed = known if schema else known | visible  # a qualified name never binds to a CTE
        if node.get("catalog_name") or schema not in ("", "main") or name.lower() not in allowed:
            raise BadInput(f"'{name}' is not a table of this atlas", SCHEMA_HINT)
    elif kind == "TABLE_FUNCTION":
        name = node.get("function", {}).get("function_name", "").lower()
        if name not in SAFE_TABLE_FUNCTIONS:
            raise BadInput(f"the table function {name}() is not allowed on the server",
                           f"allowed: {', '.join(sorted(SAFE_TABLE_FUNCTIONS))}; {SCHEMA_HINT}")
    elif node.get("class") == "FUNCTION" and node.get("function_name", "").lower() in UNSAFE_FUNCTIONS:
        raise BadInput(f"the function {node['function_name']}() is not allowed on the server", SCHEMA_HINT)


def _walk(node: Any, visible: frozenset[str]) -> Iterator[tuple[dict[str, Any], frozenset[str]]]:
    """Every dict of the parse tree with the CTE names in scope there.

    A CTE is visible in the query that defines it and, within its WITH, to the CTEs after it;
    a CTE's own body sees itself only when it is recursive. Names used anywhere else bind to the
    catalog, which is the hole a flat list of CTE names leaves open."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, visible)
        return
    if not isinstance(node, dict):
        return
    yield node, visible
    entries = node.get("cte_map", {}).get("map", []) if isinstance(node.get("cte_map"), dict) else []
    names = [entry.get("key", "").lower() for entry in entries]
    for i, entry in enumerate(entries):
        body = entry.get("value", {})
        query = body.get("query_node", {}) if isinstance(body, dict) else {}
        recursive = query.get("type") == "RECURSIVE_CTE_NODE" and query.get("cte_name", "").lower() == names[i]
        yield from _walk(body, visible | set(names[:i]) | ({names[i]} if recursive else set()))
    inner = visible | set(names)
    for key, value in node.items():
        if key != "cte_map":
            yield from _walk(value, inner)


# -- results ------------------------------------------------------------------------------------
JSON_NATIVE = frozenset({"boolean", "tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint",
                         "uinteger", "ubigint", "float", "double", "varchar", "null", "sqlnull"})
AS_DOUBLE = frozenset({"decimal", "hugeint", "uhugeint"})


def _json_safe(dtype: DuckDBPyType) -> bool:
    if dtype.id in JSON_NATIVE:
        return True
    if dtype.id in ("list", "struct"):
        return all(isinstance(child, DuckDBPyType) and _json_safe(child) for _, child in dtype.children)
    return False


def json_safe_relation(relation: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Cast the columns JSON cannot hold as they are: DECIMAL/HUGEINT to DOUBLE, everything else
    (BLOB, dates and times including infinite ones, INTERVAL, UUID, MAP, nested mixes) to text,
    as DuckDB prints it. Done in DuckDB, so the conversion to Python never fails."""
    columns, changed = [], False
    for name, dtype in zip(relation.columns, relation.types, strict=True):
        quoted = '"' + name.replace('"', '""') + '"'
        if _json_safe(dtype):
            columns.append(quoted)
            continue
        changed = True
        target = "DOUBLE" if dtype.id in AS_DOUBLE else "VARCHAR"
        columns.append(f"CAST({quoted} AS {target}) AS {quoted}")
    return relation.select(", ".join(columns)) if changed else relation


def fetch_bounded(relation: duckdb.DuckDBPyRelation, max_rows: int, max_bytes: int) -> pa.Table:
    """Stream at most max_rows rows and max_bytes of Arrow data, refusing past either limit.

    The stream is always closed (an open one pins the database), and a refused result is never
    converted to Python, so a large answer costs at most one batch past the limit."""
    reader = relation.to_arrow_reader(batch_size=min(max_rows + 1, 1024))
    try:
        batches, n, size = [], 0, 0
        for batch in reader:
            batches.append(batch)
            n += batch.num_rows
            size += batch.nbytes
            if n > max_rows:
                raise TooLarge(f"the result has more than {max_rows} rows (the server's limit)",
                               "add a LIMIT, aggregate, or page with LIMIT/OFFSET")
            if size > max_bytes:
                raise TooLarge(f"the result is larger than {max_bytes / 2**20:g} MiB (the server's limit)",
                               "select fewer or narrower columns, or page with LIMIT/OFFSET")
        return pa.Table.from_batches(batches, schema=reader.schema)
    finally:
        reader.close()


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
