"""Who may work on a database when: per-database locks, schedule slots, cron schedules."""
