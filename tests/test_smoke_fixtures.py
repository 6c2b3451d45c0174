def test_fixture_database_has_tma_tables(pg, tma_db):
    with pg.connect(tma_db) as connection:
        from tests import tma_cloud
        counts = tma_cloud.exact_counts(connection)
    assert counts["public.users"] == 50
    assert counts["pgboss.job"] == 100
