"""One set of image ops shared by training augmentation, Fast AutoAugment and test-time augmentation.

``functional``: batched tensor ops (PIL semantics); ``ops``: the FAA op table ``FAA_OPS``;
``policy``: FAA-style policies, their JSON format and batched application.
"""

from ltta.transforms.ops import FAA_OPS, OpDef, apply_op, magnitude, op_names
from ltta.transforms.policy import (
    CompiledPolicy,
    OpSpec,
    Policy,
    apply_policy,
    apply_subpolicy,
    load_policy,
    policy_from_dict,
    policy_to_dict,
    remove_duplicate_subpolicies,
    save_policy,
    validate_policy,
)

__all__ = [
    "FAA_OPS",
    "CompiledPolicy",
    "OpDef",
    "OpSpec",
    "Policy",
    "apply_op",
    "apply_policy",
    "apply_subpolicy",
    "load_policy",
    "magnitude",
    "op_names",
    "policy_from_dict",
    "policy_to_dict",
    "remove_duplicate_subpolicies",
    "save_policy",
    "validate_policy",
]
