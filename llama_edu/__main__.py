"""``python -m llama_edu``: see :mod:`llama_edu.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    code = main()
    distributed = sys.modules.get("llama_edu.training.distributed")  # loaded only by commands that need it
    if distributed is not None:
        distributed.exit_rank(code)  # a torchrun rank ends here, without Python's finalization
    sys.exit(code)
