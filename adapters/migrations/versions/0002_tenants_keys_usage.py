"""Tenants, API keys, usage, and the tenant an adapter belongs to.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapters") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=True))
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("requests_per_min", sa.Integer, nullable=True),
        sa.Column("tokens_per_min", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("requests_per_min", sa.Integer, nullable=True),
        sa.Column("tokens_per_min", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "usage",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(32), primary_key=True),
        sa.Column("served_by", sa.String(256), primary_key=True),
        sa.Column("requests", sa.Integer, nullable=False),
        sa.Column("errors", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
        sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage")
    op.drop_table("api_keys")
    op.drop_table("tenants")
    with op.batch_alter_table("adapters") as batch:
        batch.drop_column("tenant")
