"""Postgres: SQLAlchemy models, the session factory, migrations and basic queries."""
