"""The typed configuration of an RLMT run (``rlmt-train CONFIG.yaml key=value ...``).

One YAML file, validated at load: unknown keys, wrong types and impossible combinations fail
with the field's dotted path and the file name. ``key.sub=value`` overrides on the command line
are parsed as YAML scalars (``lr=1e-6``, ``algorithm.name=ppo``, ``data.prompts=[a.parquet]``).

Defaults are the paper's GRPO recipe; ``docs/rlmt_train.md`` ("Configuration reference") lists
every field and default, and the recipes under ``examples/`` restate them for each method.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from rlmt_megatron.config.base import StrictModel, load_config
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.config.optim import BatchingConfig, OptimConfig
from rlmt_megatron.monitoring.metrics import MonitoringConfig
from rlmt_megatron.rollout.weight_sync.select import WeightSyncConfig
from rlmt_megatron.thinking.templates import ThinkingFormatConfig


class RunConfig(StrictModel):
    out_dir: str = Field("runs/rlmt", description="everything the run writes goes here")
    seed: int = 1234
    total_steps: PositiveInt = 120
    save_every: NonNegativeInt = Field(20, description="checkpoint every N steps (0 = only at the end)")
    keep_last: PositiveInt = Field(2, description="checkpoints kept (older ones are deleted)")
    resume: str = Field("auto", description="auto: latest complete checkpoint in out_dir if any; never; or a path")
    overwrite: Literal["refuse", "backup"] = Field(
        "refuse", description="a fresh start in an out_dir holding a previous run's outputs: refuse, or backup (move "
        "them to out_dir/previous_runs/<UTC time>/); see trainer/run_folder.py")
    export_hf: bool = Field(True, description="write the final policy as an HF folder (out_dir/final_hf)")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms (tests, debugging)")
    # Fault handling (trainer/stop.py, trainer/watchdog.py, trainer/rollout_supervisor.py)
    collective_timeout_minutes: Optional[PositiveFloat] = Field(
        None, description="torch.distributed timeout: a collective waiting longer fails instead of hanging; must "
        "exceed rollout.timeout_s (the other ranks wait for the engine hosts); null: rollout.timeout_s + 10 min, at least 30")
    watchdog_timeout_s: NonNegativeFloat = Field(
        1800.0, description="a rank that stays in one loop phase longer than this dumps the phase and its Python "
        "stacks to stderr and out_dir/watchdog/rank_N.txt (0 = off)")
    stop_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT"]] = Field(
        default_factory=lambda: ["SIGTERM"], description="signals that stop the run after a checkpoint (SLURM "
        "preemption / time limit); see trainer/stop.py for the requeue contract")
    stop_exit_code: int = Field(75, ge=1, le=255, description="exit status of every rank after a stop checkpoint "
                                "(EX_TEMPFAIL); out_dir/exit_status.json says the same for launchers")


class ModelsConfig(StrictModel):
    policy: str = Field(..., description="HF folder or rlmt Megatron checkpoint of the initial policy")
    reward: str = Field(..., description="HF folder (…ForSequenceClassification) or Megatron checkpoint of the RM")
    reference: Optional[str] = Field(None, description="reference policy for KL / DPO; default: the initial policy")
    critic: Optional[str] = Field(None, description="PPO critic init; default: the initial policy (as in the paper)")

    def source(self, role: str) -> tuple[str, str]:
        """(field, folder) the model of ``role`` starts from: the reference and the critic start
        from the policy unless they name their own (then the field is theirs)."""
        own = getattr(self, role)
        return (f"models.{role}", own) if own else ("models.policy", self.policy)


class DataConfig(StrictModel):
    prompts: list[str] = Field(..., min_length=1, description="parquet / jsonl / datasets folders, concatenated")
    prompt_field: Optional[str] = Field(None, description="column holding the messages (default: prompt for parquet, messages for jsonl)")
    max_prompt_tokens: PositiveInt = Field(1024, description="longer prompts are left-truncated")
    prompts_per_step: PositiveInt = 64
    shuffle: bool = True


class RolloutConfig(StrictModel):
    engine: Literal["hf", "vllm", "sglang"] = Field("hf", description="hf: embedded transformers engine (CPU/1 GPU)")
    placement: Literal["colocated", "disaggregated"] = "colocated"
    engines: PositiveInt = Field(
        1, description="rollout engines serving the run (a fleet): each generation's prompts are spread over them by "
        "outstanding work, a failed engine's prompts finish on the others, and each is restarted and re-synced on "
        "its own (rollout/fleet.py); hf needs engine_process=subprocess for more than one")
    max_staleness: NonNegativeInt = Field(
        0, description="0: synchronous (each step samples from the weights it trains). >= 1: asynchronous: the next "
        "step's generation runs while this step trains, from weights at most this many updates old (one-step-off-"
        "policy at 1; the engines are synced only when the bound needs it); needs algorithm.rollout_correction")
    partial_tokens: NonNegativeInt = Field(
        0, description="partial rollouts (0: off): each generation round gives every unfinished answer at most this "
        "many tokens; a step trains on the first data.prompts_per_step groups whose answers all finished, and the "
        "unfinished ones continue in the next step under the newer weights, each token tagged with the version that "
        "sampled it (trainer/partial_rollouts.py). Must divide max_new_tokens; needs algorithm.rollout_correction")
    partial_max_syncs: PositiveInt = Field(
        1, description="partial rollouts: the most weight syncs one answer may span; an answer that would span more "
        "is finished in the current step")
    sglang_url: Optional[Union[str, list[str]]] = Field(
        None, description="base URL of the SGLang server (engine=sglang), or a list with one URL per engine "
        "(rollout.engines)")
    engine_tp_size: PositiveInt = Field(1, description="sglang: the server's TP size (one CUDA IPC payload per server "
                                        "rank; NCCL group size; FP8 block-layout check)")
    samples_per_prompt: PositiveInt = 8
    temperature: NonNegativeFloat = 0.7
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    max_new_tokens: PositiveInt = 4096
    timeout_s: PositiveFloat = Field(3600.0, description="longest wait for one generate call")
    engine_process: Optional[Literal["inline", "subprocess"]] = Field(
        None, description="hf: inline (default) in the trainer's process, or subprocess: in a child process, so a "
        "crash or a call longer than timeout_s is detected and survived by a restart; vllm always runs in a "
        "subprocess; sglang is a server (leave unset)")
    max_restarts: NonNegativeInt = Field(
        3, description="engine restarts allowed in a row without a successful generation; one more failure ends the "
        "run with a checkpoint")
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, lt=1.0, description="vllm: the share of the GPU's memory each vLLM engine may take (weights + KV "
        "cache); colocated, what the trainer's roles leave free when vLLM starts must cover it. On a CPU, vLLM "
        "reserves this share of the host's RAM per engine: keep engines x share well under 1")

    @model_validator(mode="after")
    def _check(self):
        if self.engine == "sglang" and self.engine_process is not None:
            raise ValueError("rollout.engine_process applies to the hf and vllm engines; an sglang engine is its own "
                             "server (rollout.sglang_url): leave it unset")
        if self.engine == "vllm" and self.engine_process == "inline":
            raise ValueError("rollout.engine_process=inline is impossible with the vllm engine: vLLM must not join the "
                             "trainer's torch.distributed world; leave it unset (subprocess)")
        if self.engines > 1 and self.engine == "hf" and self.engine_process != "subprocess":
            raise ValueError(f"rollout.engines={self.engines} needs each hf engine in its own process: set "
                             "rollout.engine_process=subprocess (inline engines would share the trainer's process)")
        if self.engine == "sglang" and self.sglang_url is not None and len(self.server_urls()) != self.engines:
            raise ValueError(f"rollout.engines={self.engines} SGLang engines need one URL each: rollout.sglang_url has "
                             f"{len(self.server_urls())} ({', '.join(self.server_urls())})")
        return self

    def server_urls(self) -> list[str]:
        """The SGLang servers' URLs, one per engine (empty for the other engines)."""
        if self.sglang_url is None:
            return []
        return [self.sglang_url] if isinstance(self.sglang_url, str) else list(self.sglang_url)


class KLControlConfig(StrictModel):
    """How ``algorithm.kl_coef`` evolves: ``fixed``, or ``adaptive`` (Ziegler et al. 2019, verl's
    ``AdaptiveKLController``): after each step the coefficient moves towards ``target`` KL,
    by at most 20% of ``samples / horizon`` (``algorithms/kl_control.py``)."""

    kind: Literal["fixed", "adaptive"] = "fixed"
    target: PositiveFloat = Field(0.1, description="adaptive: the KL (per-token mean, averaged over sequences) aimed at")
    horizon: PositiveFloat = Field(10000.0, description="adaptive: samples over which an error is corrected")


class DynamicSamplingConfig(StrictModel):
    """DAPO's dynamic sampling (Yu et al. 2025; verl's ``filter_groups``): a prompt whose samples
    all got the same reward teaches GRPO nothing (every advantage is 0), so such groups are
    dropped and more prompts are sampled until ``data.prompts_per_step`` groups remain."""

    enabled: bool = False
    max_extra_rounds: NonNegativeInt = Field(
        4, description="generation rounds after the first before the step goes on anyway; the batch is then "
        "filled with dropped groups (advantage 0) so it keeps its size")


class RolloutCorrectionConfig(StrictModel):
    """Correction for the rollout engine's sampler differing from the trainer's old policy, from the
    ratio ``pi_old / pi_rollout`` of each response token (``algorithms/rollout_correction.py``)."""

    mode: Literal["none", "tis", "mis", "icepop"] = Field(
        "none", description="none; tis: weight each token by min(ratio, tis_cap); mis: drop sequences whose ratio "
        "(seq_ratio) is outside [low, high]; icepop: drop tokens whose ratio is outside [low, high], weight the rest "
        "by their ratio")
    tis_cap: Optional[float] = Field(None, ge=1.0, description="tis: the truncation cap C (>= 1); null: 2.0")
    seq_ratio: Optional[Literal["geometric_mean", "product"]] = Field(
        None, description="mis: the sequence ratio, geometric_mean (exp of the mean token log ratio) or product; "
        "null: geometric_mean")
    low: Optional[float] = Field(None, ge=0.0, le=1.0, description="mis/icepop: lower end of the kept band; null: "
                                 "icepop 0.5, mis 1/high")
    high: Optional[float] = Field(None, ge=1.0, description="mis/icepop: upper end of the kept band; null: icepop 5.0, "
                                  "mis 1.001 (geometric_mean) or 2.0 (product)")

    @model_validator(mode="after")
    def _check(self):
        used = {"none": set(), "tis": {"tis_cap"}, "mis": {"seq_ratio", "low", "high"}, "icepop": {"low", "high"}}
        stray = sorted(k for k in ("tis_cap", "seq_ratio", "low", "high")
                       if getattr(self, k) is not None and k not in used[self.mode])
        if stray:
            raise ValueError(f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} to another "
                             f"rollout_correction.mode than {self.mode}: remove {'it' if len(stray) == 1 else 'them'}")
        if self.mode in ("mis", "icepop"):
            low, high = self.band()
            if not low < high:
                raise ValueError(f"rollout_correction band [low, high] = [{low:g}, {high:g}] is empty")
        return self

    def band(self) -> tuple[float, float]:
        """(low, high) of mis/icepop with the defaults filled in."""
        if self.mode == "icepop":
            return (0.5 if self.low is None else self.low), (5.0 if self.high is None else self.high)
        high = self.high if self.high is not None else (2.0 if self.seq_ratio == "product" else 1.001)
        return (1.0 / high if self.low is None else self.low), high

    def kwargs(self) -> dict:
        """Keyword arguments of ``algorithms.get_rollout_correction(mode)`` (mode != none)."""
        if self.mode == "tis":
            return {"cap": 2.0 if self.tis_cap is None else self.tis_cap}
        low, high = self.band()
        return {"low": low, "high": high} | ({"seq_ratio": self.seq_ratio or "geometric_mean"} if self.mode == "mis" else {})


class AlgorithmConfig(StrictModel):
    name: Literal["grpo", "ppo", "dpo"] = "grpo"
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = Field(
        "grpo", description="name=grpo: grpo, dr_grpo, rloo (outcome estimators over the samples of one prompt), "
        "reinforce_pp (REINFORCE++: discounted returns whitened over the global batch, no groups) or "
        "reinforce_pp_baseline (REINFORCE++-baseline: reward minus its group's mean, whitened over the batch's tokens)")
    clip_low: NonNegativeFloat = 0.2
    clip_high: NonNegativeFloat = 0.2
    dual_clip_c: Optional[float] = Field(3.0, description="dual-clip constant (> 1) or null")
    kl_coef: NonNegativeFloat = Field(0.001, description="KL(policy || reference) coefficient; 0 = no reference model")
    kl_estimator: Literal["k1", "k2", "k3", "k1+", "k3+"] = Field(
        "k3", description="k1, k2, k3 (Schulman's estimators); k1+ / k3+: that value with k2's gradient "
        "(straight-through, verl's k3+)")
    kl_control: KLControlConfig = Field(default_factory=KLControlConfig)
    kl_in: Literal["loss", "reward"] = Field(
        "loss", description="loss: kl_coef * KL is a term of the policy loss (GRPO style); reward: kl_coef * KL of "
        "the rollout policy is subtracted from every response token's reward before the advantages (PPO style)")
    entropy_coef: NonNegativeFloat = 0.001
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"] = "token_mean"
    dynamic_sampling: DynamicSamplingConfig = Field(default_factory=DynamicSamplingConfig)
    updates_per_rollout: PositiveInt = Field(1, description="optimizer steps per rollout batch (mini-batches, 1 epoch)")
    # PPO (gamma also REINFORCE++)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(1.0, ge=0.0, le=1.0)
    value_clip: Optional[PositiveFloat] = 0.5
    # DPO
    dpo_beta: PositiveFloat = 0.1
    dpo_mode: Literal["online", "one_round"] = Field(
        "online", description="online: pairs from the current policy every step; one_round: the paper's — "
        "each prompt sampled once from the initial model (the engine is never updated) and its scored group "
        "recorded in out_dir/one_round_rollouts, so a later epoch trains on the same pairs (trainer/one_round.py)")
    # Policy loss of grpo/ppo (algorithms/policy_loss.py, policy_variants.py) and rollout correction
    policy_loss: Literal["ppo_clip", "gspo", "gspo_token", "cispo"] = Field(
        "ppo_clip", description="ppo_clip; gspo / gspo_token (sequence-level ratio; clip_low/clip_high are its "
        "range, the paper's 3e-4 / 4e-4); cispo (clipped stop-gradient IS weight times log-prob; clip_low=1 removes "
        "the lower bound)")
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)

    @model_validator(mode="after")
    def _check(self):
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError(f"dual_clip_c must be > 1 (or null), got {self.dual_clip_c}")
        if self.name != "grpo" and self.advantage != "grpo":
            raise ValueError(f"algorithm.advantage={self.advantage} applies to name=grpo only ({self.name} "
                             f"{'uses GAE' if self.name == 'ppo' else 'computes no advantages'}): remove it")
        if self.kl_control.kind == "adaptive" and (self.kl_coef == 0 or self.name == "dpo"):
            raise ValueError("algorithm.kl_control.kind=adaptive scales algorithm.kl_coef: it needs kl_coef > 0 and "
                             "a KL penalty (grpo or ppo; dpo's beta is fixed)")
        if self.dynamic_sampling.enabled and self.name != "grpo":
            raise ValueError("algorithm.dynamic_sampling drops prompts whose samples all got one reward (their GRPO "
                             f"advantages are 0); it applies to name=grpo, not {self.name}")
        if self.name == "dpo" and (self.policy_loss != "ppo_clip" or self.rollout_correction.mode != "none"):
            raise ValueError("algorithm.policy_loss and algorithm.rollout_correction apply to grpo and ppo; dpo has "
                             "its own loss (dpo_beta): remove them")
        if self.policy_loss == "gspo" and (self.name == "ppo" or self.advantage == "reinforce_pp"):
            raise ValueError(f"algorithm.policy_loss=gspo needs one advantage per sequence, but "
                             f"{'ppo (GAE)' if self.name == 'ppo' else 'advantage=reinforce_pp'} gives one per token: "
                             "use policy_loss=gspo_token")
        if self.policy_loss != "ppo_clip" and "dual_clip_c" in self.model_fields_set and self.dual_clip_c is not None:
            raise ValueError(f"algorithm.dual_clip_c applies to policy_loss=ppo_clip only, not {self.policy_loss}: "
                             "remove it")
        if not (self.clip_low <= 1.0 if self.policy_loss == "cispo" else self.clip_low < 1.0):
            raise ValueError(f"algorithm.clip_low={self.clip_low:g}: the ratio's lower clip bound 1 - clip_low must "
                             f"stay above 0 for {self.policy_loss} (only cispo allows clip_low=1: no lower bound)")
        if self.kl_in == "reward" and self.name == "dpo":
            raise ValueError("algorithm.kl_in=reward folds the KL penalty into the rewards that advantages are "
                             "computed from; dpo has neither (dpo_beta already ties it to the reference): "
                             "remove kl_in or set it to loss")
        return self


class RewardConfig(StrictModel):
    parallel: Optional[ParallelConfig] = Field(
        None, description="the reward model's own TP/PP (its own Megatron groups in the same world); "
        "null = the policy's layout (build.parallel)")
    max_tokens_per_microbatch: PositiveInt = Field(
        8192, description="padded tokens per forward-only micro-batch of the reward model (it only scores, so "
        "this one budget is all it has; the trainer's roles take theirs from the batching section)")
    max_length: Optional[PositiveInt] = Field(None, description="RM inputs longer than this keep BOS + the tail")
    overlong_buffer_tokens: NonNegativeInt = Field(
        0, description="DAPO's soft overlong penalty: a response longer than rollout.max_new_tokens minus this many "
        "tokens loses overlong_penalty_factor * (excess / buffer) reward, down to -factor at the limit; 0 = off")
    overlong_penalty_factor: NonNegativeFloat = Field(1.0, description="the overlong penalty at the length limit")


class RLMTConfig(StrictModel):
    run: RunConfig = Field(default_factory=RunConfig)
    models: ModelsConfig
    build: ModelBuildConfig = Field(default_factory=ModelBuildConfig, description="layout and precision of every role")
    data: DataConfig
    format: ThinkingFormatConfig = Field(default_factory=ThinkingFormatConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig, description="policy optimizer (paper: AdamW 1e-6, wd 0.01, clip 1.0)")
    critic_optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-5), description="PPO critic optimizer")
    batching: BatchingConfig = Field(default_factory=BatchingConfig, description="micro-batch token budgets of the "
                                     "policy, the reference and the critic (training and forward-only passes)")
    reward: RewardConfig = Field(default_factory=RewardConfig)
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig)

    @model_validator(mode="after")
    def _check(self):
        a = self.algorithm
        if a.name == "grpo" and a.advantage != "reinforce_pp" and self.rollout.samples_per_prompt < 2:
            raise ValueError("algorithm.name=grpo compares samples of one prompt: rollout.samples_per_prompt must be >= 2")
        if a.name == "dpo" and self.rollout.samples_per_prompt < 2:
            raise ValueError("algorithm.name=dpo pairs best vs worst: rollout.samples_per_prompt must be >= 2")
        if self.reward.overlong_buffer_tokens > self.rollout.max_new_tokens:
            raise ValueError(f"reward.overlong_buffer_tokens={self.reward.overlong_buffer_tokens} is longer than "
                             f"rollout.max_new_tokens={self.rollout.max_new_tokens}")
        if self.rollout.engine == "sglang" and not self.rollout.sglang_url:
            raise ValueError("rollout.engine=sglang needs rollout.sglang_url")
        if self.rollout.max_staleness:
            self._check_asynchronous()
        if self.rollout.partial_tokens:
            self._check_partial()
        # Checked here so every rank fails together (the engines exist on their host ranks only).
        from rlmt_megatron.errors import RLMTError
        from rlmt_megatron.rollout.weight_sync.select import resolve_transport

        try:
            resolve_transport(self.rollout.engine, self.rollout.placement, self.weight_sync.transport)
        except RLMTError as e:
            raise ValueError(str(e)) from None
        if self.weight_sync.checksum and self.rollout.engine == "sglang":
            raise ValueError("weight_sync.checksum needs an engine that reports what it holds (hf or vllm), not sglang")
        minutes, engine_wait = self.run.collective_timeout_minutes, self.rollout.timeout_s / 60.0
        if minutes is not None and minutes <= engine_wait:
            raise ValueError(
                f"run.collective_timeout_minutes={minutes:g} is not longer than rollout.timeout_s={self.rollout.timeout_s:g} s "
                f"({engine_wait:g} min): the other ranks wait in a collective while the engine hosts wait for the engines, so a "
                "slow engine would end the job instead of being restarted; raise the first or lower the second")
        # Decaying schedules run over the whole run unless the recipe says otherwise.
        for optim in (self.optim, self.critic_optim):
            if "total_steps" not in optim.model_fields_set:
                optim.total_steps = self.run.total_steps * a.updates_per_rollout
        return self

    @property
    def needs_reference(self) -> bool:
        return self.algorithm.name == "dpo" or self.algorithm.kl_coef > 0

    def roles(self) -> tuple[str, ...]:
        """The models a run builds, in build order: the policy, the reference when
        ``needs_reference``, the critic for PPO, the reward model."""
        return (("policy",) + (("reference",) if self.needs_reference else ())
                + (("critic",) if self.algorithm.name == "ppo" else ()) + ("reward",))

    def _check_off_policy(self, why: str, *, loss: str, older: str, dynamic: str) -> None:
        """What training on tokens sampled by other weights than the trained ones cannot work with
        (asynchronous and partial rollouts), refused with ``why`` and the feature's reasons:
        ``loss``, why the loss of grpo and ppo copes; ``older``, how its samples come from older
        weights; ``dynamic``, why dynamic sampling conflicts."""
        a = self.algorithm
        if a.name == "dpo":
            raise ValueError(f"{why} applies to grpo and ppo, whose loss {loss}")
        if a.rollout_correction.mode == "none":
            raise ValueError(f"{why} {older}: set algorithm.rollout_correction.mode (tis, mis or icepop) so the loss "
                             "corrects with the engine's logprobs")
        if a.dynamic_sampling.enabled:
            raise ValueError(f"{why} cannot be combined with algorithm.dynamic_sampling: {dynamic}")

    def _check_asynchronous(self) -> None:
        """What ``rollout.max_staleness`` >= 1 cannot work with, each refused with its reason."""
        r = self.rollout
        why = f"rollout.max_staleness={r.max_staleness} (asynchronous rollouts)"
        self._check_off_policy(
            why, loss="corrects for the staleness with the engine's logprobs; dpo trains on pairs of its own policy's "
            "samples (and one_round DPO's engine keeps the initial weights)",
            older="samples from weights older than the ones trained",
            dynamic="its extra generation rounds depend on the step's rewards, known only after the generation")
        if r.engine == "hf" and r.engine_process != "subprocess":
            raise ValueError(f"{why} needs the hf engine in its own process (rollout.engine_process=subprocess): "
                             "generating in the trainer's process would share its RNG and threads with training")

    def _check_partial(self) -> None:
        """What ``rollout.partial_tokens`` > 0 cannot work with, each refused with its reason."""
        r = self.rollout
        why = f"rollout.partial_tokens={r.partial_tokens} (partial rollouts)"
        if r.max_new_tokens % r.partial_tokens:
            raise ValueError(f"{why} must divide rollout.max_new_tokens={r.max_new_tokens}: every round then asks "
                             "every engine for the same number of tokens, and no continued answer can pass the "
                             "engine's length limit")
        self._check_off_policy(
            why, loss="corrects tokens sampled by older weights with the engine's logprobs",
            older="continues answers under newer weights than the ones that began them",
            dynamic="both decide which groups a step trains on, by different rules")

    @property
    def engine_follows_policy(self) -> bool:
        """Whether the rollout engine is synced after every update: not for one_round DPO, which
        samples every pair from the initial model (the paper's on-policy DPO)."""
        return not (self.algorithm.name == "dpo" and self.algorithm.dpo_mode == "one_round")

    def collective_timeout_minutes(self) -> float:
        """``run.collective_timeout_minutes``, or when unset 10 minutes more than ``rollout.timeout_s``
        (at least 30): the other ranks wait in a collective while the engine hosts wait for the engines, so
        the engine's own timeout must fire first for a slow engine to be restarted, not the job
        killed (checked at load)."""
        if self.run.collective_timeout_minutes is not None:
            return self.run.collective_timeout_minutes
        return max(30.0, self.rollout.timeout_s / 60.0 + 10.0)

    def engine_dtype(self) -> str:
        """The rollout engine's weight dtype: on GPU the trainer's (bf16 in every recipe, as SGLang
        serves); on CPU float32, the tested path (the CPU bf16 kernels are slow and not compared)."""
        import torch

        return self.build.precision.params_dtype if torch.cuda.is_available() else "float32"


def load_rlmt_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RLMTConfig:
    """``rlmt-train``'s config: ``path`` (YAML) with ``overrides``, validated; errors name the file and field."""
    return load_config(path, overrides, cls=RLMTConfig)
