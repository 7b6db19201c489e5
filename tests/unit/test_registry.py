"""Registry against a real database: SQLite in a file, and PostgreSQL where its server is installed."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import create_engine, text, update

from adapters import BaseModelSpec, DeploymentStore, Registry, UploadLimits, db
from adapters.catalog import MERGE_FILE
from adapters.store import digest
from core.errors import Conflict, InvalidAdapter, InvalidArchive, InvalidRequest, ModelNotFound, NotFound
from tests import factories as f
from tests.postgres import postgres_cluster  # noqa: F401 - a fixture, used by name


@pytest.fixture(scope="module")
def adapters_dir(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good adapters with different weights: seed0, seed1, seed2."""
    root = tmp_path_factory.mktemp("adapters")
    for seed in range(3):
        f.make_lora_adapter(model, root / f"seed{seed}", seed=seed)
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    cluster = request.getfixturevalue("postgres_cluster")
    url: str = cluster.create_database()
    return url


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def registry(database_url: str, store: Path, base: BaseModelSpec) -> Iterator[Registry]:
    with Registry.open(database_url, store, base=base, max_lora_rank=16, reserved_names=frozenset({"base"})) as reg:
        yield reg


def stored_dirs(store: Path) -> list[str]:
    """Everything in the store but the (empty) staging area."""
    found = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    return [p for p in found if p != ".staging"]


# -- pushing and versions ------------------------------------------------------------------------


def test_push_creates_an_immutable_version(registry: Registry, adapters_dir: Path, store: Path) -> None:
    result = registry.push_dir("support-bot", adapters_dir / "seed0")
    v = result.version
    assert result.created
    assert (v.name, v.number, v.lora_name, v.rank, v.target_modules) == (
        "support-bot",
        1,
        "support-bot@v1",
        8,
        ("q_proj", "v_proj"),
    )
    assert v.path == store.resolve() / "support-bot" / v.sha256
    assert v.sha256 == digest(adapters_dir / "seed0")
    assert sorted(p.name for p in v.path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert v.size_bytes == sum(p.stat().st_size for p in v.path.iterdir())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in v.path.iterdir())
    assert stat.S_IMODE(v.path.stat().st_mode) == 0o555
    assert v.created_at.tzinfo is not None
    assert registry.resolve("support-bot") == v


def test_identical_content_returns_the_existing_version(registry: Registry, adapters_dir: Path) -> None:
    first = registry.push_dir("a", adapters_dir / "seed0").version
    revision = registry.revision()
    again = registry.push_dir("a", adapters_dir / "seed0")
    assert (again.created, again.version) == (False, first)
    assert registry.revision() == revision  # nothing changed, nothing to refresh


def test_new_content_makes_the_next_version(registry: Registry, adapters_dir: Path) -> None:
    numbers = [registry.push_dir("a", adapters_dir / f"seed{s}").version.number for s in (0, 1, 2)]
    assert numbers == [1, 2, 3]
    adapter = registry.adapter("a")
    assert [v.number for v in adapter.versions] == [1, 2, 3]
    assert adapter.latest.number == 3
    assert len({v.path for v in adapter.versions}) == 3


def test_same_content_under_two_names_is_two_adapters(registry: Registry, adapters_dir: Path) -> None:
    a = registry.push_dir("a", adapters_dir / "seed0").version
    b = registry.push_dir("b", adapters_dir / "seed0").version
    assert (a.number, b.number) == (1, 1)
    assert a.path != b.path
    assert [x.name for x in registry.adapters()] == ["a", "b"]


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_archive_push_matches_the_directory_push(
    fmt: str, registry: Registry, adapters_dir: Path, tmp_path: Path
) -> None:
    archive = tmp_path / f"upload.{fmt}"
    (f.zip_of if fmt == "zip" else f.tar_of)(adapters_dir / "seed0", archive)
    from_archive = registry.push_archive("a", archive)
    assert from_archive.created
    from_dir = registry.push_dir("a", adapters_dir / "seed0")
    assert (from_dir.created, from_dir.version) == (False, from_archive.version)


def test_numbers_are_not_reused_after_a_delete(registry: Registry, adapters_dir: Path) -> None:
    # vLLM may still hold "a@v2" loaded; a new, different a@v2 would be served with the old weights.
    registry.push_dir("a", adapters_dir / "seed0")
    registry.push_dir("a", adapters_dir / "seed1")
    registry.delete_version("a", 2)
    assert registry.push_dir("a", adapters_dir / "seed2").version.number == 3


def test_concurrent_pushes_of_one_name_get_distinct_numbers(registry: Registry, adapters_dir: Path) -> None:
    barrier = threading.Barrier(3)
    results: list[int] = []
    errors: list[BaseException] = []

    def push(seed: int) -> None:
        barrier.wait()
        try:
            results.append(registry.push_dir("a", adapters_dir / f"seed{seed}").version.number)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=push, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3]


def test_push_waits_for_another_writer_and_numbers_after_it(
    database_url: str, store: Path, base: BaseModelSpec, adapters_dir: Path
) -> None:
    with Registry.open(database_url, store, base=base) as registry:
        registry.push_dir("a", adapters_dir / "seed0")
        results: list[int] = []
        pusher = threading.Thread(
            target=lambda: results.append(registry.push_dir("a", adapters_dir / "seed1").version.number)
        )
        other = create_engine(database_url)  # another gateway replica or CLI process, mid-transaction
        try:
            with other.begin() as conn:
                conn.execute(update(db.revision).values(value=db.revision.c.value + 1))
                pusher.start()
                pusher.join(timeout=1.0)
                assert pusher.is_alive(), "the push did not wait for the other writer"
                # The other writer handed out numbers 2-5 in the meantime.
                conn.execute(update(db.adapters).where(db.adapters.c.name == "a").values(last_number=5))
            pusher.join()
        finally:
            other.dispose()
        assert results == [6]


def test_concurrent_identical_pushes_make_one_version(registry: Registry, adapters_dir: Path) -> None:
    barrier = threading.Barrier(3)
    created: list[bool] = []

    def push() -> None:
        barrier.wait()
        created.append(registry.push_dir("a", adapters_dir / "seed0").created)

    threads = [threading.Thread(target=push) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [False, False, True]
    assert [v.number for v in registry.adapter("a").versions] == [1]


def test_registry_persists_across_reopen(
    database_url: str, store: Path, base: BaseModelSpec, adapters_dir: Path
) -> None:
    with Registry.open(database_url, store, base=base) as first:
        first.push_dir("a", adapters_dir / "seed0")
        first.set_alias("a", "prod", 1, force=True)
        revision = first.revision()
    with Registry.open(database_url, store, base=base) as second:
        assert second.resolve("a@prod").number == 1
        assert second.revision() == revision


def test_sqlite_runs_in_wal_mode_with_foreign_keys(tmp_path: Path, base: BaseModelSpec) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    Registry.open(url, tmp_path / "store", base=base).close()
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.scalar(text("PRAGMA journal_mode")) == "wal"  # persistent, set at open
    engine.dispose()


# -- refusals leave nothing behind ---------------------------------------------------------------


def assert_empty(registry: Registry, store: Path, revision: int) -> None:
    assert registry.adapters() == []
    assert stored_dirs(store) == []
    assert registry.revision() == revision


BAD_VARIANTS: list[Callable[[Path, Path], Path]] = [
    f.with_dora,
    f.with_modules_to_save,
    f.with_bias_tensor,
    f.with_rank,
    f.with_nan,
    f.with_wrong_shape,
    f.with_missing_layer,
    f.with_pickle,
    f.with_peft_type,
]


@pytest.mark.parametrize("make_bad", BAD_VARIANTS, ids=[b.__name__ for b in BAD_VARIANTS])
def test_bad_adapter_leaves_nothing_behind(
    make_bad: Callable[[Path, Path], Path], registry: Registry, adapters_dir: Path, store: Path, tmp_path: Path
) -> None:
    bad = make_bad(adapters_dir / "seed0", tmp_path / "bad")
    revision = registry.revision()
    with pytest.raises(InvalidAdapter):
        registry.push_dir("a", bad)
    with pytest.raises(InvalidAdapter):
        registry.push_archive("a", f.tar_of(bad, tmp_path / "bad.tgz"))
    assert_empty(registry, store, revision)


def test_bad_push_to_an_existing_adapter_changes_nothing(
    registry: Registry, adapters_dir: Path, store: Path, tmp_path: Path
) -> None:
    registry.push_dir("a", adapters_dir / "seed0")
    before, revision, files = registry.adapter("a"), registry.revision(), stored_dirs(store)
    with pytest.raises(InvalidAdapter, match="does not exist in base model"):
        registry.push_dir("a", f.with_missing_layer(adapters_dir / "seed1", tmp_path / "bad"))
    assert (registry.adapter("a"), registry.revision(), stored_dirs(store)) == (before, revision, files)


@pytest.mark.parametrize("build", [f.traversal_tar, f.absolute_path_tar, f.symlink_tar])
def test_hostile_archive_leaves_nothing_behind(
    build: Callable[[Path], Path], registry: Registry, store: Path, tmp_path: Path
) -> None:
    revision = registry.revision()
    with pytest.raises(InvalidArchive):
        registry.push_archive("a", build(tmp_path / "evil.tgz"))
    assert_empty(registry, store, revision)


def test_archive_over_the_limits_is_refused(
    database_url: str, store: Path, base: BaseModelSpec, adapters_dir: Path, tmp_path: Path
) -> None:
    limits = UploadLimits(max_extracted_bytes=4096)
    with Registry.open(database_url, store, base=base, limits=limits) as registry:
        with pytest.raises(InvalidRequest, match="extracts to more than 4096 bytes") as caught:
            registry.push_archive("a", f.tar_of(adapters_dir / "seed0", tmp_path / "a.tgz"))
        assert caught.value.status_code == 413
        assert_empty(registry, store, 0)


@pytest.mark.parametrize("name", ["", "Upper", "-dash-first", ".dot", "a" * 65, "has space", "a@v1", "../up", "a/b"])
def test_invalid_names_are_refused_with_the_rule(
    name: str, registry: Registry, adapters_dir: Path, store: Path
) -> None:
    with pytest.raises(InvalidRequest, match=r"\^\[a-z0-9\]\[a-z0-9\._:-\]\{0,63\}\$") as caught:
        registry.push_dir(name, adapters_dir / "seed0")
    assert caught.value.param == "name"
    assert_empty(registry, store, 0)


def test_reserved_name_is_refused(registry: Registry, adapters_dir: Path) -> None:
    with pytest.raises(InvalidRequest, match="'base' is reserved") as caught:
        registry.push_dir("base", adapters_dir / "seed0")
    assert caught.value.param == "name"


def test_longest_allowed_name_works(registry: Registry, adapters_dir: Path) -> None:
    name = "a" + "b.c_d-" * 10 + "xyz"
    assert len(name) == 64
    assert registry.push_dir(name, adapters_dir / "seed0").version.lora_name == f"{name}@v1"


# -- aliases, resolution, deletion ---------------------------------------------------------------


@pytest.fixture
def three_versions(registry: Registry, adapters_dir: Path) -> Registry:
    for seed in range(3):
        registry.push_dir("bot", adapters_dir / f"seed{seed}")
    return registry


def test_bare_name_means_prod_else_latest(three_versions: Registry) -> None:
    reg = three_versions
    assert reg.resolve("bot").number == 3
    adapter = reg.set_alias("bot", "prod", 2, force=True)
    assert dict(adapter.aliases) == {"prod": 2}
    assert reg.resolve("bot").number == 2
    assert reg.resolve("bot@prod").number == 2
    assert reg.resolve("bot@v1").number == 1


def test_rollback_moves_the_alias_back(three_versions: Registry) -> None:
    reg = three_versions
    for number in (2, 3):
        reg.record_evaluation("bot", number, passing_report())
    reg.set_alias("bot", "prod", 2)
    reg.set_alias("bot", "prod", 3)
    assert reg.resolve("bot").lora_name == "bot@v3"
    reg.set_alias("bot", "prod", 2)
    assert reg.resolve("bot").lora_name == "bot@v2"
    assert dict(reg.adapter("bot").aliases) == {"prod": 2}


def test_resolve_errors_say_what_exists(three_versions: Registry) -> None:
    reg = three_versions
    reg.set_alias("bot", "staging", 1)
    with pytest.raises(ModelNotFound, match="'nobody' does not exist") as caught:
        reg.resolve("nobody")
    assert caught.value.status_code == 404
    with pytest.raises(ModelNotFound, match="'bot@v9' does not exist; bot has versions v1, v2, v3"):
        reg.resolve("bot@v9")
    with pytest.raises(ModelNotFound, match="'bot@canary' does not exist; .* aliases staging"):
        reg.resolve("bot@canary")


@pytest.mark.parametrize("alias", ["v1", "v22", "Prod", "1st", "", "a" * 33, "with.dot", "a@b"])
def test_invalid_aliases_are_refused(alias: str, three_versions: Registry) -> None:
    with pytest.raises(InvalidRequest) as caught:
        three_versions.set_alias("bot", alias, 1)
    assert caught.value.param == "alias"
    assert "^[a-z][a-z0-9_-]{0,31}$" in caught.value.message


def test_alias_to_unknown_version_or_adapter_is_not_found(three_versions: Registry) -> None:
    revision = three_versions.revision()
    with pytest.raises(NotFound, match="adapter 'bot' has no version v7; it has v1, v2, v3"):
        three_versions.set_alias("bot", "prod", 7)
    with pytest.raises(NotFound, match="adapter 'ghost' does not exist"):
        three_versions.set_alias("ghost", "prod", 1)
    assert three_versions.revision() == revision


def test_delete_alias(three_versions: Registry) -> None:
    reg = three_versions
    reg.set_alias("bot", "prod", 1, force=True)
    reg.delete_alias("bot", "prod")
    assert reg.resolve("bot").number == 3
    with pytest.raises(NotFound, match="adapter 'bot' has no alias 'prod'"):
        reg.delete_alias("bot", "prod")
    with pytest.raises(NotFound, match="adapter 'ghost' does not exist"):
        reg.delete_alias("ghost", "prod")


def test_aliased_version_cannot_be_deleted(three_versions: Registry) -> None:
    reg = three_versions
    reg.set_alias("bot", "prod", 2, force=True)
    reg.set_alias("bot", "canary", 2)
    with pytest.raises(Conflict, match="bot@v2 is still pointed at by bot@canary, bot@prod") as caught:
        reg.delete_version("bot", 2)
    assert caught.value.status_code == 409
    assert reg.resolve("bot@v2").path.is_dir()
    reg.set_alias("bot", "prod", 3, force=True)
    reg.delete_alias("bot", "canary")
    reg.delete_version("bot", 2)
    with pytest.raises(ModelNotFound, match="bot has versions v1, v3"):
        reg.resolve("bot@v2")


def test_deleting_a_version_removes_its_files(three_versions: Registry) -> None:
    path = three_versions.resolve("bot@v1").path
    three_versions.delete_version("bot", 1)
    assert not path.exists()
    assert [v.number for v in three_versions.adapter("bot").versions] == [2, 3]
    with pytest.raises(NotFound, match="no version v1"):
        three_versions.delete_version("bot", 1)


def test_deleting_the_last_version_removes_the_adapter(registry: Registry, adapters_dir: Path, store: Path) -> None:
    registry.push_dir("a", adapters_dir / "seed0")
    registry.delete_version("a", 1)
    assert registry.adapters() == []
    assert stored_dirs(store) == []
    with pytest.raises(NotFound, match="adapter 'a' does not exist"):
        registry.adapter("a")


def test_every_change_bumps_the_revision(registry: Registry, adapters_dir: Path) -> None:
    seen = [registry.revision()]

    def changed() -> None:
        seen.append(registry.revision())
        assert seen[-1] > seen[-2]

    registry.push_dir("a", adapters_dir / "seed0")
    changed()
    registry.push_dir("a", adapters_dir / "seed1")
    changed()
    registry.set_alias("a", "prod", 1, force=True)
    changed()
    registry.set_alias("a", "prod", 2, force=True)
    changed()
    registry.delete_alias("a", "prod")
    changed()
    registry.delete_version("a", 1)
    changed()


def test_snapshot_is_consistent_and_tagged(three_versions: Registry) -> None:
    reg = three_versions
    reg.set_alias("bot", "prod", 1, force=True)
    catalog = reg.snapshot()
    assert catalog.revision == reg.revision()
    assert {k: v.number for k, v in catalog.model_ids().items()} == {
        "bot": 1,
        "bot@v1": 1,
        "bot@v2": 2,
        "bot@v3": 3,
        "bot@prod": 1,
    }
    reg.set_alias("bot", "prod", 3, force=True)
    assert catalog.resolve("bot").number == 1  # a snapshot does not change under its reader
    assert reg.snapshot().resolve("bot").number == 3
    assert reg.snapshot().revision > catalog.revision


# -- the promotion gate ------------------------------------------------------------------------


def report(adapter: float, rag: float, few_shot: float = 10.0) -> dict[str, Any]:
    """An eval report as ``quiver eval`` stores it (the keys the gate reads)."""
    scores = {"adapter": adapter, "base_prompt": 0.0, "few_shot": few_shot, "rag": rag}
    best = max(("base_prompt", "few_shot", "rag"), key=lambda name: scores[name])
    return {"metric": "json_field_accuracy", "scores": scores, "best_baseline": best, "margin": adapter - scores[best]}


def passing_report() -> dict[str, Any]:
    return report(adapter=90.0, rag=60.0)


def test_prod_needs_an_eval_report(three_versions: Registry) -> None:
    with pytest.raises(Conflict, match="bot@v2 has no eval report; run `quiver eval bot@v2") as caught:
        three_versions.set_alias("bot", "prod", 2)
    assert caught.value.code == "promotion_refused" and caught.value.status_code == 409
    assert dict(three_versions.adapter("bot").aliases) == {}


def test_prod_refuses_a_version_that_does_not_beat_the_best_baseline_by_the_margin(three_versions: Registry) -> None:
    three_versions.record_evaluation("bot", 2, report(adapter=64.0, rag=60.0, few_shot=30.0))
    with pytest.raises(Conflict) as caught:
        three_versions.set_alias("bot", "prod", 2)
    assert caught.value.message == (
        "promotion to bot@prod refused: bot@v2 scores 64.0 on json_field_accuracy against 60.0 for the best "
        "baseline (rag): +4.0 points, below the 5-point promotion margin (force the promotion to override)"
    )
    # Other aliases are not gated: staging is where candidates wait.
    assert dict(three_versions.set_alias("bot", "staging", 2).aliases) == {"staging": 2}


def test_a_passing_report_promotes_and_force_overrides(three_versions: Registry) -> None:
    reg = three_versions
    reg.record_evaluation("bot", 2, passing_report())
    assert dict(reg.set_alias("bot", "prod", 2).aliases) == {"prod": 2}
    assert dict(reg.set_alias("bot", "prod", 3, force=True).aliases) == {"prod": 3}


def test_the_newest_report_is_the_one_that_counts(three_versions: Registry) -> None:
    reg = three_versions
    reg.record_evaluation("bot", 1, passing_report())
    reg.record_evaluation("bot", 1, report(adapter=50.0, rag=60.0))
    assert reg.resolve("bot@v1").evaluation == report(adapter=50.0, rag=60.0)
    assert reg.resolve("bot@v2").evaluation is None
    with pytest.raises(Conflict, match=r"-10.0 points"):
        reg.set_alias("bot", "prod", 1)


def test_the_margin_is_configurable(database_url: str, store: Path, base: BaseModelSpec, adapters_dir: Path) -> None:
    with Registry.open(database_url, store, base=base, promotion_margin=0.0) as reg:
        reg.push_dir("bot", adapters_dir / "seed0")
        reg.record_evaluation("bot", 1, report(adapter=60.0, rag=60.0))
        assert dict(reg.set_alias("bot", "prod", 1).aliases) == {"prod": 1}


def test_reports_need_an_existing_version_and_go_with_it(three_versions: Registry) -> None:
    reg = three_versions
    with pytest.raises(NotFound, match="no version v9"):
        reg.record_evaluation("bot", 9, passing_report())
    reg.record_evaluation("bot", 1, passing_report())
    reg.delete_version("bot", 1)
    assert [v.evaluation for v in reg.adapter("bot").versions] == [None, None]


# -- merges and deployments ----------------------------------------------------------------------


@pytest.fixture
def deployments(three_versions: Registry) -> DeploymentStore:
    return DeploymentStore.beside(three_versions)


def merge_report(equivalent: bool = True) -> dict[str, Any]:
    """The keys of a merge report (``adapters.merge.MergeReport.to_json``) that the registry reads."""
    return {"model": "bot@v1", "equivalent": equivalent, "dtype": "bfloat16", "max_logprob_diff": 0.03}


def merged_dir(path: Path) -> Path:
    """A stand-in merged model directory, marked as Quiver's merge writes it."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / MERGE_FILE).write_text("{}")
    return path


def test_merges_are_kept_per_version_and_the_newest_counts(deployments: DeploymentStore, tmp_path: Path) -> None:
    assert deployments.latest_merge("bot", 1) is None
    first = deployments.record_merge("bot", 1, tmp_path / "m1", merge_report(equivalent=False))
    second = deployments.record_merge("bot", 1, tmp_path / "m2", merge_report())
    assert (first.lora_name, first.path, first.equivalent) == ("bot@v1", tmp_path / "m1", False)
    assert deployments.merges("bot", 1) == [first, second]
    assert deployments.latest_merge("bot", 1) == second and second.equivalent
    assert dict(second.report) == merge_report()
    assert deployments.latest_merge("bot", 2) is None
    with pytest.raises(NotFound, match="no version v9"):
        deployments.record_merge("bot", 9, tmp_path / "m9", merge_report())


def test_deployments_are_registered_listed_and_removed(three_versions: Registry, deployments: DeploymentStore) -> None:
    reg = three_versions
    revision = reg.revision()
    added = deployments.add_deployment("bot", 2, "http://10.0.0.5:8000/", "bot@v2", pid=4321)
    assert reg.revision() > revision  # gateways refresh and route bot@v2 to it
    assert (added.lora_name, added.url, added.served_model, added.pid) == (
        "bot@v2",
        "http://10.0.0.5:8000",
        "bot@v2",
        4321,
    )
    assert added.created_at.tzinfo is not None
    by_url = deployments.add_deployment("bot", 1, "http://merged-bot-v1.svc:8000", "bot-v1")
    assert by_url.pid is None
    assert deployments.deployments() == [by_url, added]
    catalog = reg.snapshot()
    assert dict(catalog.deployments) == {"bot@v1": by_url, "bot@v2": added}
    assert catalog.revision == reg.revision()

    assert deployments.remove_deployment("bot", 2) == added
    assert deployments.deployments() == [by_url]
    assert dict(reg.snapshot().deployments) == {"bot@v1": by_url}
    with pytest.raises(NotFound, match="bot@v2 is not deployed") as caught:
        deployments.remove_deployment("bot", 2)
    assert caught.value.status_code == 404


def test_a_version_is_deployed_at_most_once(three_versions: Registry, deployments: DeploymentStore) -> None:
    reg = three_versions
    deployments.add_deployment("bot", 1, "http://127.0.0.1:9001", "bot@v1", pid=11)
    revision = reg.revision()
    with pytest.raises(
        Conflict, match=r"bot@v1 is already deployed at http://127.0.0.1:9001; .*quiver deploy rm bot@v1"
    ):
        deployments.add_deployment("bot", 1, "http://127.0.0.1:9002", "bot@v1")
    assert [d.url for d in deployments.deployments()] == ["http://127.0.0.1:9001"]
    assert reg.revision() == revision
    with pytest.raises(NotFound, match="no version v7"):
        deployments.add_deployment("bot", 7, "http://127.0.0.1:9003", "bot@v7")


def test_a_deployed_version_cannot_be_deleted(three_versions: Registry, deployments: DeploymentStore) -> None:
    reg = three_versions
    deployments.add_deployment("bot", 2, "http://127.0.0.1:9001", "bot@v2")
    with pytest.raises(
        Conflict, match=r"bot@v2 is deployed at http://127.0.0.1:9001; .*quiver deploy rm bot@v2"
    ) as caught:
        reg.delete_version("bot", 2)
    assert caught.value.status_code == 409
    assert reg.resolve("bot@v2").path.is_dir()
    deployments.remove_deployment("bot", 2)
    reg.delete_version("bot", 2)
    assert [v.number for v in reg.adapter("bot").versions] == [1, 3]


def test_deleting_a_version_removes_its_merges_and_merged_models(
    three_versions: Registry, deployments: DeploymentStore, tmp_path: Path
) -> None:
    reg = three_versions
    ours = merged_dir(tmp_path / "merged" / "bot@v1")
    theirs = tmp_path / "not-a-merge"  # recorded, but without the mark of Quiver's merge: left alone
    theirs.mkdir()
    deployments.record_merge("bot", 1, ours, merge_report())
    deployments.record_merge("bot", 1, theirs, merge_report())
    kept = deployments.record_merge("bot", 3, merged_dir(tmp_path / "merged" / "bot@v3"), merge_report())
    reg.delete_version("bot", 1)
    assert not ours.exists() and theirs.is_dir()
    assert deployments.merges("bot", 3) == [kept] and kept.path.is_dir()
    # A new bot@v1 is never made (numbers are not reused), so its merges are gone with it.
    with pytest.raises(NotFound, match="no version v1"):
        deployments.merges("bot", 1)


def test_a_database_from_before_merges_gains_their_tables(
    database_url: str, store: Path, base: BaseModelSpec, adapters_dir: Path
) -> None:
    engine = create_engine(database_url)
    older = [db.metadata.tables[t] for t in db.BASELINE_TABLES if t not in ("merges", "deployments")]
    db.metadata.create_all(engine, tables=older)
    with engine.begin() as conn:  # a database from before migrations: no tenant column either
        conn.execute(text("ALTER TABLE adapters DROP COLUMN tenant"))
    engine.dispose()
    with Registry.open(database_url, store, base=base) as reg:
        reg.push_dir("bot", adapters_dir / "seed0")
        deployments = DeploymentStore.beside(reg)
        assert deployments.add_deployment("bot", 1, "http://127.0.0.1:9001", "bot@v1").lora_name == "bot@v1"
        assert deployments.record_merge("bot", 1, store / "m", merge_report()).equivalent
