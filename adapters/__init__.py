"""The adapter registry: validated, immutable, versioned LoRA adapters with aliases.

from adapters import Registry, BaseModelSpec
registry = Registry.open("sqlite:///quiver.db", Path("store"), base=BaseModelSpec.from_model_dir(model))
registry.push_dir("support-bot", Path("out/adapter"))      # -> support-bot@v1
registry.set_alias("support-bot", "prod", 1)
registry.resolve("support-bot").path                       # the directory vLLM loads
registry.snapshot().deployments                            # versions served by a merged model of their own

Merges and deployments are a store of their own over the same database, ``DeploymentStore.beside(registry)``;
keys, tenants and usage are ``access.store``'s, over ``registry.database``.

Merging (``adapters.merge.merge_version``) imports PEFT, so it is not imported here.
"""

from adapters.archive import UploadLimits
from adapters.catalog import (
    Adapter,
    AdapterRouting,
    AdapterVersion,
    Catalog,
    Deployment,
    Merge,
    parse_lora_name,
)
from adapters.deployments import DeploymentStore
from adapters.registry import PushResult, Registry
from adapters.spec import BaseModelSpec
from adapters.validation import AdapterInfo, validate_adapter_dir

__all__ = [
    "Adapter",
    "AdapterInfo",
    "AdapterRouting",
    "AdapterVersion",
    "BaseModelSpec",
    "Catalog",
    "Deployment",
    "DeploymentStore",
    "Merge",
    "PushResult",
    "Registry",
    "UploadLimits",
    "parse_lora_name",
    "validate_adapter_dir",
]
