"""validate_adapter_dir: what vLLM can serve passes; each kind of bad adapter is refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters import BaseModelSpec, validate_adapter_dir
from core.errors import InvalidAdapter
from tests import factories as f

MAX_RANK = 16
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def good(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return f.make_lora_adapter(model, tmp_path_factory.mktemp("good") / "adapter")


def reject(directory: Path, base: BaseModelSpec | None, *fragments: str) -> InvalidAdapter:
    with pytest.raises(InvalidAdapter) as caught:
        validate_adapter_dir(directory, base, MAX_RANK)
    for fragment in fragments:
        assert fragment in caught.value.message
    assert caught.value.status_code == 422
    return caught.value


def test_peft_adapter_passes_and_is_described(good: Path, base: BaseModelSpec) -> None:
    info = validate_adapter_dir(good, base, MAX_RANK)
    assert (info.rank, info.alpha, info.target_modules) == (8, 16.0, ("q_proj", "v_proj"))
    assert info.tensor_count == 2 * 2 * 2  # layers x modules x (A, B)
    assert info.size_bytes == sum(p.stat().st_size for p in good.iterdir())
    assert info.manifest is None


def test_all_linear_targets_with_rank_pattern_pass(model: torch.nn.Module, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.make_lora_adapter(
        model, tmp_path / "a", rank=8, target_modules=ALL_LINEAR, rank_pattern={"v_proj": 4, "down_proj": 16}
    )
    info = validate_adapter_dir(adapter, base, MAX_RANK)
    assert info.rank == 16
    assert info.target_modules == tuple(sorted(ALL_LINEAR))


def test_rank_at_the_limit_passes(model: torch.nn.Module, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.make_lora_adapter(model, tmp_path / "a", rank=MAX_RANK)
    assert validate_adapter_dir(adapter, base, MAX_RANK).rank == MAX_RANK


def test_without_a_base_spec_the_adapter_is_checked_on_its_own(good: Path, tmp_path: Path) -> None:
    assert validate_adapter_dir(good, None, MAX_RANK).rank == 8
    # A layer the base lacks cannot be noticed without the base ...
    assert validate_adapter_dir(f.with_missing_layer(good, tmp_path / "layer"), None, MAX_RANK).rank == 8

    # ... but a B whose rank disagrees with A and with r still is.
    def shrink_rank(tensors: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        tensors[key] = tensors[key][:, :4].contiguous()

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "rank"), shrink_rank)
    reject(adapter, None, "q_proj.lora_B.weight' has shape [32, 4], expected [32, 8]")


BAD: list[tuple[Callable[[Path, Path], Path], tuple[str, ...], str | None]] = [
    (f.with_dora, ("DoRA", "use_dora"), "use_dora"),
    (f.with_modules_to_save, ("modules_to_save", "lm_head"), "modules_to_save"),
    (f.with_bias_config, ("bias 'all'",), "bias"),
    (f.with_bias_tensor, ("lora_B.bias", "is a bias"), None),
    (f.with_rank, ("r = 64", "max LoRA rank 16"), "r"),
    (f.with_nan, ("lora_A.weight", "1 non-finite"), None),
    (
        f.with_wrong_shape,
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", "[33, 8], expected [32, 8]"),
        None,
    ),
    (
        f.with_missing_layer,
        ("layer 'model.layers.999.self_attn.q_proj' does not exist in base model LlamaForCausalLM",),
        None,
    ),
    (f.with_pickle, ("'adapter_model.bin' is a pickle file", "only safetensors"), None),
    (f.with_peft_type, ("peft_type 'IA3'", "only LORA"), "peft_type"),
]


@pytest.mark.parametrize(("make_bad", "fragments", "param"), BAD, ids=[b[0].__name__ for b in BAD])
def test_bad_adapter_is_refused_naming_the_problem(
    make_bad: Callable[[Path, Path], Path],
    fragments: tuple[str, ...],
    param: str | None,
    good: Path,
    base: BaseModelSpec,
    tmp_path: Path,
) -> None:
    error = reject(make_bad(good, tmp_path / "bad"), base, *fragments)
    assert error.param == param


@pytest.mark.parametrize(
    ("targets", "fragment"),
    [(("q_proj", "lm_head"), "layer 'lm_head' is an embedding or the LM head"), (("embed_tokens",), "embedding")],
)
def test_lora_on_embeddings_or_lm_head_is_refused(
    targets: tuple[str, ...], fragment: str, model: torch.nn.Module, base: BaseModelSpec, tmp_path: Path
) -> None:
    adapter = f.make_lora_adapter(model, tmp_path / "a", target_modules=targets)
    reject(adapter, base, fragment)
    reject(adapter, None, fragment)


def test_rank_pattern_above_the_limit_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.edit_config(f.copy_adapter(good, tmp_path / "a"), rank_pattern={"v_proj": 32})
    assert reject(adapter, base, "rank_pattern['v_proj'] = 32", "max LoRA rank 16").param == "rank_pattern"


@pytest.mark.parametrize("r", [0, -4, "8", None, True])
def test_rank_must_be_a_positive_integer(r: object, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.edit_config(f.copy_adapter(good, tmp_path / "a"), r=r)
    assert reject(adapter, base, "r must be a positive integer").param == "r"


def test_lora_bias_flag_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.edit_config(f.copy_adapter(good, tmp_path / "a"), lora_bias=True)
    assert reject(adapter, base, "lora_bias").param == "lora_bias"


def test_rank_pattern_changes_the_expected_shapes(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    # The tensors are rank 8; a pattern claiming rank 4 for v_proj makes them wrong.
    adapter = f.edit_config(f.copy_adapter(good, tmp_path / "a"), rank_pattern={"v_proj": 4})
    reject(adapter, base, "v_proj.lora_A.weight' has shape [8, 32], expected [4, 32] (rank 4")


def test_unknown_file_is_refused_by_name(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    (adapter / "training_args.json").write_text("{}")
    reject(adapter, base, "unexpected file 'training_args.json'", "adapter_config.json")


def test_subdirectory_and_symlink_are_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    nested = f.copy_adapter(good, tmp_path / "nested")
    (nested / "checkpoint-1").mkdir()
    reject(nested, base, "'checkpoint-1' is not a regular file")
    linked = f.copy_adapter(good, tmp_path / "linked")
    (linked / "README.md").unlink()
    (linked / "README.md").symlink_to("/etc/passwd")
    reject(linked, base, "'README.md' is not a regular file")


def test_readme_and_manifest_are_optional(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    (adapter / "README.md").unlink()
    assert validate_adapter_dir(adapter, base, MAX_RANK).manifest is None
    (adapter / "quiver_manifest.json").write_text(json.dumps({"dataset": "faq-v2", "eval": {"acc": 0.9}}))
    assert validate_adapter_dir(adapter, base, MAX_RANK).manifest == {"dataset": "faq-v2", "eval": {"acc": 0.9}}
    (adapter / "quiver_manifest.json").write_text("[1, 2]")
    reject(adapter, base, "quiver_manifest.json must hold a JSON object")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_missing_required_file_is_named(missing: str, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    (adapter / missing).unlink()
    reject(adapter, base, f"missing {missing}")


def test_config_must_be_json(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    (adapter / "adapter_config.json").write_text("{'r': 8}")
    reject(adapter, base, "adapter_config.json is not valid JSON")


def test_unreadable_safetensors_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    reject(adapter, base, "adapter_model.safetensors is not a readable safetensors file")


def test_unexpected_tensor_name_is_refused_by_name(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    def add_named_adapter(tensors: dict[str, torch.Tensor]) -> None:
        # How an in-memory PEFT state dict looks: with the adapter name, which saved files never have.
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        tensors[key] = torch.zeros(8, 32)

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "a"), add_named_adapter)
    reject(adapter, base, "unexpected tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'")


def test_full_base_weight_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    def add_lm_head(tensors: dict[str, torch.Tensor]) -> None:
        tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 32)

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "a"), add_lm_head)
    reject(adapter, base, "'base_model.model.lm_head.weight' is a full base-model weight")


def test_half_of_a_pair_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    def drop_b(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "a"), drop_b)
    reject(adapter, base, "layer 'model.layers.1.self_attn.v_proj' has no lora_B tensor")


def test_integer_weights_are_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        tensors[key] = tensors[key].to(torch.int32)

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "a"), to_int)
    reject(adapter, base, "dtype torch.int32", "floating point")


def test_infinite_half_precision_weight_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    def overflow(tensors: dict[str, torch.Tensor]) -> None:
        key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
        tensors[key] = tensors[key].to(torch.bfloat16)
        tensors[key][3, 3] = float("inf")

    adapter = f.edit_weights(f.copy_adapter(good, tmp_path / "a"), overflow)
    reject(adapter, base, "layers.1.self_attn.q_proj.lora_B.weight' has 1 non-finite")


def test_empty_weights_file_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    save_file({}, adapter / "adapter_model.safetensors")
    reject(adapter, base, "holds no LoRA tensors")


def test_base_spec_from_a_model_dir(tmp_path: Path) -> None:
    f.save_tiny_llama(tmp_path)
    spec = BaseModelSpec.from_model_dir(tmp_path)
    assert spec.name == str(tmp_path)
    assert spec.architecture == "LlamaForCausalLM"
    assert spec.linear_shapes["model.layers.1.self_attn.k_proj"] == (32, 16)  # 2 kv heads x head_dim 8
    assert spec.linear_shapes["model.layers.0.mlp.down_proj"] == (48, 32)
    assert len(spec.linear_shapes) == 2 * 7 + 1  # 7 per layer, and lm_head
    assert spec.embedding_modules == {"model.embed_tokens", "lm_head"}


FLOAT_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.float8_e4m3fnuz,
    torch.float8_e5m2,
    torch.float8_e5m2fnuz,
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_adapter_in_any_float_dtype_passes(dtype: torch.dtype, good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.with_dtype(f.copy_adapter(good, tmp_path / "a"), dtype)
    assert validate_adapter_dir(adapter, base, MAX_RANK).rank == 8


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_non_finite_values_are_counted_as_torch_counts_them(
    dtype: torch.dtype, good: Path, base: BaseModelSpec, tmp_path: Path
) -> None:
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    poisoned: list[torch.Tensor] = []

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        tensor = tensors[key].clone()
        tensor[2, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        tensors[key] = tensor.to(dtype)  # float8_e4m3fn has no inf: it saturates, and only the NaN counts
        poisoned.append(tensors[key])

    adapter = f.edit_weights(f.with_dtype(f.copy_adapter(good, tmp_path / "a"), dtype), poison)
    expected = int((~torch.isfinite(poisoned[0].float())).sum())
    assert expected in (1, 3)
    reject(adapter, base, f"tensor '{key}' has {expected} non-finite values")


def test_truncated_safetensors_is_refused(good: Path, base: BaseModelSpec, tmp_path: Path) -> None:
    adapter = f.copy_adapter(good, tmp_path / "a")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    reject(adapter, base, "not a readable safetensors file", "tensors end at byte")
