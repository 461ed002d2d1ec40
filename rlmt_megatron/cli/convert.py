"""rlmt-convert: HF folder <-> Megatron distributed checkpoint.

  rlmt-convert hf-to-mcore --hf DIR --out DIR [--tp N --pp N] [--role policy|critic|reward]
  rlmt-convert mcore-to-hf --ckpt DIR --out DIR [--tp N --pp N]

The Megatron checkpoint is layout independent, so ``--tp/--pp`` only choose how the work is
split (run under torchrun with tp*pp processes, or a multiple for data parallel). The role is
taken from the HF architecture when not given (*ForSequenceClassification -> reward,
*ForTokenClassification -> critic, else policy).
"""

from __future__ import annotations

import argparse

from rlmt_megatron.cli.common import add_layout_args, build_config_from_args, cli_session, is_rank0, run_main


def infer_role(spec) -> str:
    if spec.is_sequence_classifier:
        return "reward"
    if any(a.endswith("ForTokenClassification") for a in spec.architectures):
        return "critic"
    return "policy"


def declared_dtype(hf_config: dict) -> str:
    declared = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return declared if declared in ("float32", "bfloat16", "float16") else "float32"


# Conversion keeps the source's dtype unless told otherwise, so nothing is rounded.
CONVERT_DTYPE_HELP = "dtype of the converted weights (default: {source}; float32 when it declares none)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="rlmt-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    h2m = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> Megatron distributed checkpoint")
    h2m.add_argument("--hf", required=True, help="HF folder: config.json, *.safetensors and the tokenizer files")
    h2m.add_argument("--out", required=True, help="folder the Megatron checkpoint is written to")
    h2m.add_argument("--role", choices=["policy", "critic", "reward"], default=None,
                     help="model to build (default: from the HF architecture: *ForSequenceClassification -> "
                          "reward, *ForTokenClassification -> critic, else policy)")
    add_layout_args(h2m, CONVERT_DTYPE_HELP.format(source="the HF config's torch_dtype"))
    m2h = sub.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF folder")
    m2h.add_argument("--ckpt", required=True, help="Megatron checkpoint folder written by rlmt (has rlmt_model.json)")
    m2h.add_argument("--out", required=True, help="HF folder to write (config.json, safetensors, tokenizer files)")
    add_layout_args(m2h, CONVERT_DTYPE_HELP.format(source="the torch_dtype of the HF config stored with the checkpoint"))
    args = p.parse_args(argv)

    from rlmt_megatron.checkpoint.dist_ckpt import read_checkpoint_meta, save_model_checkpoint
    from rlmt_megatron.checkpoint.hf_export import save_hf_folder
    from rlmt_megatron.checkpoint.load import load_model
    from rlmt_megatron.models.hf_config import load_hf_config

    # Convert in the checkpoint's own dtype unless told otherwise, so nothing is rounded.
    if args.command == "hf-to-mcore":
        spec = load_hf_config(args.hf)
        args.dtype = args.dtype or declared_dtype(spec.raw)
        build = build_config_from_args(args)
        role = args.role or infer_role(spec)
        with cli_session(build.parallel):
            built = load_model(args.hf, role, build)
            save_model_checkpoint(built, args.out, tokenizer_src=args.hf)
            if is_rank0():
                print(f"wrote Megatron {role} checkpoint to {args.out}")
    else:
        meta = read_checkpoint_meta(args.ckpt)
        args.dtype = args.dtype or declared_dtype(meta["hf_config"])
        build = build_config_from_args(args)
        role = meta["role"]
        with cli_session(build.parallel):
            built = load_model(args.ckpt, role, build)
            save_hf_folder(built, args.out, tokenizer_src=args.ckpt)
            if is_rank0():
                print(f"wrote HF {role} folder to {args.out}")


def cli() -> None:
    run_main(main)


if __name__ == "__main__":
    cli()
