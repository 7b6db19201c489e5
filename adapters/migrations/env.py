"""Alembic's entry point: migrations run on the connection ``adapters.db.migrate`` hands over."""

from alembic import context

from adapters.db import metadata

connection = context.config.attributes["connection"]
# Batch mode: SQLite cannot ALTER most things in place; Alembic copies the table instead.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
