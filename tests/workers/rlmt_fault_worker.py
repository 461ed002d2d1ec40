"""rlmt-train in one process with a fault injected into a real component.

--mode empty:    the HF engine's generations come back with no tokens;
--mode nan_some: the reward model returns NaN for every third answer;
--mode nan_all:  the reward model returns NaN for every answer.
The rest of the run is the real loop; exit status and messages are what a user would see.
"""

import argparse
import math

from rlmt_megatron.cli.common import run_main
from rlmt_megatron.reward.rm_scorer import RewardScorer
from rlmt_megatron.rollout.hf_engine import HFEngine


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["empty", "nan_some", "nan_all"], required=True)
    p.add_argument("config")
    a = p.parse_args()
    if a.mode == "empty":
        real_generate = HFEngine.generate

        def generate(self, prompts, params, seeds=None):
            out = real_generate(self, prompts, params, seeds)
            for per_prompt in out:
                for g in per_prompt:
                    g.token_ids, g.logprobs = [], []
            return out

        HFEngine.generate = generate
    else:
        real_score = RewardScorer.score

        def score(self, conversations, answers):
            values = real_score(self, conversations, answers)
            return [math.nan if a.mode == "nan_all" or i % 3 == 0 else v for i, v in enumerate(values)]

        RewardScorer.score = score
    from rlmt_megatron.cli.train import main as train_main

    run_main(train_main, [a.config])


if __name__ == "__main__":
    main()
