"""The typed schema of ``params.yaml``: every knob of every stage, checked before any work starts.

An unknown key, a wrong type or an out-of-range value stops the stage with the key's dotted
name and what is allowed (``train_target.epochs: must be >= 1 (got -1)``). Stages read params
through :func:`load_params`; the library itself never sees this file, it takes plain arguments.

A value that names a registry member (an architecture, a test-time candidate, an RDB URL's
dialect) is checked against that registry here, so ``ltta check-params`` refuses what the stage
would refuse later. Those registries import torch (or SQLAlchemy), so their validators import them
lazily: ``import ltta.config`` stays as cheap as its own imports.

Why one module: it is ``params.yaml`` as types, one class per section in the file's order, and
the cross-section checks (a stage reading another's keys) need every section at hand; read side by
side with the file, one module is what a user checks a key against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator

from ltta.corruptions.names import ALL_CORRUPTIONS, EXTRA, FAMILIES

PositiveInt = Annotated[int, Field(ge=1)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def known_corruptions(names: list[str]) -> list[str]:
    """Every name must be one of the benchmark's 19 corruptions."""
    unknown = [n for n in names if n not in ALL_CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; allowed: {', '.join(ALL_CORRUPTIONS)}")
    return names


#: Registered models that are no target classifier: the loss predictors take ``num_outputs``, not
#: ``num_classes``; the aggregators take the views' logits.
NOT_TARGET_ARCHS = frozenset({"loss_predictor", "feature_head", "agg_aug", "agg_class", "published"})


def target_arch(name: str) -> str:
    """``train_target.arch`` must be a classifier of :data:`ltta.models.MODELS`, the one list of
    architectures (else ``build_model`` fails only once the stage runs, after data preparation)."""
    from ltta.models import MODELS  # lazy: pulls in torch

    known = sorted(n for n in MODELS.names() if n not in NOT_TARGET_ARCHS)
    if name not in known:
        raise ValueError(f"unknown target architecture {name!r}; known: {', '.join(known)}")
    return name


def known_candidates(names: str | list[str]) -> str | list[str]:
    """A list of candidates must build as ``build_loss_dataset`` builds it: each name parses (the
    candidate parser of :mod:`ltta.tta.candidates` defines the syntax), none repeats, one is identity."""
    if isinstance(names, str):
        return names  # a preset; the Literal has checked it
    from ltta.tta.candidates import build_candidates, identity_index  # lazy: pulls in torch

    try:
        identity_index(build_candidates(names))
    except (KeyError, ValueError) as exc:  # Registry.get raises KeyError for an unknown action
        raise ValueError(f"{exc.args[0]} (write e.g. [identity, rotate:20, zoom:0.8+hflip], or 'all' / 'paper')") from None
    return names


#: Examples of the RDB URLs that Optuna's RDBStorage (through SQLAlchemy) opens.
STORAGE_EXAMPLES = ("sqlite:///policies/faa_search.db", "postgresql://user:pass@host/db", "mysql://user:pass@host/db")


#: URI schemes a model may come from instead of a file (MLflow's registry and run artifacts).
MODEL_URI_SCHEMES = ("models:/", "runs:/")


def model_source(value: str) -> str:
    """A model file (``models/target.pt``) or an MLflow model URI (``models:/ltta-target@champion``)."""
    if ":/" in value and not value.startswith(MODEL_URI_SCHEMES):
        raise ValueError(
            f"{value!r} is neither a model file nor an MLflow model URI; use a path such as models/target.pt, "
            "models:/<name>@<alias> (e.g. models:/ltta-target@champion), models:/<name>/<version> or runs:/<run id>/<model>"
        )
    rest = value.removeprefix("models:/").strip("/")
    if value.startswith("models:/") and "@" not in rest and "/" not in rest:
        raise ValueError(f"{value!r} names no version or alias; use models:/<name>@<alias> or models:/<name>/<version>")
    return value


ModelSource = Annotated[str, Field(min_length=1)]


def rdb_url(url: str | None) -> str | None:
    """``search_policy.storage`` must be a URL whose dialect SQLAlchemy knows: ``make_storage`` hands it to
    Optuna's RDBStorage, which would refuse ``sqlit:///x.db`` only after the search's fold models trained."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url  # lazy: only when a storage is set
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(url).get_dialect()
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ValueError(
            f"not an RDB URL SQLAlchemy can open ({exc}); write e.g. {', '.join(STORAGE_EXAMPLES)}, or null for in memory"
        ) from None
    return url


class _Section(BaseModel):
    """Strict base: unknown keys are errors, values are not silently coerced across types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(_Section):
    source: Literal["digits", "cifar10", "cifar100", "npz", "folder"] = "digits"
    path: str | None = None  # the .npz file or image folder for source npz / folder
    url: str | None = None  # a mirror of the official archive (CIFAR sources)
    md5: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{32}$")] | None = None  # the archive's, if not the official
    root: str = "data/raw"  # where downloads are kept
    image_size: PositiveInt = 32
    test_fraction: Fraction = 0.2  # held out as test when the source has no official test split
    max_train: PositiveInt | None = None  # stratified cap on training images (None: all)
    max_test: PositiveInt | None = None  # stratified cap on test images (None: all)
    valid_loss_fraction: Fraction = 0.2  # the paper's train_loss / valid_loss split of the training data

    @model_validator(mode="after")
    def _path_for_local_sources(self) -> DataParams:
        if self.source in ("npz", "folder") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


#: The data sources with an official corrupted release (``ltta.data.corrupted_release.RELEASES``,
#: named here so that reading params needs no torch; a test keeps the two equal).
OFFICIAL_CORRUPTED = ("cifar10", "cifar100")


class CorruptionParams(_Section):
    # generated: our generator corrupts the test split (any data source); official: the released
    # CIFAR-10-C / CIFAR-100-C files (Zenodo), the ones every published CIFAR-C number was measured on.
    source: Literal["generated", "official"] = "generated"
    url: str | None = None  # official: a mirror of the release archive (its URL or its folder)
    md5: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{32}$")] | None = None  # official: a mirror's own archive md5
    names: list[str] = Field(min_length=1)
    max_images: PositiveInt | None = None  # corrupt only this many test images (stratified)

    _known = field_validator("names")(classmethod(lambda cls, v: known_corruptions(v)))


#: train_target.policy's default: a policy whose one op never fires (conf/policies/none.json).
NO_POLICY = "conf/policies/none.json"


def target_source(value: str) -> str:
    """``train_target.source`` parses (:func:`ltta.models.published.parse_source`): refused before any stage runs."""
    from ltta.models.published import parse_source  # lazy: pulls in torch

    parse_source(value)
    return value


class TrainTargetParams(_Section):
    # train: the stage trains the target; checkpoint:<path> / torchvision:<model>[:<weights>]: a published
    # target, written as models/target.pt without training (ltta.models.published).
    source: str = "train"
    arch: str = "small_cnn"
    width: PositiveInt | None = None  # architecture width (small_cnn); None: the architecture's default
    # standard: crop+flip; augmix: + AugMix views and the JSD consistency loss (Hendrycks et al. 2020);
    # policy: a Fast AutoAugment policy (``policy``) before crop/flip, then ``cutout`` (Lim et al. 2019);
    # auxiliary: Auxiliary Training's heads, selective BN and self-distillation (Zhang et al., CVPR 2020).
    mode: Literal["standard", "augmix", "policy", "auxiliary"] = "standard"
    # The policy file mode ``policy`` trains with, and a DVC dep of train_target in every mode: the
    # default is the empty policy, so other modes do not wait for (or rerun after) the search.
    policy: str = NO_POLICY
    cutout: Annotated[int, Field(ge=0)] = 0  # side in px of the training cutout after crop/flip (FAA: 16), 0: off
    epochs: PositiveInt = 15
    batch_size: PositiveInt = 128
    lr: Annotated[float, Field(gt=0.0)] = 0.1  # peak learning rate (SGD)
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    nesterov: bool = True
    weight_decay: Annotated[float, Field(ge=0.0)] = 5e-4
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True
    compile: bool = False  # torch.compile the model
    # reduce-overhead: CUDA graphs (the fast path at batch 128 on a GPU); see TrainConfig.compile_mode
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "reduce-overhead"
    min_lr: Annotated[float, Field(ge=0.0)] = 0.0  # floor of the cosine schedule (AugMix: 1e-6)
    jsd_weight: Annotated[float, Field(ge=0.0)] = 12.0  # augmix: weight of the Jensen-Shannon term
    augmix_width: PositiveInt = 3  # augmix: chains per mixture
    augmix_depth: Annotated[int, Field(ge=-1, le=10)] = -1  # augmix: ops per chain (-1: uniform 1..3)
    augmix_severity: Annotated[int, Field(ge=1, le=10)] = 3  # augmix: op strength
    # auxiliary (TrainConfig.aux_*; ltta.training.modes.auxiliary): one head per family, the reference's weights.
    aux_families: list[Literal["blur", "noise", "contrast", "rotate"]] = Field(
        default_factory=lambda: ["blur", "noise", "contrast", "rotate"], min_length=1
    )
    aux_ce_weight: Annotated[float, Field(ge=0.0)] = 0.05  # each head's cross-entropy (alpha)
    aux_distill_weight: Annotated[float, Field(ge=0.0)] = 0.05  # each head's KL to the clean prediction (lambda)
    aux_temperature: Annotated[float, Field(gt=0.0)] = 1.0  # distillation temperature
    aux_merge_weight: Annotated[float, Field(ge=0.0)] = 1.0  # L2 tying the heads' fc to the primary fc, once on
    aux_merge_start: Probability = 0.857  # fraction of the epochs before that penalty is on (180 of 210)
    # Benchmark corruptions mixed into the training images (studies augmix_plus and blur_train), each
    # image corrupted with probability corruption_p; the 4 extras never (Params._held_out_stays_out).
    corruptions: list[str] = Field(default_factory=list)
    corruption_p: Probability = 0.4

    _known = field_validator("corruptions")(classmethod(lambda cls, v: known_corruptions(v)))
    _arch = field_validator("arch")(classmethod(lambda cls, v: target_arch(v)))
    _source = field_validator("source")(classmethod(lambda cls, v: target_source(v)))

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainTargetParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"train_target.warmup_epochs ({self.warmup_epochs}) must be < epochs ({self.epochs})")
        return self

    @model_validator(mode="after")
    def _policy_fits_mode(self) -> TrainTargetParams:
        if self.mode == "policy" and self.policy == NO_POLICY:
            raise ValueError(
                "train_target.mode is 'policy' but train_target.policy is the empty policy; set train_target.policy: "
                "policies/faa.json (the search_policy stage's output) or the path of another policy file"
            )
        if self.mode == "augmix" and self.cutout:
            raise ValueError("train_target.cutout must be 0 with mode 'augmix' (AugMix's recipe has no cutout)")
        if self.mode == "auxiliary" and self.cutout:
            raise ValueError(
                "train_target.cutout must be 0 with mode 'auxiliary' (Auxiliary Training's recipe has no cutout)"
            )
        if len(set(self.aux_families)) != len(self.aux_families):
            raise ValueError(f"train_target.aux_families must not repeat a family (got {self.aux_families})")
        return self


class LossDatasetParams(_Section):
    candidates: Literal["all", "paper"] | list[str] = "all"
    duplication: PositiveInt = 3  # copies of each training image (the public code's num_duplication)
    p_aug: Probability = 0.4  # probability of each random rotation / zoom / brightness / corruption
    corruptions: list[str] = Field(default_factory=list)  # corruptions mixed into the predictor's inputs
    batch_size: PositiveInt = 512
    target: ModelSource = "models/target.pt"  # the frozen target: its file, or an MLflow model URI

    _known = field_validator("corruptions")(classmethod(lambda cls, v: known_corruptions(v)))
    _candidates = field_validator("candidates")(classmethod(lambda cls, v: known_candidates(v)))
    _target = field_validator("target")(classmethod(lambda cls, v: model_source(v)))


class SorterParams(_Section):
    """SoDeep's sorter (ltta.predictor.sodeep.SorterConfig); defaults are SoDeep's train.py. Its sequence length
    is the candidate count and its seed the global seed; ~563k steps in all: shrink sequences_per_epoch."""

    model: Literal["gruc", "lstm", "lstm_large"] = "gruc"  # gruc: learning-loss-for-tta's; lstm_large: SoDeep's
    epochs: PositiveInt = 400
    sequences_per_epoch: PositiveInt = 360_000  # fresh synthetic sequences per epoch (steps = this / batch_size)
    batch_size: PositiveInt = 256
    lr: Annotated[float, Field(gt=0.0)] = 1e-3  # Adam, halved every lr_step_epochs
    lr_step_epochs: PositiveInt = 70
    valid_sequences: PositiveInt = 40_000  # the best-validation-L1 epoch is kept


class FeatureHeadParams(_Section):
    """The loss predictor that reads the frozen target's features (``feat_pick``, issue 22)."""

    hidden: PositiveInt = 128  # the head's hidden width
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128  # loss-dataset rows per step
    lr: Annotated[float, Field(gt=0.0)] = 0.01  # rmsprop_tf, cosine to 0, EMA as the trunk's
    objective: Literal["listwise", "sodeep_style", "spearman"] = "listwise"
    tau: Annotated[float, Field(gt=0.0)] = 1.0  # softmin temperature of the target distribution


class TrainPredictorParams(_Section):
    width: PositiveInt = 32
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 128  # loss-dataset rows per step (the public code: 128 images x 6 = 768 rows)
    lr: Annotated[float, Field(gt=0.0)] = 0.01
    optimizer: Literal["rmsprop_tf", "adam", "sgd"] = "rmsprop_tf"
    weight_decay: Annotated[float, Field(ge=0.0)] = 1e-5
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    tau: Annotated[float, Field(gt=0.0)] = 1.0  # softmin temperature of the target ranking
    rank_temperature: Annotated[float, Field(gt=0.0)] = 0.01  # soft-rank temperature
    objective: Literal["sodeep_style", "spearman", "listwise"] = "sodeep_style"
    # The differentiable ranking inside the objective (ltta.predictor.ranking.RANKERS): pairwise_sigmoid |
    # soft_rank (Blondel et al. 2020) | sodeep (a SoDeep sorter trained on synthetic sequences, frozen).
    ranker: Literal["pairwise_sigmoid", "soft_rank", "sodeep"] = "pairwise_sigmoid"
    sorter: SorterParams = SorterParams()  # ranker sodeep: the sorter and its training
    cutout: Annotated[float, Field(ge=0.0)] = 1.0  # cutout side / image side on predictor inputs (0: off)
    feature_head: FeatureHeadParams | None = FeatureHeadParams()  # None: train no feature head


class SearchPolicyParams(_Section):
    folds: PositiveInt = 5  # K
    fold_ratio: Fraction = 0.4  # share of each fold in D_A
    trials: PositiveInt = 200  # B, TPE trials per fold
    policies: PositiveInt = 5  # sub-policies per candidate policy
    ops: PositiveInt = 2  # ops per sub-policy
    top_n: PositiveInt = 10  # N best trials per fold merged into the final policy
    repeats: PositiveInt = 1  # T
    max_images: PositiveInt | None = 4000  # reduced search set (FAA: 4,000 CIFAR-10 images)
    epochs: PositiveInt = 20  # epochs of each fold's D_M model
    storage: str | None = None  # Optuna RDB URL for resumable / distributed search; None: in memory

    _storage = field_validator("storage")(classmethod(lambda cls, v: rdb_url(v)))


class SearchGPSParams(_Section):
    """Greedy policy search (Molchanov et al. 2020; :mod:`ltta.tta.gps`) on the loss dataset's valid_loss images."""

    length: PositiveInt = 5  # members of the searched policy (method gps uses the first evaluate.k)
    random_subpolicies: Annotated[int, Field(ge=0)] = 100  # pool: FAA-op sub-policies, random levels, + crop/flip
    ops_per_subpolicy: PositiveInt = 3  # ops per random sub-policy (the reference's RandAugment N = 3)
    crop_flip_samples: Annotated[int, Field(ge=0)] = 20  # pool: draws of the pad-4 crop + flip alone
    calibrate: bool = True  # select by the calibrated log-likelihood (temperature fitted per step, as the paper)
    batch_size: PositiveInt = 512
    target: ModelSource = "models/target.pt"

    _source = field_validator("target")(classmethod(lambda cls, v: model_source(v)))


class FitAggregationParams(_Section):
    """Learned aggregation (Shanmugam et al. 2021; :mod:`ltta.tta.aggregation`) on the valid_loss images."""

    epochs: PositiveInt = 30  # the reference: 30 (ClassTTA), 15-20 (AugTTA)
    lr: Annotated[float, Field(gt=0.0)] = 0.01  # SGD, momentum 0.9, weight decay 1e-4, as the reference
    batch_size: PositiveInt = 1000  # validation images per step
    target: ModelSource = "models/target.pt"

    _source = field_validator("target")(classmethod(lambda cls, v: model_source(v)))


class EvaluateParams(_Section):
    methods: list[
        Literal["none", "flip", "five_crop", "ten_crop", "random", "policy", "learned", "prior", "oracle",
                "feat_pick", "bn_adapt", "tent", "gps", "agg_aug", "agg_class"]
    ] = Field(min_length=1)
    k: PositiveInt = 3  # views chosen by random / policy / learned / prior TTA
    # learned: topk (k distinct views, the paper's text) | eval_l2t (the public script: identity, once
    # picked, fills the remaining views; threshold: fall back to identity below threshold x its score)
    # | abstain (identity alone unless the predicted gain exceeds the margin chosen on valid_loss)
    selection: Literal["topk", "eval_l2t", "abstain"] = "topk"
    threshold: Annotated[float, Field(ge=0)] = 0.0
    feature_selection: Literal["topk", "abstain"] = "topk"  # feat_pick: how its scores pick views
    bn_prior: Annotated[float, Field(ge=0)] = 0.0  # bn_adapt: prior strength N of the source statistics
    baseline: str = "none"  # the method that mCE is relative to
    batch_size: PositiveInt = 512
    # The published setting test-time adaptation runs under (ltta.evaluation.protocols.PROTOCOLS): its
    # per-method test-stream batches; batch_sizes overrides single methods ({tent: 128}).
    protocol: Literal["ltta", "tent"] = "ltta"
    batch_sizes: dict[str, PositiveInt] = Field(default_factory=dict)
    severities: list[Annotated[int, Field(ge=1, le=5)]] = Field(default=[1, 2, 3, 4, 5], min_length=1)
    max_images: PositiveInt | None = None  # cap on clean and corrupted test images per set
    target: ModelSource = "models/target.pt"  # the target: its file, or an MLflow model URI
    predictor: ModelSource = "models/predictor.pt"  # the loss predictor: its file, or an MLflow model URI
    feature_head: ModelSource = "models/feature_head.pt"  # feat_pick's head: its file, or an MLflow model URI

    _sources = field_validator("target", "predictor", "feature_head")(classmethod(lambda cls, v: model_source(v)))

    @model_validator(mode="after")
    def _baseline_in_methods(self) -> EvaluateParams:
        if self.baseline not in self.methods:
            raise ValueError(f"evaluate.baseline {self.baseline!r} must be one of evaluate.methods {self.methods}")
        return self

    @model_validator(mode="after")
    def _batch_sizes_name_methods(self) -> EvaluateParams:
        unknown = sorted(set(self.batch_sizes) - set(self.methods))
        if unknown:
            raise ValueError(f"evaluate.batch_sizes names {unknown}, not among evaluate.methods {self.methods}; "
                             "give a batch size only to a method that is evaluated")
        return self

    @model_validator(mode="after")
    def _threshold_needs_eval_l2t(self) -> EvaluateParams:
        if self.threshold > 0 and self.selection != "eval_l2t":
            raise ValueError(
                f"evaluate.threshold {self.threshold} is the public script's fallback to identity; "
                "it needs evaluate.selection: eval_l2t (or set threshold: 0)"
            )
        return self


class TrackingParams(_Section):
    experiment: str = "ltta"
    register_models: bool = True
    # An HTTP tracking server that is down, slow or failing is retried with exponential backoff for
    # about this long (before a stage's run opens, and by each MLflow request in it), then the stage fails.
    retry_seconds: Annotated[float, Field(ge=0.0)] = 120.0
    request_timeout: Annotated[float, Field(gt=0.0)] = 30.0  # seconds one request to the server may take


class PromoteParams(_Section):
    """``ltta promote``: when the registered candidate replaces the champion (ltta.promotion)."""

    model: str = "ltta-tta"  # the registered model whose aliases move (its target and predictor follow)
    metric: str = "learned.mean_corruption_error"  # a metric of the evaluate run that logged the model
    mode: Literal["min", "max"] = "min"  # min: lower wins (errors, NLL); max: higher wins; ties keep the champion


class Params(_Section):
    profile: str = "digits"  # name of the profile these values came from (informational)
    study: str = "standard"  # name of the study (conf/study/) these values came from (informational)
    # The corruption family held out of every training (conf/unseen/): checked against the lists below.
    unseen: Literal["none", "noise", "blur", "weather", "digital"] = "none"
    seed: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams
    corruptions: CorruptionParams
    train_target: TrainTargetParams
    loss_dataset: LossDatasetParams
    train_predictor: TrainPredictorParams
    search_policy: SearchPolicyParams
    search_gps: SearchGPSParams = SearchGPSParams()
    fit_aggregation: FitAggregationParams = FitAggregationParams()
    evaluate: EvaluateParams
    tracking: TrackingParams = TrackingParams()
    promote: PromoteParams = PromoteParams()

    @model_validator(mode="after")
    def _release_fits_data(self) -> Params:
        """The official release corrupts one dataset's 32 px test set: refuse any other pairing up front."""
        if self.corruptions.source != "official":
            return self
        if self.data.source not in OFFICIAL_CORRUPTED:
            raise ValueError(
                f"corruptions.source=official needs data.source in {list(OFFICIAL_CORRUPTED)} (the datasets with a "
                f"released corrupted set), got {self.data.source!r}; set corruptions.source=generated"
            )
        if self.data.image_size != 32:
            raise ValueError(
                f"corruptions.source=official holds 32 px images, but data.image_size is {self.data.image_size}; "
                f"set data.image_size=32 or corruptions.source=generated"
            )
        return self

    @model_validator(mode="after")
    def _held_out_stays_out(self) -> Params:
        """The 4 extras, and the ``unseen`` family, are test-only: neither the predictor's inputs nor
        the target's training images may contain them (the public code trains on the 15 only)."""
        held_out = set(EXTRA) | (set(FAMILIES[self.unseen]) if self.unseen != "none" else set())
        for key, names in (("loss_dataset.corruptions", self.loss_dataset.corruptions),
                           ("train_target.corruptions", self.train_target.corruptions)):
            leaked = [n for n in names if n in held_out]
            if leaked:
                why = f"the unseen family {self.unseen!r} and " if self.unseen != "none" else ""
                raise ValueError(
                    f"{key} contains {leaked}, but {why}the extras ({', '.join(EXTRA)}) are held out of training; "
                    f"remove them from {key} (or choose another unseen family)"
                )
        return self


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid; the message names each bad key."""


def _error_message(e: Any) -> str:
    """One pydantic error as the user should read it: our validators' own words, and the bad value."""
    if e["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see params.yaml's documented keys)"
    # Our validators' messages already say what is wrong; pydantic's "Value error, " prefix adds nothing.
    msg = str(e["ctx"]["error"]) if e["type"] == "value_error" and "ctx" in e else e["msg"]
    # A section's or the file's check gets the whole mapping as input: naming the key is enough there.
    if "input" in e and e["type"] != "missing" and e["loc"] and not isinstance(e["input"], dict):
        msg = f"{msg} (got {e['input']!r})"
    return msg


def _format_errors(err: ValidationError) -> str:
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or '<top level>'}: {_error_message(e)}" for e in err.errors())


def parse_params(raw: Any, source: str = "params") -> Params:
    """Validate an already-loaded mapping."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(f"{source} is invalid:\n{_format_errors(err)}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; every problem is reported at once, by key."""
    p = Path(path)
    if not p.exists():
        raise ParamsError(f"{p} not found: run from the project root, or pass --params PATH")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{p} is not valid YAML: {exc}") from None
    return parse_params(raw, str(p))
