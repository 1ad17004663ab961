"""Byte-pair encoding from scratch, checked against sentencepiece.

(Work in progress: the sentencepiece trainer with Llama 2's settings comes first.)
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

#: Llama 2's SentencePiece trainer settings (read from the ``trainer_spec``/``normalizer_spec``
#: stored inside Meta's ``tokenizer.model``), minus the corpus-size ones.
LLAMA2_TRAINER_SETTINGS: dict = dict(
    model_type="bpe",
    byte_fallback=True,  # unknown characters become <0x..> byte pieces, never <unk>
    split_digits=True,  # "2024" -> "2", "0", "2", "4"
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    normalization_rule_name="identity",  # no NFKC: text is kept byte for byte
    add_dummy_prefix=True,  # "Hello" is encoded as " Hello" -> "▁Hello"
    remove_extra_whitespaces=False,  # "a  b" keeps both spaces
    allow_whitespace_only_pieces=True,  # "▁▁▁▁" (code indentation) may become a piece
    max_sentencepiece_length=16,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,  # Llama 2 has no padding token
    character_coverage=1.0,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    num_threads=1,  # one thread: the same corpus always gives the same model
    shuffle_input_sentence=False,
    input_sentence_size=0,  # use every line
    max_sentence_length=4192,
)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file: the rename is atomic on POSIX and Windows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it normal rights
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def train_sentencepiece(
    input_file: str | os.PathLike,
    vocab_size: int = 2048,
    output_file: str | os.PathLike | None = None,
    **overrides,
) -> bytes:
    """Train a SentencePiece BPE model with Llama 2's settings on a text file (one sentence per line).

    Returns the serialized model (the bytes of a ``tokenizer.model``); when ``output_file`` is
    given, also writes them there atomically. ``overrides`` change any trainer setting.
    """
    import sentencepiece as spm

    input_file = Path(input_file)
    if not input_file.is_file():
        raise FileNotFoundError(f"training text {input_file} does not exist; pass the path of a text file")
    if vocab_size < 3 + 256 + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte fallback alone needs 3 special + 256 byte pieces"
        )
    settings = {**LLAMA2_TRAINER_SETTINGS, **overrides}
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    # Feed the lines through an iterator rather than the path, so that no machine path is stored
    # in the model's trainer_spec (the file is committed and shared).
    with open(input_file, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), vocab_size=vocab_size, model_writer=model, minloglevel=2, **settings
    )
    data = model.getvalue()
    if output_file is not None:
        atomic_write_bytes(output_file, data)
    return data
