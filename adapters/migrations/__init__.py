"""Alembic migrations of the registry's database (``adapters.db.migrate`` runs them)."""
