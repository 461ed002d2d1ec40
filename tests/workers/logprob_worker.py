"""Under torchrun with TP=2: each rank holds half of the vocabulary of a fixed case."""

import sys

import torch

from rlmt_megatron.config.model_build import ParallelConfig
from rlmt_megatron.distributed import bootstrap
from rlmt_megatron.runner.logprobs import vocab_parallel_logprobs_and_entropy

case_path, out_dir, true_vocab, temperature = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
bootstrap.initialize(ParallelConfig(tp=2))
rank = torch.distributed.get_rank()
case = torch.load(case_path)
part = case["logits"].shape[1] // 2
x = case["logits"][:, rank * part:(rank + 1) * part].float().contiguous().requires_grad_(True)
lp, ent = vocab_parallel_logprobs_and_entropy(x, case["targets"], true_vocab, temperature, chunk_tokens=7)
(case["w_lp"].float() * lp + case["w_ent"].float() * ent).sum().backward()
torch.save({"lp": lp.detach(), "ent": ent.detach(), "grad": x.grad}, f"{out_dir}/rank{rank}.pt")
bootstrap.shutdown()
