"""A night of TMA Cloud's activity on a reference database: "1 % of the rows changed" (issue 11's
second-night figure, bench/README.md "What a night changes").

A scenario is a list of changes, each a share of one table's rows at the start of the night: rows
inserted (uploads, log lines, logins, jobs), updated or deleted. Updates and deletes pick their rows
by where they sit in the table's heap, which is the order `pg_dump` writes them in:

- `tail`: the newest rows (yesterday's sessions, the jobs still running): what an application touches;
- `head`: the oldest rows (expired sessions, archived jobs): what its clean-ups remove;
- `random`: anywhere (a file renamed, a user's settings).

Updates and deletes run before the inserts, so `tail` means the rows that were newest last night. An
updated row gets a new version at the heap's end (the generator's pages are full): pg_dump then writes
it after the rows that did not change, as a real table's dump moves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb

from bench.generate import FILE_SIZES, Server

TABLES = ("public.users", "public.files", "public.audit_log", "public.sessions", "public.share_links", "pgboss.job")


@dataclass(frozen=True)
class Change:
    table: str
    kind: str  # insert, update, delete
    share: float  # of the table's rows at the start of the night
    where: str = ""  # update/delete: tail, head or random


SCENARIOS: dict[str, tuple[Change, ...]] = {
    # The headline: how TMA Cloud's day changes its database. The audit log only grows; files are
    # uploaded and some renamed; recently active sessions are touched and new ones start; the newest
    # jobs complete and new ones are queued; a few users change their settings; links are shared.
    "nightly": (
        Change("public.audit_log", "insert", 0.01),
        Change("public.files", "insert", 0.005),
        Change("public.files", "update", 0.005, "random"),
        Change("public.sessions", "update", 0.005, "tail"),
        Change("public.sessions", "insert", 0.005),
        Change("pgboss.job", "update", 0.005, "tail"),
        Change("pgboss.job", "insert", 0.005),
        Change("public.users", "update", 0.01, "random"),
        Change("public.share_links", "insert", 0.01),
    ),
    # Only rows added (1 % of each table): the most favourable night.
    "append": tuple(Change(table, "insert", 0.01) for table in TABLES),
    # The nightly one with clean-ups: expired sessions and archived jobs (the oldest) are deleted.
    "expiry": (
        Change("public.audit_log", "insert", 0.01),
        Change("public.files", "insert", 0.005),
        Change("public.files", "update", 0.005, "random"),
        Change("public.sessions", "delete", 0.0025, "head"),
        Change("public.sessions", "update", 0.0025, "tail"),
        Change("public.sessions", "insert", 0.005),
        Change("pgboss.job", "delete", 0.0025, "head"),
        Change("pgboss.job", "update", 0.0025, "tail"),
        Change("pgboss.job", "insert", 0.005),
        Change("public.users", "update", 0.01, "random"),
        Change("public.share_links", "insert", 0.01),
    ),
    # The least favourable: 1 % of every table's rows updated, anywhere.
    "uniform": tuple(Change(table, "update", 0.01, "random") for table in TABLES),
}

_UPDATES = {
    "public.users": "settings = settings || '{\"theme\": \"light\"}'",
    "public.files": "path = path || '.renamed', metadata = metadata || '{\"renamed\": true}'",
    "public.audit_log": "details = details || '{\"reviewed\": true}'",
    "public.sessions": "expires_at = expires_at + interval '7 days', "
                       "data = jsonb_set(data, '{lastPath}', to_jsonb('/home/' || user_id || '/recent'))",
    "public.share_links": "expires_at = expires_at + interval '7 days'",
    "pgboss.job": "state = 'completed'",
}

_INSERTS = {
    "public.users": """
        INSERT INTO users (email, name, settings)
        SELECT 'night-' || g || '-' || md5(random()::text) || '@example.com', 'User ' || g || ' Night',
               jsonb_build_object('theme', 'dark', 'quota', g * 1024, 'lang', 'en')
        FROM generate_series(1, %(rows)s) g""",
    "public.audit_log": """
        INSERT INTO audit_log (user_id, action, details, at)
        SELECT 1 + g %% %(users)s, (ARRAY['login','logout','upload','download','share','delete','rename','move'])[1 + g %% 8],
               jsonb_build_object(
                   'ip', '10.' || (g %% 251) || '.' || ((g / 251) %% 256) || '.' || (g %% 250),
                   'user_agent', 'Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) '
                                 || 'Chrome/' || (100 + g %% 31) || '.0.0.0 Safari/537.36',
                   'path', '/home/' || (g %% %(users)s) || '/documents/report-night-' || g || '.pdf',
                   'request_id', md5(g::text || random()::text),
                   'bytes', (random() * 1e7)::int,
                   'ok', g %% 17 <> 0),
               now()
        FROM generate_series(1, %(rows)s) g""",
    "public.sessions": """
        INSERT INTO sessions (sid, user_id, data, expires_at)
        SELECT md5('night-session-' || g || random()::text), 1 + g %% %(users)s,
               jsonb_build_object('cookie', jsonb_build_object('httpOnly', true, 'secure', true,
                                                               'sameSite', 'lax', 'maxAge', 86400000),
                                  'csrf', md5(random()::text), 'cart', '[]'::jsonb,
                                  'lastPath', '/home/' || (g %% %(users)s) || '/photos'),
               now() + interval '7 days'
        FROM generate_series(1, %(rows)s) g""",
    "public.share_links": """
        INSERT INTO share_links (token, file_id, expires_at)
        SELECT md5('night-share-' || id || random()::text), id, now() + interval '14 days'
        FROM files ORDER BY random() LIMIT %(rows)s""",
    "pgboss.job": """
        INSERT INTO pgboss.job (name, state, data, created_on)
        SELECT (ARRAY['thumbnail','virus-scan','index-text','send-mail'])[1 + g %% 4], 'created',
               jsonb_build_object('fileId', 1000000 + g, 'userId', 1 + g %% %(users)s,
                                  'options', jsonb_build_object('width', 256, 'height', 256, 'format', 'webp'),
                                  'attempt', 0, 'note', repeat('retry later; ', g %% 9)),
               now()
        FROM generate_series(1, %(rows)s) g""",
}


def _table(name: str) -> sql.Identifier:
    return sql.Identifier(*name.split("."))


def _pick(table: str, rows: int, where: str) -> sql.Composed:
    """The ctids of `rows` rows of `table`, by place in the heap (tail, head) or at random."""
    order = {"tail": sql.SQL("ctid DESC"), "head": sql.SQL("ctid"), "random": sql.SQL("random()")}[where]
    return sql.SQL("ctid = ANY(ARRAY(SELECT ctid FROM {} ORDER BY {} LIMIT {}))").format(
        _table(table), order, sql.Literal(rows))


def _insert_files(connection: Any, rows: int, users: int, rng: random.Random) -> None:
    """Uploads: new random (incompressible) content, the generator's sizes, sent with binary COPY."""
    mimes = ["image/jpeg", "application/pdf", "image/png", "application/zip", "video/mp4"]
    with connection.cursor() as cursor:
        with cursor.copy("COPY files (owner_id, path, mime, content, metadata) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["int8", "text", "text", "bytea", "jsonb"])
            for number in range(rows):
                size = rng.randint(FILE_SIZES[0], rng.choice(FILE_SIZES[1:]))
                owner = 1 + rng.randrange(users)
                copy.write_row((owner, f"/home/{owner}/uploads/night-{number}-{rng.getrandbits(32):08x}.bin",
                                mimes[number % 5], rng.randbytes(size),
                                Jsonb({"size": size, "tags": ["upload", "night"],
                                       "checksum": f"{rng.getrandbits(128):032x}"})))


def _count(connection: Any, table: str) -> int:
    row = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(_table(table))).fetchone()
    return int(row[0]) if row else 0


def change_rows(server: Server, database: str, scenario: str = "nightly", seed: int = 11) -> dict[str, Any]:
    """Apply one night of `scenario` to `database`; returns the rows changed per table and kind, and
    their total against the rows there were."""
    changes = SCENARIOS[scenario]
    rng = random.Random(seed)
    with server.connect(database) as connection:
        connection.execute("SELECT setseed(%s)", (seed / 1000,))
        counts = {table: _count(connection, table) for table in TABLES}
        users = counts["public.users"]
        done: dict[str, dict[str, int]] = {}
        ordered = sorted(changes, key=lambda change: change.kind == "insert")  # updates and deletes first
        for change in ordered:
            rows = max(1, round(change.share * counts[change.table]))
            if change.kind == "update":
                connection.execute(sql.SQL("UPDATE {} SET {} WHERE {}").format(
                    _table(change.table), sql.SQL(_UPDATES[change.table]), _pick(change.table, rows, change.where)))
            elif change.kind == "delete":
                connection.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
                    _table(change.table), _pick(change.table, rows, change.where)))
            elif change.table == "public.files":
                _insert_files(connection, rows, users, rng)
            else:
                connection.execute(_INSERTS[change.table], {"rows": rows, "users": users})
            kinds = done.setdefault(change.table, {})
            kinds[change.kind] = kinds.get(change.kind, 0) + rows
        connection.commit()
    total = sum(counts.values())
    changed = sum(sum(kinds.values()) for kinds in done.values())
    return {"scenario": scenario, "rows_before": total, "rows_changed": changed,
            "share": round(changed / total, 4), "tables": done}
