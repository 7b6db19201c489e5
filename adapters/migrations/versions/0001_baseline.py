"""The schema as it was before migrations: adapters, versions, aliases, evaluations, routing, merges, deployments.

Databases made before then are stamped with this revision; nothing to run.

Revision ID: 0001
"""

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
