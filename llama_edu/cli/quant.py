"""``quantize``: a quantized copy of a model folder (int8, int4, NF4, GPTQ)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def _quantize_command(args: argparse.Namespace) -> int:
    from ..io.atomic_save import check_output_folder
    from ..io.files import atomic_write_bytes
    from ..modeling import LlamaForCausalLM
    from ..quant.gptq import calibration_from_text, gptq
    from ..quant.quantize import quantize

    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if args.scheme == "gptq" and args.calibration_text is None:
        raise ValueError("GPTQ needs calibration data: pass --calibration-text FILE (text like the model's training text)")
    check_output_folder(out_dir, [model_dir, args.calibration_text], overwrite=args.overwrite, what="OUT_DIR")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    group_size = args.group_size if args.group_size is not None else 128
    if args.scheme == "gptq":
        seq_len = min(256, model.config.max_position_embeddings)
        calib = calibration_from_text(model_dir, Path(args.calibration_text), args.calibration_samples, seq_len)
        gptq(model, calib, bits=args.bits or 4, group_size=group_size, act_order=args.act_order)
    else:
        quantize(model, args.scheme, group_size, bits=args.bits)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (model_dir / name).is_file():
            atomic_write_bytes(out_dir / name, (model_dir / name).read_bytes())
    print(f"wrote {args.scheme} model to {out_dir} ({math.fsum(f.stat().st_size for f in out_dir.glob('*.safetensors')) / 1e6:.2f} MB of weights)")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``quantize`` to ``python -m llama_edu``."""
    p = subparsers.add_parser("quantize", help="quantize a model's linear layers (int8, int4, nf4, gptq)",
                              description="Quantize a model folder's linear layers and save the result as a new folder.")
    p.add_argument("--scheme", required=True, choices=("int8", "int4", "nf4", "gptq"))
    p.add_argument("--bits", type=int, default=None, help="int4/gptq: 2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="int4/gptq: input columns per scale (default 128; -1: one scale per row); must divide every layer's input size")
    p.add_argument("--calibration-text", default=None, help="gptq: a UTF-8 text file like the model's training text")
    p.add_argument("--calibration-samples", type=int, default=32, help="gptq: windows of the calibration text to use")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns in order of decreasing Hessian diagonal")
    p.add_argument("--overwrite", action="store_true", help="replace what OUT_DIR holds (by default a non-empty OUT_DIR is refused)")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.set_defaults(func=_quantize_command)
