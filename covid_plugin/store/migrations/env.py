"""Alembic's entry point for the store: migrations run on the connection store/db.py hands in
(`config.attributes["connection"]`), inside its transaction and under its lock, so that
processes starting together migrate once."""

from alembic import context

from covid_plugin.store.schema import metadata

context.configure(connection=context.config.attributes["connection"],
                  target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
