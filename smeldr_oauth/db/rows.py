# -*- test-case-name: tests.test_db_rows -*-
"""
Rows to records, records to rows and filters to SQL: what every store over
L{smeldr_oauth.db.database} writes around its queries (the OAuth store, the
site's tokens and posts, the flow timeline), written once.

A table's columns are named like its record's fields, so a row maps to a
record field by field, and a record to the C{INSERT} of its row; only the
columns whose type SQL does not keep (JSON-encoded tuples, SQLite's
integer booleans) are converted by the caller.  The filter builder keeps
the optional conditions of a listing query (a subject, a tag, a cursor)
and their parameters in step.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Optional, TypeVar, Union

import attr

T = TypeVar("T")

_names: dict[type, tuple[str, ...]] = {}
_inserts: dict[tuple[str, type], tuple[str, Callable[[Any], Any], dict[str, int]]] = {}


def _fields(record: type) -> tuple[str, ...]:
    names = _names.get(record)
    if names is None:
        names = _names[record] = tuple(field.name for field in attr.fields(record))
    return names


def from_row(record: type[T], row: Any, **converted: Any) -> T:
    """
    An attrs C{record} from a database row whose columns bear its fields'
    names (a C{sqlite3.Row}, a psycopg dict row, any mapping).

    @param converted: the fields the row does not hold as such, already
        converted (C{scopes=tuple(json.loads(row["scopes"]))}).
    """
    names = _fields(record)
    values = {name: row[name] for name in names if name not in converted}
    values.update(converted)
    return record(**values)


def to_row(table: str, record: Any, **converted: Any) -> tuple[str, tuple[Any, ...]]:
    """
    The C{INSERT} of an attrs C{record} as a row of C{table}, whose columns
    bear its fields' names (the reverse of L{from_row}), and its
    parameters: one column per field, in the record's order, so that no
    column list and its placeholders are counted by hand.

    @param converted: the fields stored otherwise than as they are, or
        with another value (C{scopes=json.dumps(list(token.scopes))}).
    @raise TypeError: a converted name is not a field of the record.
    """
    kind = type(record)
    plan = _inserts.get((table, kind))
    if plan is None:
        plan = _inserts[table, kind] = _insert_plan(table, kind)
    sql, fields, index = plan
    values = list(fields(record))
    for name, value in converted.items():
        place = index.get(name)
        if place is None:
            raise TypeError(f"{kind.__name__} has no field {name}")
        values[place] = value
    return sql, tuple(values)


def _insert_plan(table: str, kind: type) -> tuple[str, Callable[[Any], Any], dict[str, int]]:
    """
    What L{to_row} needs for one table and record type, made once (a
    rotation writes two rows on the hot path): the statement, a getter of
    every field at once, and each field's place.
    """
    names = _fields(kind)
    placeholders = ", ".join("?" for _ in names)
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({placeholders})"
    return sql, operator.attrgetter(*names), {name: i for i, name in enumerate(names)}


def where(*conditions: Union[str, tuple[str, Optional[object]]]) -> tuple[str, list[object]]:
    """
    A C{WHERE} clause and its parameters.

    @param conditions: each either SQL that always applies
        (C{"revoked_at IS NULL"}) or a pair of SQL with one placeholder and
        its value, which applies only when the value is not C{None}
        (C{("subject = ?", subject)}).
    @return: C{(" WHERE a AND b = ?", [value])}, or C{("", [])} when no
        condition applies.
    """
    sql: list[str] = []
    params: list[object] = []
    for condition in conditions:
        if isinstance(condition, str):
            sql.append(condition)
        elif condition[1] is not None:
            sql.append(condition[0])
            params.append(condition[1])
    return (" WHERE " + " AND ".join(sql) if sql else ""), params
