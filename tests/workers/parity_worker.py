"""Run under torchrun (a world of 4): Megatron outputs of the tiny models at several TP x PP (x VPP,
or with sequence parallelism) layouts in turn, in one job (start-up paid once). Layouts smaller
than the world run with data parallelism.

Writes (rank 0) a JSON file with, per layout and model, the per-token logprobs (policies), RM
scores and critic values for the fixed sequences in ``sequences.json``, and optionally exports
every model back to HF folders from one layout. The test compares all of it with transformers.
Layout keys: ``TPxPP``, ``TPxPPvppV``, ``TPxPPsp``.
"""

import argparse
import glob
import json
from pathlib import Path

import torch.distributed as dist

from rlmt_megatron.checkpoint.hf_export import save_hf_folder
from rlmt_megatron.checkpoint.load import load_model
from rlmt_megatron.config.model_build import ModelBuildConfig, ParallelConfig
from rlmt_megatron.config.optim import BatchingConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.forward_only import sequence_logprobs, sequence_scores, token_values
from rlmt_megatron.runner.model_runner import ModelRunner

BUDGET_48 = BatchingConfig(logprob_tokens_per_microbatch=48)


def parse_layout(key: str) -> ParallelConfig:
    tp_pp, vpp, sp = key, None, False
    if key.endswith("sp"):
        tp_pp, sp = key[:-2], True
    elif "vpp" in key:
        tp_pp, vpp = key.split("vpp")[0], int(key.split("vpp")[1])
    tp, pp = map(int, tp_pp.split("x"))
    return ParallelConfig(tp=tp, pp=pp, vpp=vpp, sequence_parallel=sp)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--sequences", required=True)
    p.add_argument("--layouts", required=True, help="comma-separated layout keys, run in order")
    p.add_argument("--out", required=True)
    p.add_argument("--export-layout", default=None, help="export every model to HF folders from this layout")
    p.add_argument("--export-dir", default=None)
    a = p.parse_args()
    seqs = json.loads(Path(a.sequences).read_text())
    results = {}
    for key in a.layouts.split(","):
        export = Path(a.export_dir) if a.export_dir and key == a.export_layout else None
        results[key] = outputs_at(Path(a.models), seqs, ModelBuildConfig(parallel=parse_layout(key)), export)
    if dist.get_rank() == 0:
        Path(a.out).write_text(json.dumps(results))
    # The threads this process runs (Linux names them in /proc) before and after shutdown: a
    # process group whose gloo threads outlive it is destroyed at interpreter exit, where it can
    # abort a rank of a finished run.
    rank, threads = dist.get_rank(), {"before": native_threads()}
    bootstrap.shutdown()
    threads["after"] = native_threads()
    Path(f"{a.out}.threads.{rank}").write_text(json.dumps(threads))


def native_threads() -> list[str]:
    return sorted(Path(task, "comm").read_text().strip() for task in glob.glob("/proc/self/task/*"))


def outputs_at(models: Path, seqs, build: ModelBuildConfig, export_dir) -> dict:
    bootstrap.initialize(build.parallel)
    # Small token budget (48): several micro-batches, so the pipeline schedule really interleaves.
    result = {}
    for name in ("llama-policy", "qwen2-policy"):
        built = load_model(models / name, "policy", build)
        result[name] = [lp.tolist() for lp in sequence_logprobs(ModelRunner(built, None, BUDGET_48), seqs)]
        if export_dir:
            save_hf_folder(built, export_dir / name, tokenizer_src=models / name)
    rm = load_model(models / "llama-rm", "reward", build)
    result["llama-rm"] = [float(s) for s in sequence_scores(ModelRunner(rm, None, BUDGET_48), seqs)]
    if export_dir:
        save_hf_folder(rm, export_dir / "llama-rm", tokenizer_src=models / "llama-rm")
    critic = load_model(models / "llama-rm", "critic", build)
    result["critic-from-rm"] = [v.tolist() for v in token_values(ModelRunner(critic, None, BUDGET_48), seqs)]
    # What Megatron really ran with, for the test to check against the layout it asked for.
    from megatron.core import parallel_state as ps

    result["ran_with"] = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
                          "dp": ps.get_data_parallel_world_size(), "chunks": len(critic.chunks),
                          "sequence_parallel": bool(critic.chunks[0].config.sequence_parallel)}
    return result


if __name__ == "__main__":
    main()
