"""``rlmt-train --dry-run``: every shipped recipe passes; the estimate against hand arithmetic,
published parameter counts, transformers' own parameter counts and autograd's saved tensors;
impossible layouts and budgets fail with exit status 2 and a message that says what to change."""

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from rlmt_megatron.cli.common import run_main
from rlmt_megatron.cli.train import main as train_main
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.errors import RLMTError
from rlmt_megatron.models.hf_config import parse_hf_config
from rlmt_megatron.planner import memory, model_shapes, rank_layout, run_plan
from rlmt_megatron.planner.report import estimate
from rlmt_megatron.config.rlmt import load_rlmt_config

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "examples" / "rlmt").glob("*/*.yaml"))
GiB = 2**30


def _dry_run_argv(path: Path) -> list[str]:
    """The dry-run command written in the recipe's header, as argv for rlmt-train's main."""
    line = re.search(r"^# dry run: (.*)$", path.read_text(), re.M)
    assert line, f"{path}: no '# dry run:' line in the header"
    argv = shlex.split(line.group(1))
    assert argv[:2] == ["rlmt-train", str(path.relative_to(REPO))]
    return [str(path)] + argv[2:]


def test_recipes_cover_the_paper_grid_for_1_and_4_nodes():
    names = {(p.parent.name, p.name) for p in RECIPES}
    for nodes in ("1node", "4nodes"):
        for model in ("llama3.1-8b", "qwen2.5-7b"):
            for algo in ("grpo", "ppo", "dpo"):
                for start in ("instruct", "base", "zero"):
                    for think in ("think", "nothink"):
                        assert (nodes, f"{algo}_{model}-{start}_{think}.yaml") in names
    assert len(RECIPES) == 72


def test_shipped_recipes_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_recipes", REPO / "tools" / "make_recipes.py")
    make_recipes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_recipes)
    assert make_recipes.main(["--check"]) == 0, "run: python tools/make_recipes.py"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_recipe_passes_its_dry_run(path, capsys):
    train_main(_dry_run_argv(path))
    out = capsys.readouterr().out
    assert out.startswith("# resolved config\n")
    assert "dry run: OK" in out and "DOES NOT FIT" not in out
    budget = float(re.search(r"budget ([\d.]+) GiB usable", out).group(1))
    peaks = [float(x) for x in re.findall(r"^  peak: ([\d.]+) GiB", out, re.M)]
    assert peaks and max(peaks) <= budget


# ------------------------------------------------------------------------------ hand arithmetic


def test_parameter_counts_equal_the_published_ones():
    # Llama-3.1-8B: 8,030,261,248 parameters; Qwen2.5-7B: 7,615,616,512 (model cards / safetensors index)
    for name, published in (("llama3.1-8b", 8_030_261_248), ("qwen2.5-7b", 7_615_616_512)):
        spec = parse_hf_config(model_shapes.KNOWN_SHAPES[name], name)
        assert model_shapes.hf_model_params(spec) == published
        assert model_shapes.stage_params(spec, "policy", ParallelConfig(), spec.vocab_size, 0) == published


BASE = ["models.policy=/nonexistent/Llama-3.1-8B-Instruct", "models.reward=/nonexistent/Skywork-Reward-Llama-3.1-8B-v0.2",
        "data.prompts=[p.parquet]", "data.max_prompt_tokens=1024", "data.prompts_per_step=16",
        "rollout.engine=sglang", "rollout.sglang_url=http://x:1", "rollout.samples_per_prompt=4",
        "rollout.max_new_tokens=1024", "rollout.engine_tp_size=2", "weight_sync.bucket_mb=256",
        "build.parallel.tp=2", "build.precision.params_dtype=bfloat16", "build.attention_backend=sdpa",
        "batching.train_tokens_per_microbatch=4096", "batching.logprob_tokens_per_microbatch=4096",
        "reward.max_tokens_per_microbatch=4096", "algorithm.kl_coef=0.001"]


def _lines(est, phase=None) -> dict[str, float]:
    return {x.name: x.bytes for x in (est.persistent if phase is None else est.phases[phase])}


def test_estimate_of_llama_8b_grpo_at_tp2_dp4_matches_hand_arithmetic():
    report = estimate(load_rlmt_config(None, BASE), run_plan.DryRunOptions(nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    assert report.ok and len(report.stages) == 1
    est = report.stages[0]
    # Parameters on one TP=2 rank of Llama-3.1-8B (h 4096, q 32x128, kv 8x128, ffn 14336, vocab 128256):
    # per layer (4096*(4096+2*1024) + 4096*4096 + 3*4096*14336) / 2 + 2*4096 norms = 109,060,096
    # 32 layers + embedding and LM head 128256*4096/2 each + final norm 4096
    P = 32 * 109_060_096 + 2 * 262_668_288 + 4096
    assert P == 4_015_263_744
    P_rm = 32 * 109_060_096 + 262_668_288 + 4096 + 4096  # score head 1x4096 instead of the LM head
    persistent = _lines(est)
    assert persistent == {
        "policy weights": 2 * P, "policy grads (fp32)": 4 * P, "policy optimizer": 12 * P / 4,  # DP = 8 / 2
        "reference weights": 2 * P, "reward weights": 2 * P_rm, "trainer runtime": 2 * GiB,
    }
    # Activations per token and layer, local spec at TP 2 without SP:
    # RoPE cos/sin 4*2*128 | norms 2*(4+2+2)*4096 + 2*4 | sharded: qkv out 2*(4096+2048), q and k after
    # RoPE 2*4096+2*1024, attention out 2*4096, lse 4*32, MLP 10*14336 -> 174,208 / 2
    per_layer = 1024 + 65_544 + (12_288 + 10_240 + 8192 + 128 + 143_360) // 2
    assert per_layer == 153_672
    T = 4096  # max(batching.train_tokens_per_microbatch, 1024 + 1024); the logprob budget is the same
    logits = T * (128_256 // 2) * 2
    assert _lines(est, "train") == {
        "activations": 32 * T * per_layer, "final norm": T * (8 * 4096 + 4),
        "logits": logits, "logits grad": logits, "chunk buffers": 2 * 256 * 2**20}
    # The old/reference logprob pass never holds the [T, V/TP] logits: GPTModel returns the final
    # hidden states (plus the copy of their real tokens), and the output layer is applied 1024
    # tokens at a time (runner/chunked_logprobs.py DEFAULT_CHUNK_TOKENS): 1024 x 64128 x 2 B of
    # logits per chunk, whose float32 work (1024 x 64128 x 4 B = 250.5 MiB) is under the 256 MiB
    # chunk of runner/logprobs.py, two alive.
    chunk_logits = 1024 * (128_256 // 2) * 2
    assert _lines(est, "logprobs") == {"forward (no grad)": T * per_layer, "final hidden states": 2 * T * 4096 * 2,
                                       "head chunk logits": chunk_logits, "chunk buffers": 2 * chunk_logits * 2}
    assert _lines(est, "reward") == {"RM forward (no grad)": 4096 * per_layer}
    assert _lines(est, "sync") == {"engine weights": 8_030_261_248 * 2 / 2, "sync buffers": 2 * 256 * 2**20}
    # Engine on GPUs 0-1: weights 8.03B x 2 B / TP 2; KV per token 32 layers x 2 x 4 KV heads x 128 x 2 B;
    # all 64 sequences of 2048 tokens fit in what is left, so the pool is exactly that.
    rollout = _lines(est, "rollout")
    assert rollout == {"engine weights": 8_030_261_248, "engine runtime": 4 * GiB, "KV cache": 64 * 2048 * 65_536}
    persistent_total = 11 * P + 2 * P_rm + 2 * GiB
    train_total = persistent_total + 32 * T * per_layer + T * 32_772 + 2 * logits + 2**29
    assert est.peak() == ("train", train_total)
    assert round(train_total / GiB, 2) == 70.49
    assert "holds 64 of 64 sequences" in next(x.formula for x in est.phases["rollout"] if x.name == "KV cache")


def test_vllm_engine_takes_rollout_gpu_memory_utilization_of_the_gpu():
    vllm = [x for x in BASE if not x.startswith(("rollout.engine=", "rollout.sglang_url="))] + ["rollout.engine=vllm"]

    def rollout_total(share: float) -> float:
        cfg = load_rlmt_config(None, vllm + [f"rollout.gpu_memory_utilization={share}"])
        est = estimate(cfg, run_plan.DryRunOptions(gpu_mem_gib=80)).stages[0]
        assert _lines(est, "rollout") == {"vllm engine": share * 80 * GiB}  # vLLM is started with this share
        return est.total("rollout")

    # 0.5 -> 0.25 of an 80 GiB GPU: the engine's budget, and with it the rollout phase, shrink by
    # 0.25 x 80 GiB = 20 GiB (both shares are exact in binary, so the difference is exact too)
    assert rollout_total(0.5) - rollout_total(0.25) == 20 * GiB


@pytest.mark.parametrize("overrides, roles", [
    ([], ("policy", "reference", "reward")),
    (["algorithm.kl_coef=0"], ("policy", "reward")),
    (["algorithm.name=ppo", "algorithm.kl_coef=0"], ("policy", "critic", "reward")),
    (["algorithm.name=dpo", "algorithm.kl_coef=0"], ("policy", "reference", "reward")),  # DPO always has one
])
def test_the_estimate_counts_the_models_the_config_builds(overrides, roles):
    cfg = load_rlmt_config(None, BASE + overrides)
    assert cfg.roles() == roles  # what trainer/roles.py builds
    assert tuple(run_plan.make_plan(cfg, run_plan.DryRunOptions()).models) == roles


def test_padded_vocabulary_is_the_builders_for_each_roles_layout():
    from rlmt_megatron.models.builder import padded_vocab_size

    cfg = load_rlmt_config(None, BASE + ["reward.parallel.tp=4"])
    plan = run_plan.make_plan(cfg, run_plan.DryRunOptions())
    # Llama's 128,256 rows: a multiple of 128 x 2 already at the policy's TP 2; 128 x 4 = 512 -> 128,512 for the RM
    assert plan.V == 128_256 == padded_vocab_size(128_256, cfg.build)
    assert plan.vocab("reward", cfg.reward.parallel) == 128_512


def test_engine_mem_fraction_sets_the_kv_pool_and_sequence_parallel_divides_the_norms():
    cfg = load_rlmt_config(None, BASE + ["build.parallel.sequence_parallel=true"])
    report = estimate(cfg, run_plan.DryRunOptions(engine_mem_fraction=0.2))
    est = report.stages[0]
    assert _lines(est, "rollout")["KV cache"] == pytest.approx(0.2 * 80 * GiB - 8_030_261_248)
    # with SP the norm tensors are sharded too: (65,544) / 2
    assert _lines(est, "train")["activations"] == 32 * 4096 * (1024 + 65_544 // 2 + 87_104)
    assert _lines(est, "train")["final norm"] == 4096 * (8 * 4096 + 4) / 2


def test_four_nodes_disaggregated_engine_has_its_own_node():
    cfg = load_rlmt_config(None, BASE + ["rollout.placement=disaggregated", "rollout.engine_tp_size=8",
                                    "reward.parallel.tp=4"])
    report = estimate(cfg, run_plan.DryRunOptions(nodes=4))
    text = report.render()
    assert "trainer world 24" in text and "TP=2 PP=1 DP=12" in text and "reward: TP=4 PP=1 DP=6" in text
    assert "rollout" not in report.stages[0].phases  # the trainer's GPUs never hold the engine
    eng = report.engine_gpu
    assert _lines(eng, "rollout")["engine weights"] == 8_030_261_248 * 2 / 8
    assert _lines(eng, "rollout")["KV cache"] == 64 * 2048 * (32 * 2 * 1 * 128 * 2)  # 1 KV head per GPU


def _urls(n: int) -> str:
    return "rollout.sglang_url=[" + ",".join(f"http://n{i}:1" for i in range(n)) + "]"


def test_colocated_fleet_puts_one_engine_on_each_node_and_every_gpu_hosts_one():
    # 4 nodes, rollout.engines 4 of TP 2 x DP 4: engine i on node i, GPUs 0-7 of it. Data-parallel
    # replicas inside a server take weights from disk only (SGLang refuses the others, checked at
    # the end); the disk arithmetic: one copy per engine through the folder.
    cfg = load_rlmt_config(None, BASE + ["rollout.engines=4", _urls(4), "weight_sync.transport=disk",
                                         "weight_sync.disk_dir=/shared/ws"])
    report = estimate(cfg, run_plan.DryRunOptions(nodes=4, engine_dp=4))
    plan = run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=4, engine_dp=4))
    assert [(m.node, m.gpus) for m in plan.engine.members] == [(i, list(range(8))) for i in range(4)]
    assert plan.world == 32 and plan.engine.hosted == set(range(32)) and plan.engine.gpus == 32
    text = report.render()
    assert "4 engine(s) x (TP 2 x DP 4) = 32 GPUs, shared with the trainer" in text
    assert "engine 3: node 3 GPUs 0-7" in text and "weights via disk" in text
    assert "every rank (0-31); ranks 0-31 also host an engine" in text
    # 64 sequences over 4 engines x 4 replicas: 4 per replica, 2048 tokens, 65,536 B of KV per token on a
    # TP-2 GPU (32 layers x 2 x 4 KV heads x 128 x 2 B)
    assert _lines(report.stages[0], "rollout")["KV cache"] == 4 * 2048 * 65_536
    # disk: each engine loads a copy of its own (a folder per engine), 4 copies of the bf16 weights
    # over the shared filesystem's assumed 2 GB/s
    assert report.step.seconds("sync") == pytest.approx(4 * 8_030_261_248 * 2 / 2e9, rel=1e-12)
    assert "4 x 16.1 GB (bf16) / 2.0 GB/s (disk, one copy per engine)" in text
    # the recipes' layout: 16 engines of TP 2, four per node (engine i: node i mod 4, GPUs 2(i // 4)
    # and up), synced by CUDA IPC on every node, every engine fed at once by its own node, so one
    # copy's time at the assumed 16.06 GB / 5 s
    cfg = load_rlmt_config(None, BASE + ["rollout.engines=16", _urls(16)])
    report = estimate(cfg, run_plan.DryRunOptions(nodes=4))
    plan = run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=4))
    assert [(m.node, m.gpus) for m in plan.engine.members] == [(i % 4, [2 * (i // 4), 2 * (i // 4) + 1])
                                                               for i in range(16)]
    assert plan.engine.hosted == set(range(32)) and plan.engine.gpus == 32
    assert "weights via cuda_ipc" in report.render()
    assert report.step.seconds("sync") == pytest.approx(8_030_261_248 * 2 / (8.03e9 * 2 / 5.0), rel=1e-12)
    # replicas inside one server cannot take CUDA IPC (or broadcast) updates: refused, naming the way out
    cfg = load_rlmt_config(None, BASE + ["rollout.engines=4", _urls(4)])
    with pytest.raises(run_plan.LayoutError, match=r"--engine-dp 4: SGLang refuses weight updates by cuda_ipc .* "
                       r"run each replica as an engine of its own \(rollout.engines=16, one URL each\) or sync by disk"):
        run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=4, engine_dp=4))


def test_fleet_layouts_name_each_engines_gpus():
    # colocated, 4 engines of TP 2 x DP 2 on 2 nodes: engines 0 and 2 on node 0 (GPUs 0-3, 4-7), 1 and 3 on node 1
    cfg = load_rlmt_config(None, BASE + ["rollout.engines=4", _urls(4), "weight_sync.transport=disk",
                                         "weight_sync.disk_dir=/shared/ws"])
    e = run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=2, engine_dp=2)).engine
    assert [(m.index, m.node, m.gpus) for m in e.members] == [
        (0, 0, [0, 1, 2, 3]), (1, 1, [0, 1, 2, 3]), (2, 0, [4, 5, 6, 7]), (3, 1, [4, 5, 6, 7])]
    # disaggregated, 3 engines of 4 GPUs on 4 nodes: two fill node 2, the third half of node 3; the
    # trainer keeps nodes 0-1
    cfg = load_rlmt_config(None, BASE + ["rollout.placement=disaggregated", "rollout.engines=3", _urls(3),
                                         "rollout.engine_tp_size=4"])
    plan = run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=4))
    assert [(m.node, m.gpus) for m in plan.engine.members] == [(2, [0, 1, 2, 3]), (2, [4, 5, 6, 7]), (3, [0, 1, 2, 3])]
    assert plan.world == 16 and plan.engine.hosted == set()
    # vLLM engines: processes of their node's first rank, one GPU each in turn (rollout/factory.py);
    # over 2 nodes of 8, engines 0 and 2 on node 0 (GPUs 0, 1), engine 1 on node 1 (GPU 0 = rank 8)
    vllm = [x for x in BASE if not x.startswith(("rollout.engine=", "rollout.sglang_url="))]
    cfg = load_rlmt_config(None, vllm + ["rollout.engine=vllm", "rollout.engines=3"])
    e = run_plan.make_plan(cfg, run_plan.DryRunOptions()).engine
    assert [(m.node, m.gpus) for m in e.members] == [(0, [0]), (0, [1]), (0, [2])] and e.hosted == {0, 1, 2}
    e = run_plan.make_plan(cfg, run_plan.DryRunOptions(nodes=2)).engine
    assert [(m.node, m.gpus) for m in e.members] == [(0, [0]), (1, [0]), (0, [1])] and e.hosted == {0, 1, 8}


# Step time, by hand. BASE: Llama-3.1-8B, 16 prompts x 4 samples = 64 sequences of 1024 + 1024 tokens,
# one colocated SGLang engine of TP 2 on node 0 (2 engine GPUs), trainer world 8, a reference (kl_coef > 0).
GEN_RATE = 2048 * 1060 / 58 / 8  # tokens/s per engine GPU (NeMo-RL's 8B step: 2048 x 1060 tokens in 58 s on 8 GPUs)
MATMUL = 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336)  # the decoder's linear weights
ATTN_FWD = 2 * 2 * 2048 * 32 * 128 * 32 / 2  # QK^T and AV, 2 FLOPs per MAC, causal half, 32 layers
POLICY_FWD = 2 * (MATMUL + 4096 * 128256) + ATTN_FWD  # per token of a 2048-token sequence
RM_FWD = 2 * (MATMUL + 4096) + ATTN_FWD  # score head 4096 x 1
TRAINER = 8 * 989e12 * 0.40  # 8 GPUs x dense bf16 peak x MFU


def test_step_time_projection_matches_hand_arithmetic():
    report = estimate(load_rlmt_config(None, BASE), run_plan.DryRunOptions())
    step = report.step
    tokens = 64 * 2048
    gen = 64 * 1024 / (2 * GEN_RATE)
    reward = tokens * RM_FWD / TRAINER
    logprobs = 2 * tokens * POLICY_FWD / TRAINER  # old and reference logprobs
    train = tokens * 3 * POLICY_FWD / TRAINER  # forward + backward = 3 forwards
    sync = 8_030_261_248 * 2 / (8.03e9 * 2 / 5)  # bf16 weights / (NeMo-RL's 16.06 GB refit in 5 s)
    expect = {"generation": gen, "reward": reward, "logprobs": logprobs, "train": train, "sync": sync}
    assert {p.name: p.seconds for p in step.phases} == pytest.approx(expect, rel=1e-12)
    assert step.synchronous_step == pytest.approx(gen + reward + logprobs + train + sync, rel=1e-12)
    assert round(gen, 2) == 7.00 and round(train, 2) == 1.93 and round(sync, 2) == 5.00
    # generation (7.0 s) outlasts the trainer's side (~2.9 s): the asynchronous step is generation + sync
    assert step.asynchronous_step == pytest.approx(gen + sync, rel=1e-12)
    text = report.render()
    assert "step, synchronous (rollout.max_staleness 0)" in text and "<- this run" in text
    assert "gen_tokens_per_s_per_gpu = 4679 tokens/s: assumed: NeMo-RL" in text


def test_asynchronous_step_is_the_longer_side_plus_sync_and_rates_override():
    # --rate: generation at 1e6 tokens/s per GPU, so the trainer's side is the longer one
    cfg = load_rlmt_config(None, BASE + ["rollout.max_staleness=1", "algorithm.rollout_correction.mode=tis"])
    report = estimate(cfg, run_plan.DryRunOptions(rates=["gen_tokens_per_s_per_gpu=1e6", "train_mfu=0.5"]))
    step = report.step
    gen = 64 * 1024 / (2 * 1e6)
    trainer_side = 64 * 2048 * (RM_FWD + 2 * POLICY_FWD) / TRAINER + 64 * 2048 * 3 * POLICY_FWD / (8 * 989e12 * 0.5)
    sync = 5.0 * 8_030_261_248 / 8.03e9
    assert step.seconds("generation") == pytest.approx(gen, rel=1e-12)
    assert step.asynchronous_step == pytest.approx(trainer_side + sync, rel=1e-12)
    assert step.asynchronous_step < step.synchronous_step == pytest.approx(gen + trainer_side + sync, rel=1e-12)
    text = report.render()
    assert "max_staleness >= 1): max(generation" in text and text.count("<- this run") == 1
    assert "asynchronous overlap needs rollout.placement=disaggregated" in text  # colocated
    assert "train_mfu = 0.5 of peak: given: --rate on the command line" in text
    with pytest.raises(RLMTError, match="NAME one of gen_tokens_per_s_per_gpu"):
        estimate(cfg, run_plan.DryRunOptions(rates=["tokens=3"]))


def test_one_round_dpo_projects_no_sync_and_no_asynchronous_step():
    # one_round DPO samples every pair from the initial weights (RLMTConfig.engine_follows_policy):
    # nothing to sync; its pairs train as 2 sequences each (16 prompts -> 32 sequences, with a reference)
    cfg = load_rlmt_config(None, BASE + ["algorithm.name=dpo", "algorithm.dpo_mode=one_round"])
    report = estimate(cfg, run_plan.DryRunOptions())
    assert report.step.seconds("sync") == 0.0
    assert report.step.seconds("logprobs") == pytest.approx(2 * 32 * 2048 * POLICY_FWD / TRAINER, rel=1e-12)
    text = report.render()
    assert "asynchronous rollouts: GRPO and PPO only" in text and "max_staleness >= 1): max(" not in text


def test_pipeline_stages_hold_the_1f1b_in_flight_micro_batches():
    # PP 4: stage 0 holds min(pp, m) micro-batches of 8 layers, the last stage 1 (Megatron's warm-up count)
    assert memory.inflight_chunks(4, None, 0, 100) == (4, 4)
    assert memory.inflight_chunks(4, None, 3, 100) == (1, 4)
    assert memory.inflight_chunks(4, None, 0, 2) == (2, 4)
    # interleaved, vpp 2: stage 0 warm-up 2*(4-1) + (2-1)*4 = 10 chunk micro-batches, +1 in steady state
    assert memory.inflight_chunks(4, 2, 0, 100) == (11, 8)
    cfg = load_rlmt_config(None, BASE + ["build.parallel.pp=4", "build.parallel.tp=2"])
    report = estimate(cfg, run_plan.DryRunOptions())
    first, last = report.stages
    assert "PP stage 0 (ranks 0-1)" in first.title and "PP stage 3 (ranks 6-7)" in last.title
    # DP 1: 64 rollouts of 2048 tokens, 2 per 4096-token micro-batch = 32 micro-batches; stage 0 holds 4
    assert _lines(first, "train")["activations"] == 4 * 8 * 4096 * 153_672
    assert _lines(last, "train")["activations"] == 1 * 8 * 4096 * 153_672
    assert "logits" in _lines(last, "train") and "logits" not in _lines(first, "train")


def test_full_recompute_activation_lines():
    # Same run as above at PP 4 with full recompute in chunks of 2 layers: stage 0 holds 4 micro-
    # batches x 4 chunk inputs (2 h = 8192 B per token) and recomputes one 2-layer chunk at a time.
    cfg = load_rlmt_config(None, BASE + ["build.parallel.pp=4", "build.parallel.tp=2",
                                    "build.performance.recompute=full", "build.performance.recompute_layers=2"])
    first = estimate(cfg, run_plan.DryRunOptions()).stages[0]
    assert _lines(first, "train")["activations"] == 4 * 4 * 4096 * 8192
    assert _lines(first, "train")["recomputed chunk"] == 2 * 4096 * 153_672


def test_rank_groups_follow_megatrons_default_order():
    from megatron.core.parallel_state import RankGenerator

    for tp, dp, pp in ((2, 2, 2), (4, 6, 1), (1, 3, 4), (2, 1, 4), (8, 3, 1)):
        ref = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        ours = rank_layout.rank_groups(tp, dp, pp)
        for kind in ("tp", "dp", "pp"):
            assert sorted(ours[kind]) == sorted(ref.get_ranks(kind)), (tp, dp, pp, kind)


# ------------------------------------------------------------------------------ failures


def _fails(argv: list[str], capsys) -> tuple[str, str]:
    """rlmt-train's exit status 2 with one 'error:' message; returns (stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        run_main(train_main, argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    return captured.out, captured.err


@pytest.mark.parametrize("overrides, flags, message", [
    (["build.parallel.tp=3"], [], "world size 8 is not divisible by tp\\*pp = 3\\*1"),
    (["build.parallel.tp=4", "build.parallel.pp=2", "build.parallel.vpp=3"], [],
     "num_hidden_layers=32 is not divisible by pp=2 \\* vpp=3 = 6"),
    (["build.parallel.tp=8", "models.policy=/x/Qwen2.5-7B-Instruct"], [], "num_attention_heads=28 is not divisible by tp=8"),
    (["models.policy=/x/Qwen2.5-7B", "rollout.engine_tp_size=8"], [], "28 attention heads do not split"),
    (["rollout.engine_tp_size=8"], ["--gpus-per-node", "4"], "an engine's 8 GPUs \\(engine_tp_size 8 x --engine-dp 1\\) "
     "must be on one node \\(4 GPUs\\)"),
    # 3 colocated engines of 2 x 2 GPUs over 2 nodes of 4 GPUs: node 0 gets two, 8 GPUs of its 4
    (["rollout.engines=3", "rollout.sglang_url=[http://a:1,http://b:1,http://c:1]", "weight_sync.transport=disk",
      "weight_sync.disk_dir=/shared"], ["--engine-dp", "2", "--nodes", "2", "--gpus-per-node", "4"],
     "rollout.engines=3 colocated engine\\(s\\) of 4 GPUs .* put 2 on one node, 8 GPUs of its 4"),
    (["rollout.placement=disaggregated", "rollout.engines=3", "rollout.sglang_url=[http://a:1,http://b:1,http://c:1]",
      "rollout.engine_tp_size=8"], ["--nodes", "3"], "rollout.engines=3 engine\\(s\\) of 8 GPUs .* need 3 node\\(s\\), "
     "leaving none of the 3"),
    (["rollout.placement=disaggregated"], ["--engine-dp", "2", "--nodes", "2"],
     "--engine-dp 2: SGLang refuses weight updates by nccl on a server with data-parallel replicas"),
    (["rollout.engine=vllm", "rollout.sglang_url=null", "rollout.engines=9"], [], "rollout.engines=9 vllm engines put 9 on one node, .* "
     "two would share a GPU"),
    (["rollout.placement=disaggregated", "rollout.engine_tp_size=8"], [], "leaving none of the 1"),
    (["algorithm.name=dpo", "data.prompts_per_step=2"], [], "fewer than DP=4 ranks"),
    (["reward.parallel.tp=16"], [], "world size 8 is not divisible by tp\\*pp = 16\\*1"),
])
def test_impossible_layouts_fail_with_exit_2(overrides, flags, message, capsys, tmp_path):
    _, err = _fails([str(_write(tmp_path, BASE + overrides)), "--dry-run", *flags], capsys)
    assert re.search(message, err), err


def _write(tmp_path: Path, overrides: list[str]) -> Path:
    import yaml

    from rlmt_megatron.config.base import _set_dotted, parse_overrides

    tree: dict = {}
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value, "test")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_over_budget_names_the_biggest_items_and_what_to_change(capsys, tmp_path):
    # The same run with 16K-token micro-batches on 70 GiB GPUs: the activations alone are 75 GiB.
    path = _write(tmp_path, BASE)
    out, err = _fails([str(path), "--dry-run", "--gpu-mem-gib", "70", "batching.train_tokens_per_microbatch=16384"],
                      capsys)
    assert "every rank (0-7); ranks 0-1 also host an engine: needs" in err
    assert "in phase train" in err and "66.50 GiB usable" in err
    activations = 32 * 16384 * 153_672  # layers x tokens x bytes per token and layer (see above)
    assert f"Biggest items: activations {activations / GiB:.2f} GiB, policy grads (fp32)" in err
    assert ("To fit: lower batching.train_tokens_per_microbatch (not below the longest sequence); turn on "
            "build.parallel.sequence_parallel; set build.performance.recompute=full (~1/3 more compute); "
            "raise build.parallel.tp or pp; add nodes") in err
    # the whole table is printed before the error
    assert out.startswith("# resolved config") and "DOES NOT FIT" in out and out.endswith("dry run: FAILED\n")


def test_kv_cache_that_cannot_hold_one_sequence_fails():
    report = estimate(load_rlmt_config(None, BASE), run_plan.DryRunOptions(gpu_mem_gib=64))
    assert any("less than one sequence of 2048 tokens" in p for p in report.problems)
    with pytest.raises(RLMTError, match="raise rollout.engine_tp_size"):
        report.check()


# ------------------------------------------------------------------------------ shapes


def test_shapes_from_names_flags_and_errors():
    assumed = model_shapes.assumed_shapes(["qwen2.5-7b", "reward=llama3.1-8b"])
    assert model_shapes.resolve_model("/ckpt/mine", "policy", "models.policy", assumed).spec.model_type == "qwen2"
    assert model_shapes.resolve_model("/ckpt/mine", "critic", "models.critic", assumed).spec.model_type == "qwen2"
    assert model_shapes.resolve_model("/ckpt/rm", "reward", "models.reward", assumed).spec.model_type == "llama"
    assert model_shapes.resolve_model("/x/Meta-Llama-3.1-8B-Instruct", "policy", "p", {}).spec.hidden_size == 4096
    assert model_shapes.resolve_model("/x/Qwen2.5-7B-Instruct", "policy", "p", {}).spec.num_hidden_layers == 28
    with pytest.raises(RLMTError, match=r"models.reward=/ckpt/rm: .*--assume-shape reward=NAME"):
        model_shapes.resolve_model("/ckpt/rm", "reward", "models.reward", model_shapes.assumed_shapes(["qwen2.5-7b"]))
    with pytest.raises(RLMTError, match="unknown shape 'gpt2'"):
        model_shapes.assumed_shapes(["gpt2"])
    with pytest.raises(RLMTError, match="role must be one of"):
        model_shapes.assumed_shapes(["actor=qwen2.5-7b"])


def test_dry_run_of_tiny_models_reads_their_config_json(tiny_models, tmp_path, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = _write(tmp_path, [f"models.policy={tiny_models / 'qwen2-policy'}", f"models.reward={tiny_models / 'llama-rm'}",
                             "data.prompts=[p.jsonl]", "data.max_prompt_tokens=48", "data.prompts_per_step=2",
                             "rollout.samples_per_prompt=3", "rollout.max_new_tokens=8",
                             "batching.train_tokens_per_microbatch=512", "batching.logprob_tokens_per_microbatch=512"])
    train_main([str(path), "--dry-run", "--nodes", "1", "--gpus-per-node", "2", "--gpu-mem-gib", "8"])
    out = capsys.readouterr().out
    assert f"policy    {tiny_models / 'qwen2-policy' / 'config.json'}" in out
    assert f"reward    {tiny_models / 'llama-rm' / 'config.json'}" in out
    assert "dry run: OK" in out and "rollout engines: hf, processes of their node's first rank" in out and "hf engine weights" in out
    # parameter counting against transformers' own models (float32 here: 4 bytes each)
    cfg = load_rlmt_config(path)
    report = estimate(cfg, run_plan.DryRunOptions(gpus_per_node=2, gpu_mem_gib=8))
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_models / "qwen2-policy"))
    rm = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(tiny_models / "llama-rm"))
    n_policy = sum(p.numel() for p in policy.parameters())
    n_rm = sum(p.numel() for p in rm.parameters())
    hf = json.loads((tiny_models / "qwen2-policy" / "config.json").read_text())
    # Megatron pads the vocabulary to a multiple of 128 x TP: 1029 -> 1152 rows of the embedding (and
    # of the LM head unless tied); the engine loads the unpadded HF model.
    assert hf["vocab_size"] == 1029
    padding = (1152 - 1029) * hf["hidden_size"] * (1 if hf["tie_word_embeddings"] else 2)
    lines = _lines(report.stages[0])
    assert lines["policy weights"] == 4 * (n_policy + padding) and lines["reward weights"] == 4 * n_rm
    assert lines["hf engine weights"] == 4 * n_policy
    assert lines["policy optimizer"] == 8 * (n_policy + padding) / 2  # float32 params: Adam m, v only, DP 2


def test_rlmt_checkpoint_meta_gives_shape_and_padded_vocab(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "rlmt_model.json").write_text(json.dumps(
        {"role": "policy", "padded_vocab_size": 128_512, "hf_config": model_shapes.KNOWN_SHAPES["llama3.1-8b"]}))
    res = model_shapes.resolve_model(str(ckpt), "policy", "models.policy", {})
    # the checkpoint's padding wins over the builder's (128 x TP 2 would give 128,256 -> 128,256)
    build = ModelBuildConfig(make_vocab_size_divisible_by=128, parallel=ParallelConfig(tp=2))
    assert res.padded_vocab == 128_512 and model_shapes.padded_vocab(res, build) == 128_512
    with pytest.raises(RLMTError, match="holds a policy model, but the run loads it as a reward"):
        model_shapes.resolve_model(str(ckpt), "reward", "models.reward", {})


# ------------------------------------------------------------------------------ the activation formula


def test_local_spec_activation_formula_equals_autograd_saved_tensors(world_of_one):
    """Bytes a Megatron decoder layer (local spec, SDPA, bf16) keeps for backward, counted with
    autograd's saved-tensor hooks (unique storages, parameters excluded), equal the formula."""
    import torch

    from rlmt_megatron.config.model_build import ModelBuildConfig, PrecisionConfig
    from rlmt_megatron.models.builder import build_model

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=256,
               intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, max_position_embeddings=4096)
    spec = parse_hf_config(cfg, "measured")
    build = ModelBuildConfig(attention_backend="sdpa", precision=PrecisionConfig(params_dtype="bfloat16"))
    model = build_model(spec, "policy", build).chunks[0].train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[str, dict[int, int]] = {}
    current: list = [None]

    def pack(t):
        s = t.untyped_storage()
        if current[0] is not None and s.data_ptr() not in params:
            saved.setdefault(current[0], {})[s.data_ptr()] = s.nbytes()
        return t

    modules = [(f"layer{i}", m) for i, m in enumerate(model.decoder.layers)]
    # the final norm's output is kept by the LM head (its input): both count as "final norm"
    modules += [("final_norm", model.decoder.final_layernorm), ("final_norm", model.output_layer)]
    for name, module in modules:
        module.register_forward_pre_hook(lambda m, a, name=name: current.__setitem__(0, name))
        module.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))
    T = 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 512, (1, T)), torch.arange(T)[None], None)
    per_token = model_shapes.layer_activation_bytes_per_token(spec, ParallelConfig(), te=False)
    for i in range(2):
        assert sum(saved[f"layer{i}"].values()) == T * per_token
    assert sum(saved["final_norm"].values()) == T * model_shapes.final_norm_bytes_per_token(spec, ParallelConfig(), te=False)


def test_full_recompute_keeps_only_chunk_inputs(world_of_one):
    """With build.performance.recompute=full (chunks of one layer), autograd's saved tensors of
    the whole decoder are each chunk's input plus one RoPE table: the dry run's formula."""
    import torch

    from rlmt_megatron.config.model_build import ModelBuildConfig, PerformanceConfig, PrecisionConfig
    from rlmt_megatron.models.builder import build_model

    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512, hidden_size=256,
               intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               rms_norm_eps=1e-5, max_position_embeddings=4096)
    spec = parse_hf_config(cfg, "measured")
    build = ModelBuildConfig(attention_backend="sdpa", precision=PrecisionConfig(params_dtype="bfloat16"),
                             performance=PerformanceConfig(recompute="full", recompute_layers=1))
    model = build_model(spec, "policy", build).chunks[0].train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}
    inside = [False]

    def pack(t):
        s = t.untyped_storage()
        if inside[0] and s.data_ptr() not in params:
            saved[s.data_ptr()] = s.nbytes()
        return t

    model.decoder.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True))
    model.decoder.final_layernorm.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, False))
    T = 256
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, 512, (1, T)), torch.arange(T)[None], None)
    rope_table = 4 * spec.head_dim * T  # float32 [T, 1, 1, d], one storage shared by every chunk
    assert sum(saved.values()) == 4 * T * model_shapes.recompute_input_bytes_per_token(spec, ParallelConfig()) + rope_table
