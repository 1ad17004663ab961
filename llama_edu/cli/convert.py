"""``convert-meta`` and ``convert-llama2c``: other checkpoint formats -> the Hugging Face layout;
``export-gguf`` and ``describe-gguf``: the Hugging Face layout -> llama.cpp's GGUF."""

from __future__ import annotations

import argparse


def _cmd_convert_meta(args: argparse.Namespace) -> int:
    from ..io.atomic_save import check_output_folder
    from ..io.convert import convert_meta_checkpoint

    check_output_folder(args.output_dir, [args.input_dir, args.tokenizer_path], overwrite=args.overwrite, what="--output-dir")
    config = convert_meta_checkpoint(
        args.input_dir, args.output_dir, model_size=args.model_size, dtype=args.dtype,
        max_shard_size=args.max_shard_size, max_position_embeddings=args.max_position_embeddings,
        tokenizer_path=args.tokenizer_path,
    )
    print(f"wrote {args.output_dir}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, context {config.max_position_embeddings}, {config.torch_dtype}")
    return 0


def _cmd_convert_llama2c(args: argparse.Namespace) -> int:
    from ..io.atomic_save import check_output_folder
    from ..io.convert import convert_llama2c_checkpoint

    check_output_folder(args.output_dir, [args.input, args.tokenizer_path], overwrite=args.overwrite, what="--output-dir")
    config = convert_llama2c_checkpoint(args.input, args.output_dir, dtype=args.dtype,
                                        max_shard_size=args.max_shard_size, tokenizer_path=args.tokenizer_path)
    print(f"wrote {args.output_dir}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}, context {config.max_position_embeddings}, {config.torch_dtype}")
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert-meta`` and ``convert-llama2c`` with ``python -m llama_edu``."""
    p = subparsers.add_parser("convert-meta", help="Meta consolidated.*.pth checkpoint -> Hugging Face layout")
    p.add_argument("--input-dir", "--input_dir", dest="input_dir", required=True, help="folder with params.json and consolidated.NN.pth")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="where to write the HF-layout checkpoint")
    p.add_argument("--model-size", "--model_size", dest="model_size", default=None, help="7B, 13B, 70B, ... (optional; cross-checks the shard count)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="output dtype")
    p.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--max-position-embeddings", "--max_position_embeddings", dest="max_position_embeddings", type=int, default=None,
                   help="context length to write (default: 4096 for Llama 2, 2048 for Llama 1, 16384 for Code Llama, 8192 for Llama 3, 131072 for Llama 3.1/3.2)")
    p.add_argument("--tokenizer-path", "--tokenizer_path", dest="tokenizer_path", default=None, help="tokenizer.model (default: in or above input_dir)")
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds (by default a non-empty one is refused)")
    p.set_defaults(func=_cmd_convert_meta)

    p = subparsers.add_parser("convert-llama2c", help="llama2.c model.bin -> Hugging Face layout")
    p.add_argument("--input", required=True, help="llama2.c model.bin (legacy or version-1 export)")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="where to write the HF-layout checkpoint")
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32"], help="output dtype")
    p.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--tokenizer-path", "--tokenizer_path", dest="tokenizer_path", default=None, help="a SentencePiece tokenizer.model to include")
    p.add_argument("--overwrite", action="store_true", help="replace what --output-dir holds (by default a non-empty one is refused)")
    p.set_defaults(func=_cmd_convert_llama2c)


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from ..io.gguf import export_gguf, parse_gguf_dtype, read_gguf

    path = export_gguf(args.model_dir, args.out, dtype=args.dtype, tokenizer=args.tokenizer)
    g = read_gguf(path)
    print(f"wrote {path}: {len(g.tensors)} tensors, {len(g.metadata)} metadata entries, "
          f"{g.file_size / 1e6:.1f} MB ({parse_gguf_dtype(args.dtype)})")
    return 0


def _cmd_describe_gguf(args: argparse.Namespace) -> int:
    from ..io.gguf import describe_gguf

    describe_gguf(args.path, max_tensors=args.max_tensors)
    return 0


def _add_gguf(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export-gguf", help="Hugging Face-layout model -> GGUF (llama.cpp, Ollama)")
    p.add_argument("model_dir", help="model folder (config.json, safetensors, tokenizer.model)")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--dtype", default="f32", type=str.lower, help="f32, f16 or q8_0 (default f32)")
    p.add_argument("--tokenizer", default=None, help="a SentencePiece tokenizer.model (default: the model folder's)")
    p.set_defaults(func=_cmd_export_gguf)
    p = subparsers.add_parser("describe-gguf", help="print the structure of a GGUF file")
    p.add_argument("path", help="a .gguf file")
    p.add_argument("--max-tensors", type=int, default=12, help="tensor infos to list (default 12)")
    p.set_defaults(func=_cmd_describe_gguf)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """``convert-meta``, ``convert-llama2c``, ``export-gguf``, ``describe-gguf``."""
    _add_convert(subparsers)
    _add_gguf(subparsers)
