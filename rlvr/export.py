"""Export a training checkpoint to a Hugging Face folder: `python -m rlvr.export CKPT OUT_DIR [--dtype D]`
(or `rlvr-export`).

The folder holds the merged weights (bfloat16 unless --dtype says otherwise), the config, the
tokenizer and its chat template: `AutoModelForCausalLM.from_pretrained(OUT_DIR)`, vLLM and the hub
take it as they take any model. An adapter run's checkpoint is merged into its base (a 4-bit base
de-quantized first, never re-quantized: the weights its trainer's forward used), and its adapter is
also written, in PEFT's format, to OUT_DIR/adapter/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Write the Hugging Face folder (and OUT_DIR/adapter/ for an adapter run); returns OUT_DIR."""
    import torch

    from rlvr import adapters
    from rlvr.errors import UserError
    from rlvr.models import checkpoint_policy

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; export writes a new folder (choose another OUT_DIR)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}; choose one of {', '.join(DTYPES)}")
    if not Path(checkpoint).is_file():
        raise UserError(f"no checkpoint at {checkpoint}")
    try:
        spec, tokenizer, model, adapter = checkpoint_policy(checkpoint, torch.float32)  # merge in float32, then cast
    except ValueError as error:  # not an rlvr checkpoint, or a damaged one
        raise UserError(str(error).splitlines()[0]) from None
    if adapter is not None:
        model.peft_config["default"].base_model_name_or_path = spec.name
        adapters.peft_folder(model, str(out / "adapter"))
        model = adapters.merged(model)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)  # with its chat template (chat_template.jinja)
    return out


def main(argv: list[str] | None = None) -> None:
    from rlvr import cli
    from rlvr.errors import UserError

    parser = argparse.ArgumentParser(prog="rlvr-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an rlvr .ckpt file, e.g. OUTPUT_DIR/checkpoints/last.ckpt")
    parser.add_argument("out_dir", help="a new (or empty) folder")
    parser.add_argument("--dtype", default="bfloat16", help=f"the weights' dtype: {', '.join(DTYPES)} (default bfloat16)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cli.quiet()
    try:
        out = export(args.checkpoint, args.out_dir, args.dtype)
    except UserError as error:
        cli.fail(error)
    print(f"wrote {out} (from_pretrained loads it)" + (f"; the adapter is in {out / 'adapter'}"
                                                          if (out / "adapter").is_dir() else ""))


if __name__ == "__main__":
    main()
