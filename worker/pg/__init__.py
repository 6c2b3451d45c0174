"""Talking to PostgreSQL: sessions (psycopg), the client tools' environment, where the tools run
(host or container executors), and telling a lost server from other failures."""
